"""Every error and warning rpsconvert raises on purpose, in one place.

An error is one line that says what is wrong and what to do. What to do is often an option, and
options are spelled differently in Python (`overwrite=True`) and on the command line (`--force`),
so messages name them as `{field}`s: `str(error)` spells them as keyword arguments, and the command
line prints `error.for_cli()`, which spells them as flags.
"""

from __future__ import annotations

from typing import Any

_CLI_FLAGS = {"overwrite": "--force"}  # keyword arguments whose flag is not their dashed name


class RPSError(Exception):
    """Base class of rpsconvert's errors: catch it to handle any of them."""

    def __init__(self, message: str, **options: Any):
        self.message, self.options = message, options
        super().__init__(self._render(cli=False))

    def for_cli(self) -> str:
        """The message with every option spelled as a command-line flag."""
        return self._render(cli=True)

    def _render(self, cli: bool) -> str:
        text = self.message  # replace, not str.format: a message may quote text with braces in it
        for name, value in self.options.items():
            text = text.replace("{" + name + "}", _spell(name, value, cli))
        return text


def _spell(name: str, value: Any, cli: bool) -> str:
    if not cli:
        return f"{name}={value!r}"
    flag = _CLI_FLAGS.get(name, "--" + name.replace("_", "-"))
    return flag if value is True else f"{flag} {value}"


class BudgetError(RPSError, ValueError):
    """The requested budget cannot hold the model: it names the smallest budget that can."""


class CheckpointError(RPSError, ValueError):
    """A file that is not a valid rpsconvert checkpoint, or that does not fit the given model."""


class ArchitectureError(RPSError, ValueError):
    """An architecture name that cannot be built here (unknown library or model, library missing)."""


class InputError(RPSError, ValueError):
    """A model input that cannot be read (safely)."""


class MemoryLimitError(RPSError, MemoryError):
    """A run that would need more memory than it is allowed (`--max-memory`): refused before it starts."""


class OutputExistsError(RPSError, FileExistsError):
    """The output file exists and overwriting it was not asked for."""


class RPSWarning(UserWarning):
    """Something the user should know about a conversion (fallback discovery, budget above size)."""
