"""Recovery that survives an interruption: its whole state on disk, every N steps or seconds.

A long recovery on a preemptible machine, or one stopped with Ctrl-C, should not start over. The
state written is everything the next step depends on: the parameters, Adam's moments, the learning
rate schedule, the best parameters kept so far, the history and the random generator. Resuming
loads it and skips the batches already used, so with the same batches, seed and thread count the
resumed run does the very arithmetic of an uninterrupted one and ends with the same parameters.

The file is a torch pickle of tensors, numbers and strings only, read back with
`torch.load(weights_only=True)`: resuming runs no code from it. It is replaced atomically (written
beside, flushed, renamed over), so a kill in the middle of a write leaves the previous state.

Under strategy="fsdp" no process holds the whole model or Adam's moments, and gathering them into
one file would need the memory sharding saves. The state is then a directory: each save is a new
folder `step-N-<random>` where every process writes its shares of the parameters, of Adam's moments
and of the best parameters with torch.distributed.checkpoint (DCP, the format torch's own sharded
training saves), and rank 0 writes the rest (`state.pt`, the same entries as
the single file). The folder becomes the state only when rank 0 renames a file `latest` naming it
over the previous one, then removes the older folders: a kill at any moment leaves `latest` naming
a complete folder. Every process must see the directory (one machine, or a shared filesystem).
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from rpsconvert.quality.batches import process_group
from rpsconvert.quality.fidelity import Fidelity

STATE_VERSION = 1
SHARDED = ("model", "optimizer", "best_state")  # the entries DCP writes under strategy="fsdp": each process its shares
LATEST = "latest"  # in a sharded state's directory: the name of the complete folder


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
    """When and where recover() saves its state, and how it reads it back: one file, or with
    `sharded` (strategy="fsdp") a directory every process writes its shares into."""

    def __init__(self, path: str | os.PathLike, every: int | None = None, seconds: float | None = None, *, sharded: bool = False):
        self.path = Path(path)
        self.every, self.seconds, self.sharded = every, seconds, sharded
        self.last = time.monotonic()

    def due(self, step: int, steps: int) -> bool:
        """True every `every` steps and whenever `seconds` have passed since the last save (never
        before the first step, nor at the last: the result itself is what is kept then). A sharded
        save is a collective, so there rank 0's clock decides for every process."""
        if not 0 < step < steps:
            return False
        due = bool(self.every and step % self.every == 0) or bool(self.seconds and time.monotonic() - self.last >= self.seconds)
        if self.sharded and self.seconds:
            due = _from_rank0(due)
        return due

    def save(self, state: dict) -> None:
        """Write `state` (every process calls it when `sharded`, rank 0 alone otherwise)."""
        if self.sharded:
            self._save_sharded(state)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path, _pickled(state))
        self.last = time.monotonic()

    def _save_sharded(self, state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        shares = {key: state[key] for key in SHARDED if state.get(key) is not None}
        folder = self.path / _from_rank0(f"step-{state['step']}-{secrets.token_hex(4)}")  # new: never the one resumed from
        dcp.save(shares, checkpoint_id=folder)  # returns once every process's shares and DCP's metadata are on disk
        if process_group()[0] == 0:
            rest = {key: value for key, value in state.items() if key not in shares}
            _write_atomic(folder / "state.pt", _pickled({**rest, "sharded": sorted(shares)}))
            _write_atomic(self.path / LATEST, folder.name.encode())  # the commit: the state is now this folder
            for old in self.path.iterdir():
                if old.name.startswith("step-") and old != folder:  # the previous state, and any a kill left half written
                    shutil.rmtree(old, ignore_errors=True)

    def load(self, steps: int, like: dict[str, dict] | None = None) -> dict:
        """The saved state, checked to belong to a run of `steps` steps. A sharded state's entries
        are read into `like` (its SHARDED entries: state dicts of this process's shares, the
        tensors filled in place) and returned in it."""
        if self.sharded:
            if self.path.is_file():
                raise ValueError(f"{self.path} is the state of a recovery that was not sharded: resume it with strategy='ddp'")
            if not (self.path / LATEST).is_file():
                raise FileNotFoundError(f"nothing to resume: {self.path / LATEST} does not exist (it is written while recovery runs with a checkpoint interval)")
            folder = self.path / (self.path / LATEST).read_text().strip()
            state = _unpickled(folder / "state.pt", self.path)
        else:
            if self.path.is_dir():
                raise ValueError(f"{self.path} is the state of a sharded recovery: resume it with strategy='fsdp'")
            if not self.path.is_file():
                raise FileNotFoundError(f"nothing to resume: {self.path} does not exist (it is written while recovery runs with a checkpoint interval)")
            state = _unpickled(self.path, self.path)
        if state["steps"] != steps:
            raise ValueError(f"{self.path} is the state of a {state['steps']}-step recovery, not of {steps} steps: pass the same steps to resume it")
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            shares = {key: like[key] for key in state.pop("sharded")}
            dcp.load(shares, checkpoint_id=folder)
            state.update(shares)
        return state


def saved(path: str | os.PathLike) -> bool:
    """Whether `path` holds a state to resume: the single file, or a sharded state's directory."""
    path = Path(path)
    return path.is_file() or (path / LATEST).is_file()


def discard(path: str | os.PathLike) -> None:
    """Remove a saved state (the file, or a sharded state's directory) once its run is done."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _pickled(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"version": STATE_VERSION, **state}, buffer)
    return buffer.getvalue()


def _unpickled(file: Path, path: Path) -> dict:
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is not a recovery state this rpsconvert wrote")
    return state


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` written beside `path`, flushed, then renamed over it: `path` is the old or the new bytes."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _from_rank0(value):
    """Rank 0's `value` on every process (the value itself outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fidelity_to_dict(f: Fidelity | None) -> dict | None:
    return None if f is None else asdict(f)


def fidelity_from_dict(d: dict | None) -> Fidelity | None:
    return None if d is None else Fidelity(**d)
