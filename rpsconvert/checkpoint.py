"""The .rps.safetensors checkpoint: save, load, decompress (format spec: docs/format.md).

A checkpoint is a plain safetensors file: the pool, every tensor kept dense under its state-dict
name, and one metadata entry holding a versioned JSON spec from which every compressed weight is
regenerated. Nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from rpsconvert import __version__
from rpsconvert.hashing import check_seed
from rpsconvert.layers import POOL_PARAM, RPSPool, WeightSpec, find_pool, install
from rpsconvert.mapping import MAX_SLOTS, get_mapping

FORMAT = "rpsconvert"
FORMAT_VERSION = 1
HASH_SPEC = "fmix32-v1"
METADATA_KEY = "rpsconvert"
POOL_TENSOR = POOL_PARAM


class CheckpointError(ValueError):
    """A file that is not a valid rpsconvert checkpoint, or that does not fit the given model."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint")
    return dtype


def spec_json(pool: RPSPool, dense_aliases: dict[str, str], sha256: str, original_bytes: int) -> dict:
    """The metadata spec of a checkpoint (everything but the tensor data)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hash": HASH_SPEC,
        "mapping": pool.mapping.name,
        "seed": pool.seed,
        "pool": {"tensor": POOL_TENSOR, "slots": pool.size, "dtype": dtype_name(pool.pool.dtype)},
        "weights": [
            {
                "name": s.name,
                "aliases": list(s.aliases),
                "shape": list(s.shape),
                "dtype": dtype_name(s.dtype),
                "offset": s.offset,
                "scale": s.scale,
            }
            for s in pool.specs.values()
        ],
        "dense_aliases": dense_aliases,
        "original_bytes": original_bytes,
        "architecture": pool.info.get("architecture"),
        "discovery": pool.info.get("discovery"),
        "rpsconvert_version": __version__,
        "sha256": sha256,
    }


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the raw little-endian bytes of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a checkpoint holds (tied dense tensors once) and the aliases of the tied ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else (name,)
        if key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
            tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def header_bound(pool: RPSPool, dense: dict[str, torch.Tensor], max_file_bytes: int) -> int:
    """An upper bound of the bytes a checkpoint spends outside tensor data (header, padding).

    Offsets and sizes are written with as many digits as `max_file_bytes` has, the sha256 is a
    fixed 64 hex digits, so the real header is never longer.
    """
    big = 10 ** len(str(max_file_bytes)) - 1
    entries = {name: {"dtype": "BOOL", "shape": list(t.shape), "data_offsets": [big, big]} for name, t in dense.items()}
    entries[POOL_TENSOR] = {"dtype": "BOOL", "shape": [big], "data_offsets": [big, big]}
    spec = spec_json(pool, {}, "0" * 64, big)
    spec["pool"]["slots"] = big
    spec["dense_aliases"] = {n: "x" * 256 for n in pool.info.get("dense_aliases", [])}
    entries["__metadata__"] = {METADATA_KEY: json.dumps(spec, separators=(",", ":"))}
    header = json.dumps(entries, separators=(",", ":"))  # ASCII-escaped: never shorter than UTF-8
    return 8 + len(header.encode()) + 8  # length prefix, JSON, alignment padding


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a converted model atomically: a failure never leaves a partial or corrupt file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True (--force) to replace it")
    pool = find_pool(model)
    tensors, aliases = _stored_tensors(model)
    original_bytes = pool.info.get("original_bytes", 0)
    spec = spec_json(pool, aliases, tensor_digest(tensors), original_bytes)
    metadata = {METADATA_KEY: json.dumps(spec, separators=(",", ":"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_spec(path: str | os.PathLike) -> dict:
    """The metadata spec of a checkpoint, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}): it may be truncated or not a checkpoint") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not an rpsconvert checkpoint (no '{METADATA_KEY}' metadata)")
    try:
        spec = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the rpsconvert metadata is not valid JSON (corrupt file)") from None
    if spec.get("format") != FORMAT or spec.get("hash") != HASH_SPEC:
        raise CheckpointError(f"{path}: unknown format {spec.get('format')!r} / hash {spec.get('hash')!r}")
    if not isinstance(spec.get("format_version"), int) or spec["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses format version {spec.get('format_version')}, newer than this rpsconvert reads "
            f"({FORMAT_VERSION}): upgrade rpsconvert"
        )
    return spec


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], RPSPool]:
    spec = read_spec(path)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the tensors ({exc}): the file is corrupt") from None
    if tensor_digest(tensors) != spec.get("sha256"):
        raise CheckpointError(f"{path}: the tensor data does not match its sha256: the file is corrupt")
    try:
        specs = [
            WeightSpec(w["name"], tuple(w["shape"]), _dtype(w["dtype"]), int(w["offset"]), float(w["scale"]), tuple(w["aliases"]))
            for w in spec["weights"]
        ]
        check_seed(spec["seed"])
        get_mapping(spec["mapping"])
        pool_tensor = tensors.pop(spec["pool"]["tensor"])
        if pool_tensor.ndim != 1 or not 0 < pool_tensor.numel() < MAX_SLOTS:
            raise ValueError("the pool must be a 1-D tensor")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid rpsconvert metadata ({exc})") from None
    pool = RPSPool(pool_tensor, spec["mapping"], spec["seed"], specs)
    pool.info.update(architecture=spec.get("architecture"), discovery=spec.get("discovery"), original_bytes=spec.get("original_bytes", 0))
    return spec, tensors, pool


def _with_aliases(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    return {**tensors, **{alias: tensors[name] for alias, name in aliases.items()}}


def load(path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu", strict: bool = True) -> nn.Module:
    """Load a checkpoint into `model` (a skeleton of the same architecture, converted in place) or,
    without one, into a model rebuilt from the architecture recorded in the file."""
    spec, tensors, pool = _read(path)
    if model is None:
        from rpsconvert.architectures import build

        if not spec.get("architecture"):
            raise CheckpointError(
                f"{path} records no architecture: pass a model of the original architecture, "
                "load(path, model=MyModel()), or use decompress(path) for a plain state dict"
            )
        model = build(spec["architecture"])
    params = dict(model.named_parameters(remove_duplicate=False))
    for weight in pool.specs.values():
        for name in (weight.name, *weight.aliases):
            if name not in params:
                raise CheckpointError(f"the model does not match {path}: it has no parameter {name!r}")
            if tuple(params[name].shape) != weight.shape:
                raise CheckpointError(
                    f"the model does not match {path}: {name} has shape {tuple(params[name].shape)}, the checkpoint {weight.shape}"
                )
    install(model, pool)
    state = _with_aliases(tensors, spec.get("dense_aliases", {}))
    state[POOL_TENSOR] = pool.pool.data
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"the model does not match {path}: {str(exc).splitlines()[0]} {' '.join(str(exc).split())[:300]}") from None
    return model.to(device)


def decompress(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict of a checkpoint: loads with `load_state_dict(sd, strict=True)` into
    the original architecture, with no rpsconvert needed afterwards."""
    spec, tensors, pool = _read(path)
    state = _with_aliases(tensors, spec.get("dense_aliases", {}))
    with torch.no_grad():
        for weight in pool.specs.values():
            dense = pool.weight(weight.name).to(weight.dtype).contiguous()
            for name in (weight.name, *weight.aliases):
                state[name] = dense
    return state
