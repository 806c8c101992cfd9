"""A checkpoint too large for one file: shards and an index, as Hugging Face writes a large model.

A model directory's checkpoint larger than its shard size is written as
`model-00001-of-0000N.rps.safetensors` ... plus `model.rps.safetensors.index.json`, the index
transformers and the Hub already read (`weight_map`: tensor name -> shard). The tensors are the
ones a single file would hold, cut at tensor boundaries in the single file's order (a tensor
larger than the shard size gets a shard of its own); the first shard's metadata holds the manifest
and the digest, computed over every tensor of every shard exactly as for one file, so the same
model has the same digest sharded or not. Every shard names the index in its metadata, so a
shard opened alone is refused as one piece of a whole rather than read as a corrupt checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from rpsconvert.errors import CheckpointError
from rpsconvert.format.serialized import Serialized, data_order, serialize

INDEX_FILE = "model.rps.safetensors.index.json"
SHARD_KEY = "rpsconvert.shard_of"  # in every shard's metadata: the index it belongs to
_MAX_SHARDS = 99_999  # five digits in a shard's name


def shard_name(number: int, count: int) -> str:
    """The file name of shard `number` (from 1) of `count`, as Hugging Face names its shards."""
    return f"model-{number:05d}-of-{count:05d}.rps.safetensors"


def split(tensors: dict[str, torch.Tensor], metadata: dict[str, str], max_shard_bytes: int) -> dict[str, bytes | Serialized]:
    """The shards and the index of a checkpoint of `tensors` and `metadata` (the manifest and
    digest: they go into the first shard), cut in the order a single file holds the tensors: each
    shard's tensors take at most `max_shard_bytes`, unless one tensor alone takes more."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in data_order(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) > _MAX_SHARDS:
        raise ValueError(f"a shard size of {max_shard_bytes:,} bytes cuts this checkpoint into {len(groups):,} shards, more than {_MAX_SHARDS:,}: give a larger shard size")
    names = [shard_name(k, len(groups)) for k in range(1, len(groups) + 1)]
    files: dict[str, bytes | Serialized] = {}
    for k, (file, group) in enumerate(zip(names, groups)):
        shard_metadata = {SHARD_KEY: INDEX_FILE, **(metadata if k == 0 else {})}
        files[file] = serialize({name: tensors[name] for name in group}, shard_metadata)
    weight_map = {name: file for file, group in zip(names, groups) for name in group}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files[INDEX_FILE] = index_json(total, weight_map)
    return files


def index_json(total_size: int, weight_map: dict[str, str]) -> bytes:
    """The index file's bytes: Hugging Face's layout (`metadata.total_size`, the tensors' data
    bytes, and `weight_map`), keys sorted, so the same checkpoint gives the same bytes."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2, sort_keys=True).encode() + b"\n"


def is_shard(name: str) -> bool:
    """Whether `name` is a shard's file name (of any count): what replacing a directory may delete."""
    return re.fullmatch(r"model-\d{5}-of-\d{5}\.rps\.safetensors", name) is not None


def shard_files(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """The shards a sharded checkpoint's index names, first shard first, and its weight map; a
    bad index or a missing shard is a CheckpointError."""
    index = directory / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index} is not an rpsconvert shard index (no 'weight_map' of tensor names to shards)") from None
    if not files or any(Path(name).name != name for name in files):
        raise CheckpointError(f"{index} names no shard, or a shard outside its directory")
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} lacks the shard{'s' * (len(missing) > 1)} {', '.join(missing[:3])} that {INDEX_FILE} names: copy the whole directory")
    return [directory / name for name in files], weight_map


def reserve(names: list[str]) -> int:
    """An upper bound of the bytes sharding adds to a checkpoint of tensors `names` (format/sizing.py
    bounds the single file): the index, and in each shard a length prefix, its own metadata and
    padding, with as many shards as tensors (the most there can be)."""
    count = max(len(names), 1)
    weight_map = dict.fromkeys(names, shard_name(count, count))
    # a shard's header is `{"__metadata__":{...},` then its entries: the entries are the single file's
    per_shard = 8 + len(json.dumps({"__metadata__": {SHARD_KEY: INDEX_FILE}}, separators=(",", ":"))) + 1 + 7
    return len(index_json(10 ** 20 - 1, weight_map)) + count * per_shard
