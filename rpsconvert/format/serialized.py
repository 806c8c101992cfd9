"""A safetensors file as its header and its tensors, written out without joining them in memory.

`safetensors.torch.save` returns the whole file as one bytes object: a copy of every tensor, so
writing a converted model took twice its size in memory. Here the header is made first (it holds
only names, dtypes, shapes and offsets) and each tensor's bytes are written from the tensor
itself. The layout is safetensors' own: an 8-byte little-endian header length, the JSON header
padded with spaces to a multiple of 8, then the tensors back to back (widest dtype first, then
by name, as safetensors orders them); the metadata's entries are in key order, so the same model
gives the same bytes.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import BinaryIO, Callable

import torch

from rpsconvert.format.sizing import safetensors_dtype


@dataclass(frozen=True)
class Deferred:
    """A tensor known by its dtype and shape, made only when it is written: a decompressed model
    is written a generated weight at a time, never held whole."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize


@dataclass(frozen=True)
class Serialized:
    """The bytes of a safetensors file, held as its header and its tensors in data order."""

    header: bytes  # the length prefix and the padded JSON
    tensors: tuple[torch.Tensor | Deferred, ...]  # contiguous, on the CPU, in the order of their data

    def __len__(self) -> int:
        return len(self.header) + sum(t.numel() * t.element_size() for t in self.tensors)

    def write_to(self, f: BinaryIO) -> None:
        f.write(self.header)
        for tensor in self.tensors:
            _write_tensor(f, tensor)

    def __bytes__(self) -> bytes:
        buffer = io.BytesIO()
        self.write_to(buffer)
        return buffer.getvalue()


def _write_tensor(f: BinaryIO, tensor: torch.Tensor | Deferred) -> None:
    """One tensor's bytes; a Deferred one is made here and dropped on return, before the next."""
    if isinstance(tensor, Deferred):
        made = tensor.make().detach().contiguous().cpu()
        if made.dtype != tensor.dtype or tuple(made.shape) != tensor.shape:
            raise ValueError(f"a deferred tensor was made as {made.dtype} {tuple(made.shape)}, announced as {tensor.dtype} {tensor.shape}")
        tensor = made
    if tensor.numel():
        f.write(tensor.reshape(-1).view(torch.uint8).numpy())


def serialize(tensors: dict[str, torch.Tensor | Deferred], metadata: dict[str, str]) -> Serialized:
    """`tensors` (name -> tensor, none sharing memory, or Deferred) and string `metadata` as a safetensors file."""
    order = data_order(tensors)
    entries, offset = {}, 0
    for name in order:
        size = tensors[name].numel() * tensors[name].element_size()
        entries[name] = {"dtype": safetensors_dtype(tensors[name].dtype), "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = tuple(t if isinstance(t, Deferred) else t.detach().contiguous().cpu() for t in (tensors[name] for name in order))
    return Serialized(len(text).to_bytes(8, "little") + text, data)


def data_order(tensors: dict[str, torch.Tensor | Deferred]) -> list[str]:
    """The names of `tensors` in the order their data is written: widest dtype first, then by
    name, as safetensors orders them (so a file written here is byte for byte safetensors' own)."""
    return sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
