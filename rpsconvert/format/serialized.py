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
from dataclasses import dataclass
from typing import BinaryIO

import torch

from rpsconvert.format.sizing import safetensors_dtype


@dataclass(frozen=True)
class Serialized:
    """The bytes of a safetensors file, held as its header and its tensors in data order."""

    header: bytes  # the length prefix and the padded JSON
    tensors: tuple[torch.Tensor, ...]  # contiguous, on the CPU, in the order of their data

    def __len__(self) -> int:
        return len(self.header) + sum(t.numel() * t.element_size() for t in self.tensors)

    def write_to(self, f: BinaryIO) -> None:
        f.write(self.header)
        for tensor in self.tensors:
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy())

    def __bytes__(self) -> bytes:
        buffer = io.BytesIO()
        self.write_to(buffer)
        return buffer.getvalue()


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Serialized:
    """`tensors` (name -> tensor, none sharing memory) and string `metadata` as a safetensors file."""
    order = data_order(tensors)
    entries, offset = {}, 0
    for name in order:
        size = tensors[name].numel() * tensors[name].element_size()
        entries[name] = {"dtype": safetensors_dtype(tensors[name].dtype), "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = tuple(tensors[name].detach().contiguous().cpu() for name in order)
    return Serialized(len(text).to_bytes(8, "little") + text, data)


def data_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of `tensors` in the order their data is written: widest dtype first, then by
    name, as safetensors orders them (so a file written here is byte for byte safetensors' own)."""
    return sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
