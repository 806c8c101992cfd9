"""`python -m rpsconvert`: the same command as the `rpsconvert` script, for environments without it on PATH."""

from rpsconvert.cli import app

app(prog_name="rpsconvert")
