"""A model's safetensors files, read a piece at a time: the weights of a model larger than memory.

The header of each file says where every tensor's bytes are, so a range of a tensor's elements
(row-major) is one contiguous range of bytes: it is read into a fresh tensor with plain file
reads. Nothing is memory-mapped, so the memory a conversion holds is what it asked for, not the
pages of a mapped shard (which count in its resident size until unmapped).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rpsconvert.engine.operator import CompressedWeight
from rpsconvert.engine.projection import Reader
from rpsconvert.errors import InputError

INDEX_FILE = "model.safetensors.index.json"  # a sharded Hugging Face checkpoint's map of names to shards
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's bytes


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of its first byte in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsFiles:
    """The tensors of one safetensors file, or of a Hugging Face directory's shards, by name."""

    entries: dict[str, Entry]
    metadata: dict[str, str]  # the first file's __metadata__

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsFiles:
        """The files of `path`: a .safetensors file, or a directory with model.safetensors or
        sharded files and model.safetensors.index.json. A bad file is one InputError line."""
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
                files = [path / name for name in dict.fromkeys(weight_map.values())]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError(f"{path / INDEX_FILE} is not a safetensors index (no 'weight_map' of names to files)") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{path} lacks the shard{'s' * (len(missing) > 1)} {', '.join(missing[:3])} that {INDEX_FILE} names")
        elif (path / SINGLE_FILE).is_file():
            files = [path / SINGLE_FILE]
        else:
            raise InputError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}: a Hugging Face model directory has one of them")
        entries, metadata = {}, None
        for file in files:
            found, meta = _header(file)
            entries.update(found)
            metadata = meta if metadata is None else metadata
        return cls(entries, metadata or {})

    def read(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Elements [lo, hi) of tensor `name`, flattened, in the file's dtype."""
        entry = self.entries[name]
        hi = entry.numel if hi is None else hi
        size = entry.dtype.itemsize
        out = torch.empty((hi - lo) * size, dtype=torch.uint8)
        with open(entry.file, "rb") as f:
            f.seek(entry.start + lo * size)
            if f.readinto(out.numpy()) != len(out):
                raise InputError(f"{entry.file} is truncated: {name} ends past the end of the file")
        return out.view(entry.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` whole, in its shape and the file's dtype."""
        return self.read(name).view(self.entries[name].shape)

    def reader(self, keys: dict[str, str], on_read: Callable[[int], None] | None = None) -> Reader:
        """A Reader of compressed weights (engine/projection.py) from these files, in each weight's
        dtype (as loading the model would convert them); `keys` maps the model's state-dict names
        to the files' (a tied weight is stored under one of its names). `on_read` is told the bytes
        of every read (a progress display)."""

        def read(weight: CompressedWeight, lo: int, hi: int) -> torch.Tensor:
            piece = self.read(next(keys[n] for n in (weight.name, *weight.aliases) if n in keys), lo, hi)
            if on_read is not None:
                on_read(piece.numel() * piece.element_size())
            return piece.to(weight.dtype)

        return read


def _header(file: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The entries and metadata of one safetensors file, checked against its size."""
    bad = f"{file} is not a readable safetensors file"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or not 0 < length <= min(_MAX_HEADER, size - 8):
                raise InputError(f"{bad} (its header length {length} does not fit its {size} bytes)")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{bad} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    base, entries = 8 + length, {}
    metadata = header.pop("__metadata__", None) or {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{bad} (tensor {name!r} has a dtype or entry rpsconvert does not read)") from None
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > size or begin < 0:
            raise InputError(f"{bad} (tensor {name!r} does not fit its {size} bytes: truncated or corrupt)")
        entries[name] = Entry(file, dtype, shape, base + begin)
    return entries, metadata
