"""Recovery that survives an interruption: its whole state on disk, every N steps or seconds.

A long recovery on a preemptible machine, or one stopped with Ctrl-C, should not start over. The
state written is everything the next step depends on: the parameters, Adam's moments, the learning
rate schedule, the best parameters kept so far, the history and the random generator. Resuming
loads it and skips the batches already used, so with the same batches, seed and thread count the
resumed run does the very arithmetic of an uninterrupted one and ends with the same parameters.

The file is a torch pickle of tensors, numbers and strings only, read back with
`torch.load(weights_only=True)`: resuming runs no code from it. It is replaced atomically (written
beside, flushed, renamed over), so a kill in the middle of a write leaves the previous state.
"""

from __future__ import annotations

import io
import os
import secrets
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rpsconvert.quality.fidelity import Fidelity

STATE_VERSION = 1


def parse_interval(text: str) -> tuple[int | None, float | None]:
    """`"50"` -> every 50 steps; `"90s"`, `"5min"`, `"1h"` -> every so many seconds (the CLI's
    `--checkpoint-every`): steps suit a benchmark, minutes a job that may be preempted."""
    text = text.strip().lower()
    for unit, seconds in (("min", 60.0), ("h", 3600.0), ("s", 1.0)):
        if text.endswith(unit):
            number = text.removesuffix(unit).strip()
            try:
                value = float(number) * seconds
            except ValueError:
                break
            if value > 0:
                return None, value
            break
    else:
        if text.isdigit() and int(text) > 0:
            return int(text), None
    raise ValueError(f"cannot read the interval {text!r}: write a number of steps (50) or of seconds, minutes or hours (90s, 5min, 1h)")


class Checkpointer:
    """When and where recover() saves its state, and how it reads it back."""

    def __init__(self, path: str | os.PathLike, every: int | None = None, seconds: float | None = None):
        self.path = Path(path)
        self.every, self.seconds = every, seconds
        self.last = time.monotonic()

    def due(self, step: int, steps: int) -> bool:
        """True every `every` steps and whenever `seconds` have passed since the last save (never
        before the first step, nor at the last: the result itself is what is kept then)."""
        if not 0 < step < steps:
            return False
        return bool(self.every and step % self.every == 0) or bool(self.seconds and time.monotonic() - self.last >= self.seconds)

    def save(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save({"version": STATE_VERSION, **state}, buffer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(buffer.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.last = time.monotonic()

    def load(self, steps: int) -> dict:
        """The saved state, checked to belong to a run of `steps` steps."""
        if not self.path.is_file():
            raise FileNotFoundError(f"nothing to resume: {self.path} does not exist (it is written while recovery runs with a checkpoint interval)")
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path} is not a recovery state this rpsconvert wrote")
        if state["steps"] != steps:
            raise ValueError(f"{self.path} is the state of a {state['steps']}-step recovery, not of {steps} steps: pass the same steps to resume it")
        return state


def fidelity_to_dict(f: Fidelity | None) -> dict | None:
    return None if f is None else asdict(f)


def fidelity_from_dict(d: dict | None) -> Fidelity | None:
    return None if d is None else Fidelity(**d)
