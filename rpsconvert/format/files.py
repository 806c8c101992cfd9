"""Writing files so that no one ever sees a partial one, even after a crash."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import safetensors.torch
import torch

from rpsconvert.errors import OutputExistsError


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` so that no one ever sees a partial file at `path`, even after a crash.

    The bytes go to a temporary file in the same folder (so the final move is atomic), are flushed
    to disk, then moved into place: renamed over an old file only with `overwrite`, else hard-linked,
    which fails if `path` appeared in the meantime (on a filesystem without hard links, renamed
    after a last check). On any failure or interrupt the temporary file is removed and `path` is
    untouched.
    """
    path = Path(path)
    exists = OutputExistsError(f"{path} already exists: pass {{overwrite}} to replace it, or write to another path", overwrite=True)
    if path.exists() and not overwrite:
        raise exists
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # created with the user's umask, like any file they write
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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


def save_dense(state: dict[str, torch.Tensor], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a plain state dict as safetensors, atomically, every name with its own copy of its
    tensor (safetensors refuses shared memory, and every loader should find every key)."""
    seen: set[int] = set()
    unique = {}
    for name, t in state.items():
        unique[name] = t.clone() if t.numel() and t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    return write_atomic(path, safetensors.torch.save(unique, metadata={"format": "pt"}), overwrite=overwrite)


