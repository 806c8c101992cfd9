"""How many bytes a checkpoint takes: tensors (tied ones once) and a bound on its header.

A budget is a promise about the file, so the converter sizes the pool from these numbers before
anything is written.
"""

from __future__ import annotations

import json
from functools import lru_cache

import safetensors.torch
import torch

from rpsconvert.engine.pool import RPSPool
from rpsconvert.format.manifest import DIGEST_KEY, MANIFEST_KEY, POOL_TENSOR, manifest_json


def _tie_key(name: str, t: torch.Tensor) -> tuple:
    """Tensors with equal keys are one tensor under several names (tied): stored once."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else (name,)


def stored_bytes(state: dict[str, torch.Tensor]) -> int:
    """The data bytes the tensors of `state` take in a checkpoint (tied tensors once)."""
    unique = {_tie_key(name, t): t for name, t in state.items()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (tied tensors once, under their first name) and alias -> stored name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, t in state.items():
        key = _tie_key(name, t)
        if key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
            tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def header_bound(pool: RPSPool, dense: dict[str, torch.Tensor], max_file_bytes: int, module_versions: dict[str, int] | None = None) -> int:
    """An upper bound of the bytes a checkpoint spends outside tensor data (length, header, padding).

    The header is built as it will be written, with every number the converter does not know yet
    (pool size, data offsets, original size) replaced by all-nines of at least as many digits, so
    the real header is never longer. The digits are those of `max_file_bytes`, or more when even
    the smallest possible file (one pool slot) is longer: then the minimum budget that the caller
    derives from this bound is itself a budget that fits.
    """
    tensors, aliases = dedupe(dense)
    dense_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    original = dense_bytes + sum(w.numel * w.dtype.itemsize for w in pool.weights.values())
    manifest = manifest_json(pool, aliases, 10 ** len(str(original)) - 1, module_versions)
    digits = len(str(max_file_bytes))
    while True:
        big = 10**digits - 1
        manifest["pool"]["slots"] = big
        entries: dict = {name: _entry(t.dtype, list(t.shape), big) for name, t in tensors.items()}
        entries.update({POOL_TENSOR + suffix: _entry(dtype, [big], big) for suffix, dtype, _ in pool.storage.tensors(big)})
        entries["__metadata__"] = {MANIFEST_KEY: json.dumps(manifest, separators=(",", ":")), DIGEST_KEY: "0" * 64}
        header = json.dumps(entries, separators=(",", ":"))  # ASCII-escaped: never shorter than UTF-8
        bound = 8 + len(header.encode()) + 7  # length prefix, JSON, padding to a multiple of 8
        if len(str(bound + dense_bytes + pool.storage.bytes(1))) <= digits:
            return bound
        digits += 1


def _entry(dtype: torch.dtype, shape: list[int], offset: int) -> dict:
    return {"dtype": safetensors_dtype(dtype), "shape": shape, "data_offsets": [offset, offset]}


@lru_cache(maxsize=None)
def safetensors_dtype(dtype: torch.dtype) -> str:
    """The name safetensors writes for `dtype`, read back from a one-element file (public API only)."""
    data = safetensors.torch.save({"x": torch.zeros(1, dtype=dtype)})
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["x"]["dtype"]


