"""The .rps.safetensors checkpoint: save, load, decompress (format: docs/format.md, part 2).

A checkpoint is a plain safetensors file: the pool, every tensor kept dense under its state-dict
name, and two metadata strings: a versioned JSON spec from which every compressed weight is
regenerated, and a sha256 over that spec and the tensors. Nothing is unpickled on load, and a file
is written completely or not at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from rpsconvert import __version__
from rpsconvert.hashing import check_seed
from rpsconvert.layers import POOL_ATTR, POOL_PARAM, RPSPool, WeightSpec, find_pool, install
from rpsconvert.mapping import MAX_SLOTS, get_mapping

FORMAT = "rpsconvert"
FORMAT_VERSION = 1
HASH_SPEC = "fmix32-v1"
SPEC_KEY = "rpsconvert"  # safetensors metadata key of the JSON spec
DIGEST_KEY = "rpsconvert.sha256"  # safetensors metadata key of the digest
POOL_TENSOR = POOL_PARAM  # the pool's state-dict name


class CheckpointError(ValueError):
    """A file that is not a valid rpsconvert checkpoint, or that does not fit the given model."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def spec_json(pool: RPSPool, dense_aliases: dict[str, str], original_bytes: int) -> dict:
    """The JSON spec of a checkpoint: everything but the tensor data and the digest."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hash": HASH_SPEC,
        "mapping": pool.mapping.name,
        "seed": pool.seed,
        "pool": {"tensor": POOL_TENSOR, "slots": pool.size, "dtype": dtype_name(pool.storage_dtype)},
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
    }


def digest(spec_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the spec text, then of every tensor in name order: name, a zero byte, raw bytes.

    It covers everything a loader trusts (a scale or an offset in the spec as much as the pool), so
    a flipped bit anywhere in the file is caught rather than loaded as slightly wrong weights.
    """
    h = hashlib.sha256(spec_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tie_key(name: str, t: torch.Tensor) -> tuple:
    """Tensors with equal keys are one tensor under several names (tied): stored once."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else (name,)


def stored_bytes(state: dict[str, torch.Tensor]) -> int:
    """The data bytes the tensors of `state` take in a checkpoint (tied tensors once)."""
    unique = {_tie_key(name, t): t for name, t in state.items()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _metadata(spec: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    text = json.dumps(spec, separators=(",", ":"))
    return {SPEC_KEY: text, DIGEST_KEY: digest(text, tensors)}


def header_bound(pool: RPSPool, dense: dict[str, torch.Tensor], max_file_bytes: int) -> int:
    """An upper bound of the bytes a checkpoint spends outside tensor data (length, header, padding).

    The header is built as it will be written, with every number the converter does not know yet
    (pool size, data offsets, original size) replaced by all-nines of at least as many digits, so
    the real header is never longer. The digits are those of `max_file_bytes`, or more when even
    the smallest possible file (one pool slot) is longer: then the minimum budget that the caller
    derives from this bound is itself a budget that fits.
    """
    tensors, aliases = _dedupe(dense)
    dense_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    original = dense_bytes + sum(s.numel * s.dtype.itemsize for s in pool.specs.values())
    spec = spec_json(pool, aliases, 10 ** len(str(original)) - 1)
    digits = len(str(max_file_bytes))
    while True:
        big = 10**digits - 1
        spec["pool"]["slots"] = big
        entries: dict = {name: _entry(t.dtype, list(t.shape), big) for name, t in tensors.items()}
        entries[POOL_TENSOR] = _entry(pool.storage_dtype, [big], big)
        entries["__metadata__"] = {SPEC_KEY: json.dumps(spec, separators=(",", ":")), DIGEST_KEY: "0" * 64}
        header = json.dumps(entries, separators=(",", ":"))  # ASCII-escaped: never shorter than UTF-8
        bound = 8 + len(header.encode()) + 7  # length prefix, JSON, padding to a multiple of 8
        if len(str(bound + dense_bytes + pool.storage_dtype.itemsize)) <= digits:
            return bound
        digits += 1


def _entry(dtype: torch.dtype, shape: list[int], offset: int) -> dict:
    return {"dtype": _safetensors_dtype(dtype), "shape": shape, "data_offsets": [offset, offset]}


@lru_cache(maxsize=None)
def _safetensors_dtype(dtype: torch.dtype) -> str:
    """The name safetensors writes for `dtype`, read back from a one-element file (public API only)."""
    data = safetensors.torch.save({"x": torch.zeros(1, dtype=dtype)})
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["x"]["dtype"]


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` so that no one ever sees a partial file at `path`, even after a crash.

    The bytes go to a temporary file in the same folder (so the final move is atomic), are flushed
    to disk, then moved into place: renamed over an old file only with `overwrite`, else hard-linked,
    which fails if `path` appeared in the meantime (on a filesystem without hard links, renamed
    after a last check). On any failure or interrupt the temporary file is removed and `path` is
    untouched.
    """
    path = Path(path)
    exists = f"{path} already exists: pass --force (overwrite=True) to replace it"
    if path.exists() and not overwrite:
        raise FileExistsError(exists)
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
                raise FileExistsError(exists) from None
            except OSError:
                if path.exists():
                    raise FileExistsError(exists) from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def encode(model: nn.Module) -> bytes:
    """The bytes of a converted model's checkpoint file (what `save` writes)."""
    pool = find_pool(model)
    tensors, aliases = _dedupe(model.state_dict())
    tensors[POOL_TENSOR] = tensors[POOL_TENSOR].to(pool.storage_dtype)
    spec = spec_json(pool, aliases, pool.info.get("original_bytes", 0))
    return safetensors.torch.save(tensors, metadata=_metadata(spec, tensors))


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a converted model as a checkpoint, atomically (see `write_atomic`)."""
    return write_atomic(path, encode(model), overwrite=overwrite)


def save_dense(state: dict[str, torch.Tensor], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a plain state dict as safetensors, atomically, every name with its own copy of its
    tensor (safetensors refuses shared memory, and every loader should find every key)."""
    seen: set[int] = set()
    unique = {}
    for name, t in state.items():
        unique[name] = t.clone() if t.numel() and t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    return write_atomic(path, safetensors.torch.save(unique, metadata={"format": "pt"}), overwrite=overwrite)


@dataclass
class Checkpoint:
    """A verified checkpoint in memory."""

    spec: dict
    tensors: dict[str, torch.Tensor]  # the dense tensors as stored (tied ones once)
    pool: RPSPool

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Every dense tensor under every name it has (tied dense tensors share memory)."""
        aliases = self.spec["dense_aliases"]
        return {**self.tensors, **{alias: self.tensors[name] for alias, name in aliases.items()}}


def read(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint: a corrupt, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason}): it is truncated, corrupt or not a checkpoint") from None
    if SPEC_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not an rpsconvert checkpoint (no '{SPEC_KEY}' metadata)")
    text = metadata[SPEC_KEY]
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        spec = None
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses format version {version}, newer than this rpsconvert reads ({FORMAT_VERSION}): upgrade rpsconvert")
    if metadata.get(DIGEST_KEY) != digest(text, tensors):
        raise CheckpointError(f"{path} is corrupt: its content does not match its sha256")
    try:
        return _parse(spec, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: invalid rpsconvert metadata ({exc})") from None


def _parse(spec: dict, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """The pool and the dense tensors a (digest-checked) spec describes, validated."""
    if spec["format"] != FORMAT or spec["hash"] != HASH_SPEC or spec["format_version"] < 1:
        raise ValueError(f"unknown format {spec['format']!r} version {spec['format_version']!r} hash {spec['hash']!r}")
    weights = [
        WeightSpec(w["name"], tuple(int(d) for d in w["shape"]), _dtype(w["dtype"]), int(w["offset"]), float(w["scale"]), tuple(w["aliases"]))
        for w in spec["weights"]
    ]
    if any(w.offset < 0 or min(w.shape, default=1) < 0 or not math.isfinite(w.scale) for w in weights):
        raise ValueError("a weight has a negative offset or dimension, or a scale that is not finite")
    check_seed(spec["seed"])
    get_mapping(spec["mapping"])
    pool_tensor = tensors.pop(spec["pool"]["tensor"])
    pool_spec = spec["pool"]
    if pool_tensor.ndim != 1 or not 0 < pool_tensor.numel() < MAX_SLOTS or pool_tensor.numel() != pool_spec["slots"]:
        raise ValueError(f"the pool must be a 1-D tensor of {pool_spec['slots']} slots, got shape {tuple(pool_tensor.shape)}")
    if dtype_name(pool_tensor.dtype) != pool_spec["dtype"]:
        raise ValueError(f"the pool is {dtype_name(pool_tensor.dtype)}, the spec says {pool_spec['dtype']}")
    dense_aliases = spec["dense_aliases"]
    if not set(dense_aliases.values()) <= set(tensors):
        raise ValueError("a dense alias names a tensor the file does not hold")
    compute_dtype = weights[0].dtype if weights else pool_tensor.dtype  # the pool works in the weights' dtype
    pool = RPSPool(pool_tensor.to(compute_dtype), spec["mapping"], spec["seed"], weights, storage_dtype=pool_tensor.dtype)
    pool.info.update(architecture=spec.get("architecture"), discovery=spec.get("discovery"), original_bytes=spec.get("original_bytes", 0))
    return Checkpoint(spec, tensors, pool)


def _check_skeleton(model: nn.Module, ckpt: Checkpoint, path: Path, strict: bool) -> None:
    """Raise before touching `model` if the checkpoint does not fit it, so that a failed load
    never leaves a half-converted skeleton behind."""
    mismatch = f"the model does not match {path}"
    if hasattr(model, POOL_ATTR) or hasattr(model, POOL_PARAM):
        raise CheckpointError(f"{mismatch}: it is already converted; pass a plain model of the original architecture")
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {name: s.shape for s in ckpt.pool.specs.values() for name in (s.name, *s.aliases)}
    for name, shape in expected.items():
        if name not in params:
            raise CheckpointError(f"{mismatch}: it has no parameter {name!r}")
        if tuple(params[name].shape) != shape:
            raise CheckpointError(f"{mismatch}: {name} has shape {tuple(params[name].shape)}, the checkpoint {shape}")
    own = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in expected}
    stored = {name: tuple(t.shape) for name, t in ckpt.dense_state().items()}
    for name in own.keys() & stored.keys():
        if own[name] != stored[name]:
            raise CheckpointError(f"{mismatch}: {name} has shape {own[name]}, the checkpoint {stored[name]}")
    missing, unexpected = sorted(own.keys() - stored.keys()), sorted(stored.keys() - own.keys())
    if strict and (missing or unexpected):
        detail = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for what, names in
                           (("not in the checkpoint", missing), ("not in the model", unexpected)) if names)
        raise CheckpointError(f"{mismatch}: {detail} (pass strict=False to ignore)")


def load(path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu", strict: bool = True) -> nn.Module:
    """Load a checkpoint into `model` (a skeleton of the original architecture, any weights; it is
    converted in place) or, without one, into a model rebuilt from the architecture in the file."""
    path = Path(path)
    ckpt = read(path)
    if model is None:
        model = _rebuild(ckpt.spec.get("architecture"), path)
    _check_skeleton(model, ckpt, path, strict)
    install(model, ckpt.pool)
    model.load_state_dict({**ckpt.dense_state(), POOL_TENSOR: ckpt.pool.pool.data}, strict=strict)
    return model.to(device)


def _rebuild(architecture: str | dict | None, path: Path) -> nn.Module:
    from rpsconvert.architectures import ArchitectureError, build

    skeleton = "pass a model of the original architecture, load(path, model=MyModel()), or use decompress(path) for a plain state dict"
    if not architecture:
        raise CheckpointError(f"{path} records no architecture: {skeleton}")
    try:
        return build(architecture)
    except ArchitectureError as exc:
        raise CheckpointError(f"{path}: {exc}; or {skeleton}") from None


def decompress(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict of a checkpoint: it loads with `load_state_dict(sd, strict=True)` into
    the original architecture, and needs no rpsconvert afterwards (deploy anywhere PyTorch runs)."""
    ckpt = read(path)
    state = ckpt.dense_state()
    with torch.no_grad():
        for weight in ckpt.pool.specs.values():
            dense = ckpt.pool.weight(weight.name).to(weight.dtype).contiguous()
            state.update(dict.fromkeys((weight.name, *weight.aliases), dense))
    return state
