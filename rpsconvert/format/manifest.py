"""The manifest of a checkpoint: the JSON that, with the pool, regenerates every compressed weight.

Its fields are specified in docs/format.md, part 2; `digest` is the sha256 that covers it and the
tensors, so a flipped bit anywhere is caught rather than loaded as slightly wrong weights.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch

from rpsconvert.version import __version__
from rpsconvert.engine.hashing import check_seed
from rpsconvert.engine.mapping import HASHED_SLOTS, get_mapping, mapping_params
from rpsconvert.engine.operator import CompressedWeight
from rpsconvert.engine.pool import POOL_PARAM, RPSPool
from rpsconvert.engine.storage import MixedStorage, dtype_name, parse_dtype, storage_from_json

FORMAT = "rpsconvert"
FORMAT_VERSION = 6  # the newest version this code reads; it writes the oldest that says everything
HASH_SPEC = "fmix32-v1"
MANIFEST_KEY = "rpsconvert"  # safetensors metadata key of the JSON manifest
DIGEST_KEY = "rpsconvert.sha256"  # safetensors metadata key of the digest
POOL_TENSOR = POOL_PARAM  # the pool's state-dict name
# The parameters every mapping had, unwritten, in version 1 files.
_V1_MAPPING_PARAMS = {"randomfold": {}, "hashednet": {}, "roast": {"tile": 1024}}
_V3_WIDTHS = {2, 4, 8}  # the integer widths version 3 knew


def manifest_json(pool: RPSPool, dense_aliases: dict[str, str], original_bytes: int, module_versions: dict[str, int] | None = None) -> dict:
    """The manifest of a checkpoint: everything but the tensor data and the digest."""
    params = mapping_params(pool.mapping)
    return {
        "format": FORMAT,
        "format_version": _version(pool.storage, params == _V1_MAPPING_PARAMS.get(pool.mapping.name), pool.size),
        "hash": HASH_SPEC,
        "mapping": pool.mapping.name,
        "mapping_params": params,
        "seed": pool.seed,
        "pool": {"tensor": POOL_TENSOR, "slots": pool.size, **pool.storage.to_json()},
        "weights": [
            {
                "name": w.name,
                "aliases": list(w.aliases),
                "shape": list(w.shape),
                "dtype": dtype_name(w.dtype),
                "offset": w.offset,
                "scale": w.scale,
            }
            for w in pool.weights.values()
        ],
        "dense_aliases": dense_aliases,
        "original_bytes": original_bytes,
        "architecture": pool.info.get("architecture"),
        "discovery": pool.info.get("discovery"),
        **({"module_versions": module_versions} if module_versions else {}),
        "rpsconvert_version": __version__,
        # what made the file (format/provenance.py); a pool that was loaded, not converted, has none
        **({"provenance": pool.info["provenance"]} if pool.info.get("provenance") is not None else {}),
    }


def module_versions(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The layout versions (`Module._version`) in a module's state dict that are not torch's default 1.

    load_state_dict hands each module its version from the state dict's `_metadata`, which a
    safetensors file cannot hold, and some modules refuse a state dict without theirs
    (torchvision's MNASNet raises on None): the manifest keeps them for `decompress`.
    """
    metadata = getattr(state, "_metadata", {})
    return {prefix: meta["version"] for prefix, meta in metadata.items() if meta.get("version", 1) != 1}


def state_metadata(keys: Iterable[str], versions: dict[str, int]) -> dict[str, dict[str, int]]:
    """A state dict's `_metadata` for the modules that hold `keys`: their recorded version, else 1."""
    prefixes = {""} | {key.rsplit(".", 1)[0] for key in keys if "." in key}
    prefixes |= {prefix[:i] for prefix in prefixes for i, c in enumerate(prefix) if c == "."}
    return {prefix: {"version": versions.get(prefix, 1)} for prefix in sorted(prefixes)}


def _version(storage, v1_params: bool, slots: int) -> int:
    """The oldest version that says everything, so that older readers read every file they can:
    2 added mapping_params, 3 quantized pools of 2, 4 and 8 bits, 4 every width from 2 to 8,
    5 pools of 2**32 slots and more (RandomFold's, for models above 4.3e9 weights at ratio 1),
    6 2-bit codes packed in base 3."""
    parts = [part for _, part in storage.runs] if isinstance(storage, MixedStorage) else [storage]
    if any(part.packing == "base3" for part in parts if part.quantized):
        return 6
    if slots >= HASHED_SLOTS:
        return 5
    if not storage.quantized:
        return 1 if v1_params else 2
    return 3 if storage.widths <= _V3_WIDTHS else 4


def digest(manifest_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the manifest text, then of every tensor in name order: name, a zero byte, raw bytes.

    It covers everything a loader trusts (a scale or an offset in the manifest as much as the pool).
    """
    h = hashlib.sha256(manifest_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the tensor's own bytes, not a copy
    return h.hexdigest()


def parse(manifest: dict, tensors: dict[str, torch.Tensor]) -> RPSPool:
    """The pool a (digest-checked) manifest describes, validated; its tensor is taken out of `tensors`.

    Raises KeyError, TypeError or ValueError on a manifest that does not follow the format.
    """
    if manifest["format"] != FORMAT or manifest["hash"] != HASH_SPEC or not 1 <= manifest["format_version"] <= FORMAT_VERSION:
        raise ValueError(f"unknown format {manifest['format']!r} version {manifest['format_version']!r} hash {manifest['hash']!r}")
    weights = [
        CompressedWeight(w["name"], tuple(int(d) for d in w["shape"]), parse_dtype(w["dtype"]), int(w["offset"]), float(w["scale"]), tuple(w["aliases"]))
        for w in manifest["weights"]
    ]
    if any(w.offset < 0 or min(w.shape, default=1) < 0 or not math.isfinite(w.scale) for w in weights):
        raise ValueError("a weight has a negative offset or dimension, or a scale that is not finite")
    check_seed(manifest["seed"])
    params = manifest["mapping_params"] if manifest["format_version"] >= 2 else _V1_MAPPING_PARAMS.get(manifest["mapping"])
    mapping = get_mapping(manifest["mapping"], params)
    pool_entry = manifest["pool"]
    slots = pool_entry["slots"]
    if not isinstance(slots, int) or not 0 < slots < mapping.max_slots:
        raise ValueError(f"a {mapping.name} pool must have between 1 and {mapping.max_slots - 1:,} slots, the manifest says {slots!r}")
    storage = storage_from_json(pool_entry)
    if manifest["format_version"] < (needed := _version(storage, True, slots)):
        raise ValueError(f"a pool of {slots:,} slots stored as {storage} needs format version {needed}")
    names = {suffix: pool_entry["tensor"] + suffix for suffix, _, _ in storage.tensors(slots)}
    stored = {suffix: tensors.pop(name) for suffix, name in names.items()}
    if not set(manifest["dense_aliases"].values()) <= set(tensors):
        raise ValueError("a dense alias names a tensor the file does not hold")
    compute_dtype = weights[0].dtype if weights else torch.float32  # the pool works in the weights' dtype
    versions = manifest.get("module_versions", {})
    if not isinstance(versions, dict) or not all(isinstance(k, str) and type(v) is int for k, v in versions.items()):
        raise ValueError("module_versions must map module names to integer versions")
    pool = RPSPool.from_stored(stored, storage, slots, compute_dtype, mapping, manifest["seed"], weights)  # held as stored
    pool.info.update(
        architecture=manifest.get("architecture"), discovery=manifest.get("discovery"), original_bytes=manifest.get("original_bytes", 0)
    )
    return pool
