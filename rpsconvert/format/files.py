"""Writing files and directories so that no one ever sees a partial one, even after a crash."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Collection

import torch

from rpsconvert.errors import OutputExistsError
from rpsconvert.format.serialized import Deferred, Serialized, serialize


def write_atomic(path: str | os.PathLike, data: bytes | Serialized, *, overwrite: bool = False) -> Path:
    """Write `data` so that no one ever sees a partial file at `path`, even after a crash.

    The bytes go to a temporary file in the same folder (so the final move is atomic), are flushed
    to disk, then moved into place: renamed over an old file only with `overwrite`, else hard-linked,
    which fails if `path` appeared in the meantime (on a filesystem without hard links, renamed
    after a last check). On any failure or interrupt the temporary file is removed and `path` is
    untouched.
    """
    path = Path(path)
    exists = _exists(path)
    if path.exists() and not overwrite:
        raise exists
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path)
    try:
        _write_synced(tmp, data)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise exists from None
            except OSError:
                if path.exists():
                    raise exists from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _exists(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} already exists: pass {{overwrite}} to replace it, or write to another path", overwrite=True)


def _beside(path: Path) -> Path:
    """A fresh temporary name in `path`'s own folder, so that the final move is a rename."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _write_synced(path: Path, data: bytes | Serialized) -> None:
    """Create `path` (never over an existing one) with `data`, flushed to disk before returning;
    created with the user's umask, like any file they write. A Serialized file is written from its
    tensors, never joined into one bytes object."""
    with open(path, "xb") as f:
        data.write_to(f) if isinstance(data, Serialized) else f.write(data)
        f.flush()
        os.fsync(f.fileno())


def taken(path: str | os.PathLike) -> bool:
    """Whether writing a directory at `path` would replace something: a file, or a directory that
    is not empty (an empty one is simply filled)."""
    path = Path(path)
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def write_directory_atomic(
    path: str | os.PathLike, files: dict[str, bytes | Serialized], *, overwrite: bool = False, replaceable: Collection[str] = ()
) -> Path:
    """Write `files` (name -> bytes) as the directory `path`, so that no one ever sees it half written.

    The files go to a temporary directory beside `path`, are flushed to disk, then the directory is
    renamed into place (over an empty directory at `path`). A directory with files in it is replaced
    only with `overwrite`, and only when it holds nothing but names in `files` or `replaceable`, so a
    folder of other things is never deleted; the old one is moved aside, the new one moved in, then
    the old one removed. On any failure or interrupt the temporary directory is removed and `path`
    is as it was.
    """
    path = Path(path)
    exists = _exists(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a directory: write the model directory to another path")
    old = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
    if old and not overwrite:
        raise exists
    foreign = [name for name in old if name not in files and name not in replaceable]
    if foreign:
        raise OutputExistsError(f"{path} holds files rpsconvert does not write ({', '.join(foreign[:3])}): write to a new or empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path)
    aside = tmp.with_name(tmp.name + ".old")
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_synced(tmp / name, data)
        if old:
            os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except OSError:
            if not old and path.exists():  # made by someone else meanwhile
                raise exists from None
            raise
    finally:
        if aside.exists() and not path.exists():  # the new directory is not in place: the old one goes back
            os.replace(aside, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    return path


def save_dense(state: dict[str, torch.Tensor | Deferred], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a plain state dict as safetensors, atomically, every name with its own copy of its
    tensor (safetensors refuses shared memory, and every loader should find every key); a
    Deferred tensor is made as it is written, once for each of its names."""
    seen: set[int] = set()
    unique = {}
    for name, t in state.items():
        if isinstance(t, Deferred):
            unique[name] = t
            continue
        unique[name] = t.clone() if t.numel() and t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    return write_atomic(path, serialize(unique, {"format": "pt"}), overwrite=overwrite)


