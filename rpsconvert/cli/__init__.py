"""The command line: `rpsconvert MODEL --budget 1MB`, `info`, `decompress` (typer + rich)."""

from rpsconvert.cli.app import app

__all__ = ["app"]
