"""The .rps.safetensors checkpoint: save, read, load, decompress (format: docs/format.md, part 2).

A checkpoint is a plain safetensors file: the pool, every tensor kept dense under its state-dict
name, and two metadata strings: a versioned JSON manifest from which every compressed weight is
regenerated, and a sha256 over that manifest and the tensors. Nothing is unpickled on load, and a
file is written completely or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from rpsconvert.engine.modules import find_pool, install, is_converted, set_mode
from rpsconvert.engine.pool import RPSPool, check_mode
from rpsconvert.errors import ArchitectureError, CheckpointError
from rpsconvert.format.architectures import build
from rpsconvert.format.files import write_atomic
from rpsconvert.format.manifest import DIGEST_KEY, FORMAT_VERSION, MANIFEST_KEY, POOL_TENSOR, digest, manifest_json, parse
from rpsconvert.format.sizing import dedupe


def _metadata(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    text = json.dumps(manifest, separators=(",", ":"))
    return {MANIFEST_KEY: text, DIGEST_KEY: digest(text, tensors)}


def encode(model: nn.Module) -> bytes:
    """The bytes of a converted model's checkpoint file (what `save` writes)."""
    pool = find_pool(model)
    tensors, aliases = dedupe(model.state_dict())
    tensors.update({POOL_TENSOR + suffix: t for suffix, t in pool.storage.encode(tensors[POOL_TENSOR]).items()})
    manifest = manifest_json(pool, aliases, pool.info.get("original_bytes", 0))
    return safetensors.torch.save(tensors, metadata=_metadata(manifest, tensors))


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a converted model as a .rps.safetensors checkpoint.

    The file holds the pool, the seed, the per-layer scales and the tensors kept dense, nothing
    executable; it is written atomically, so an interrupted save leaves no partial file.

    Args:
        model: a model returned by `convert` or `load` (trained or not).
        path: where to write; the usual suffix is `.rps.safetensors`.
        overwrite: replace an existing file (otherwise OutputExistsError).

    Returns:
        The path written.

    Raises:
        OutputExistsError: `path` exists and `overwrite` is False.
        ValueError: `model` is not converted.

    Example:
        >>> save(convert(model, budget="1MB"), "model.rps.safetensors")
    """
    return write_atomic(path, encode(model), overwrite=overwrite)


@dataclass
class Checkpoint:
    """A verified checkpoint in memory."""

    manifest: dict
    tensors: dict[str, torch.Tensor]  # the dense tensors as stored (tied ones once)
    pool: RPSPool

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Every dense tensor under every name it has (tied dense tensors share memory)."""
        aliases = self.manifest["dense_aliases"]
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
    if MANIFEST_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not an rpsconvert checkpoint (no '{MANIFEST_KEY}' metadata)")
    text = metadata[MANIFEST_KEY]
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        manifest = None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses format version {version}, newer than this rpsconvert reads ({FORMAT_VERSION}): upgrade rpsconvert")
    if metadata.get(DIGEST_KEY) != digest(text, tensors):
        raise CheckpointError(f"{path} is corrupt: its content does not match its sha256")
    try:
        return Checkpoint(manifest, tensors, parse(manifest, tensors))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: invalid rpsconvert metadata ({exc})") from None


def _check_skeleton(model: nn.Module, ckpt: Checkpoint, path: Path, strict: bool) -> None:
    """Raise before touching `model` if the checkpoint does not fit it, so that a failed load
    never leaves a half-converted skeleton behind."""
    mismatch = f"the model does not match {path}"
    if is_converted(model):
        raise CheckpointError(f"{mismatch}: it is already converted; pass a plain model of the original architecture")
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {name: w.shape for w in ckpt.pool.weights.values() for name in (w.name, *w.aliases)}
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


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    device: str | torch.device = "cpu",
    strict: bool = True,
    mode: str = "lean",
) -> nn.Module:
    """Load a checkpoint as a converted model, ready to run, train or save again.

    The file is verified first (sha256 over manifest and tensors; nothing is unpickled), and
    checked against the model before the model is touched, so a failed load changes nothing.

    Args:
        path: a .rps.safetensors checkpoint written by `save` or the command line.
        model: a model of the original architecture (any weights: they are replaced; it is
            converted in place). Without one, the model is rebuilt from the architecture the file
            records (torchvision, timm or Hugging Face).
        device: where the model goes.
        strict: the dense tensors of the file and the model's must match name for name.
        mode: "lean" (the default: weights generated when used, so the model takes the memory
            the file was budgeted for) or "cached" (every weight generated once now, for the
            fastest inference under torch.no_grad(), at the dense model's memory); see `set_mode`.

    Returns:
        The converted model (`model` itself when given), in `mode`.

    Raises:
        CheckpointError: a missing, corrupt, foreign or newer-format file, a model that does not
            match it, or no recorded architecture to rebuild.
        ValueError: an unknown mode.

    Example:
        >>> small = load("resnet50.rps.safetensors", torchvision.models.resnet50())
    """
    check_mode(mode)
    path = Path(path)
    ckpt = read(path)
    if model is None:
        model = _rebuild(ckpt.manifest.get("architecture"), path)
    _check_skeleton(model, ckpt, path, strict)
    install(model, ckpt.pool)
    model.load_state_dict({**ckpt.dense_state(), POOL_TENSOR: ckpt.pool.pool.data}, strict=strict)
    return set_mode(model.to(device), mode)  # after the move, so a cache is made where it is used


def _rebuild(architecture: str | dict | None, path: Path) -> nn.Module:
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
        for weight in ckpt.pool.weights.values():
            dense = ckpt.pool.weight(weight.name).to(weight.dtype).contiguous()
            state.update(dict.fromkeys((weight.name, *weight.aliases), dense))
    return state
