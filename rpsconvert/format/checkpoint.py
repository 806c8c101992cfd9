"""The .rps.safetensors checkpoint: save, read, load, decompress (format: docs/format.md, part 2).

A checkpoint is a plain safetensors file: the pool, every tensor kept dense under its state-dict
name, and two metadata strings: a versioned JSON manifest from which every compressed weight is
regenerated, and a sha256 over that manifest and the tensors. Nothing is unpickled on load, and a
file is written completely or not at all.

A converted Hugging Face model can also be written as a model directory, the layout its users
expect: `model.rps.safetensors` (or, beyond a shard size, shards and their index: format/shards.py),
`config.json` and the tokenizer files, written all at once too.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from torch import nn

from rpsconvert.engine.budget import parse_bytes
from rpsconvert.engine.modules import find_pool, install, is_converted, set_mode
from rpsconvert.engine.pool import RPSPool, check_mode
from rpsconvert.errors import ArchitectureError, CheckpointError
from rpsconvert.format.architectures import build, parameters_on_meta
from rpsconvert.format.files import save_dense, write_atomic, write_directory_atomic
from rpsconvert.format.model_card import model_card
from rpsconvert.format.transformers_loading import LOADER_KEYS, NEEDS_RPSCONVERT, quantization_config
from rpsconvert.format.manifest import (
    DIGEST_KEY, FORMAT_VERSION, MANIFEST_KEY, POOL_TENSOR, digest, manifest_json, module_versions, parse, state_metadata,
)
from rpsconvert.format.serialized import Deferred, Serialized, serialize
from rpsconvert.format.shards import INDEX_FILE, SHARD_KEY, is_shard, shard_files, split
from rpsconvert.format.sizing import dedupe


CHECKPOINT_FILE = "model.rps.safetensors"  # the checkpoint inside a model directory
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"  # the model card (format/model_card.py)
# What a Hugging Face tokenizer is saved as (fast, slow BPE and WordPiece, sentencepiece), copied as they are
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
SOURCE_FILES = (*TOKENIZER_FILES, "generation_config.json")  # copied from a Hugging Face directory as they are


def _metadata(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    text = json.dumps(manifest, separators=(",", ":"))
    return {MANIFEST_KEY: text, DIGEST_KEY: digest(text, tensors)}


def encode(model: nn.Module) -> bytes:
    """The bytes of a converted model's checkpoint file (what `save` writes)."""
    return bytes(serialized(model))


def serialized(model: nn.Module) -> Serialized:
    """A converted model's checkpoint file as its header and tensors (format/serialized.py): what
    `save` writes without first joining the bytes in memory."""
    return serialize(*_contents(model))


def _contents(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a converted model's checkpoint stores and its metadata (manifest and digest)."""
    pool = find_pool(model)
    state = model.state_dict()
    held = pool.tensors  # the pool as the model holds it: written as the file stores it instead
    tensors, aliases = dedupe({name: t for name, t in state.items() if name not in held})
    tensors.update({POOL_TENSOR + suffix: t for suffix, t in pool.stored().items()})
    manifest = manifest_json(pool, aliases, pool.info.get("original_bytes", 0), module_versions(state))
    return tensors, _metadata(manifest, tensors)


def save(
    model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, tokenizer_from: str | os.PathLike | None = None,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a converted model as a .rps.safetensors checkpoint, or as a model directory.

    The file holds the pool, the seed, the per-layer scales and the tensors kept dense, nothing
    executable; it is written atomically, so an interrupted save leaves no partial file. A `path`
    ending in "/" (or naming an existing directory) gets a model directory instead (`save_directory`):
    the checkpoint as `model.rps.safetensors`, a Hugging Face model's `config.json`, and the tokenizer
    files of `tokenizer_from`; `load` and `from_pretrained` read it back.

    Args:
        model: a model returned by `convert` or `load` (trained or not).
        path: where to write; the usual suffix is `.rps.safetensors`, "outdir/" for a directory
            (a string: pathlib drops a trailing slash).
        overwrite: replace an existing file or model directory (otherwise OutputExistsError).
        tokenizer_from: a Hugging Face model directory whose tokenizer files the model directory gets.
        max_shard_size: a model directory's checkpoint larger than this ("5GB" or bytes) is written
            as shards of at most this size and their index (docs/format.md, "Sharded checkpoints").
            Default: the `shard_size` the model was converted with (its budget counts the shards),
            else one file.

    Returns:
        The path written.

    Raises:
        OutputExistsError: `path` exists and `overwrite` is False, or is a directory of other files.
        ValueError: `model` is not converted, or `tokenizer_from` or `max_shard_size` is given for a file.

    Example:
        >>> save(convert(model, budget="1MB"), "model.rps.safetensors")
        >>> save(convert(bert, ratio=0.1), "bert-rps/", tokenizer_from="bert")  # then from_pretrained("bert-rps")
    """
    if is_directory(path):
        return save_directory(model, path, overwrite=overwrite, tokenizer_from=tokenizer_from, max_shard_size=max_shard_size)
    if tokenizer_from is not None or max_shard_size is not None:
        what = "tokenizer files go" if tokenizer_from is not None else "shards go"
        raise ValueError(f"{what} into a model directory: end the path with '/' ({os.fspath(path)}/)")
    return write_atomic(path, serialized(model), overwrite=overwrite)


def is_directory(path: str | os.PathLike) -> bool:
    """Whether `save` writes a model directory at `path`: one written with a trailing slash, or an
    existing directory."""
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def save_directory(
    model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, tokenizer_from: str | os.PathLike | None = None,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a converted model as a model directory, all its files at once (files.py
    `write_directory_atomic`): `model.rps.safetensors`, or its shards and index beyond
    `max_shard_size` (see `save`); for a Hugging Face model a `config.json` that transformers'
    `from_pretrained` loads through rpsconvert's quantizer (format/transformers_loading.py); the
    model card `README.md`; and the tokenizer and generation files found in `tokenizer_from`.
    Returns the directory."""
    files = checkpoint_files(model, max_shard_size)
    name = INDEX_FILE if INDEX_FILE in files else CHECKPOINT_FILE
    manifest = _manifest_of(files.get(CHECKPOINT_FILE) or next(iter(files.values())))
    config = _config_json(model, manifest, name)
    if config is not None:
        files[CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True).encode() + b"\n"
    files[CARD_FILE] = model_card(manifest, sum(map(len, files.values())), config).encode()
    if tokenizer_from is not None:
        source = Path(tokenizer_from)
        files.update({name: (source / name).read_bytes() for name in SOURCE_FILES if (source / name).is_file()})
    old_shards = [entry.name for entry in Path(path).iterdir() if is_shard(entry.name)] if Path(path).is_dir() else []
    replaceable = (CHECKPOINT_FILE, INDEX_FILE, *old_shards, CONFIG_FILE, CARD_FILE, *SOURCE_FILES)
    return write_directory_atomic(path, files, overwrite=overwrite, replaceable=replaceable)


def checkpoint_files(model: nn.Module, max_shard_size: str | int | None = None) -> dict[str, bytes | Serialized]:
    """A converted model's checkpoint as the files of a model directory: `model.rps.safetensors`,
    or, when that would exceed `max_shard_size` (default: the `shard_size` it was converted with),
    its shards and index (format/shards.py). Their bytes add up to what the budget counted."""
    tensors, metadata = _contents(model)
    single = serialize(tensors, metadata)
    limit = max_shard_size if max_shard_size is not None else find_pool(model).info.get("shard_size")
    limit = parse_bytes(limit) if limit is not None else None
    if limit is None or len(single) <= limit:
        return {CHECKPOINT_FILE: single}
    return split(tensors, metadata, limit)


def _manifest_of(data: bytes | Serialized) -> dict:
    """The manifest in a checkpoint's bytes (`encode`, a Serialized file or its first shard), read from its safetensors header."""
    data = data.header if isinstance(data, Serialized) else data
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return json.loads(header["__metadata__"][MANIFEST_KEY])


def _config_json(model: nn.Module, manifest: dict, checkpoint: str) -> dict | None:
    """A Hugging Face model's config.json naming its class in `architectures`, as `save_pretrained`
    writes it, so that transformers' tools read the directory; in full, since defaults change between
    transformers versions. Its `quantization_config` and `transformers_weights` make
    `from_pretrained` load the checkpoint with rpsconvert, or refuse it in one line without it
    (format/transformers_loading.py). None for other models: only an imported transformers can have
    made the model, so none is imported here."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.__dict__.pop("quantization_config", None)  # a model loaded by transformers: ours comes next
    written = json.loads(config.to_json_string(use_diff=False))
    # transformers builds the model in this dtype; unset, it takes the checkpoint's first float tensor's (a block scale's float16)
    written["dtype"] = written.get("dtype") or manifest["weights"][0]["dtype"]
    written["quantization_config"] = quantization_config(manifest, checkpoint)
    written["transformers_weights"] = NEEDS_RPSCONVERT
    return written


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names: itself, or the `model.rps.safetensors` of a model directory, or
    the shard index of a sharded one (format/shards.py)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return path / INDEX_FILE if (path / INDEX_FILE).is_file() and not (path / CHECKPOINT_FILE).is_file() else path / CHECKPOINT_FILE


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """The bytes of the checkpoint `path` names (`checkpoint_file`): a sharded one's shards and
    index together, which is what its budget counted."""
    file = checkpoint_file(path)
    if file.name != INDEX_FILE:
        return file.stat().st_size
    return file.stat().st_size + sum(shard.stat().st_size for shard in shard_files(file.parent)[0])


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
    """Read and verify a checkpoint (a file, or a model directory's, sharded or not): a corrupt,
    truncated or foreign file, or a lone shard, is a CheckpointError."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.name == INDEX_FILE:
        metadata, tensors = _read_shards(path.parent)
    else:
        metadata, tensors = _read_file(path)
        if SHARD_KEY in metadata:
            raise CheckpointError(f"{path} is one shard of a sharded checkpoint: read its directory, which holds {metadata[SHARD_KEY]} and every shard")
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


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason}): it is truncated, corrupt or not a checkpoint") from None


def _read_shards(directory: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A sharded checkpoint's metadata (its first shard's) and the tensors of all its shards, each
    where the index says it is (the digest then covers them all, as for one file)."""
    files, weight_map = shard_files(directory)
    metadata, tensors = {}, {}
    for file in files:
        meta, found = _read_file(file)
        if MANIFEST_KEY in meta:
            if metadata:
                raise CheckpointError(f"{directory}: two shards hold a manifest; the checkpoint is corrupt")
            metadata = meta
        tensors.update(found)
        misplaced = [name for name in found if weight_map.get(name) != file.name]
        if misplaced:
            raise CheckpointError(f"{file} holds {misplaced[0]}, which {INDEX_FILE} places elsewhere: the checkpoint is corrupt")
    if not metadata:
        raise CheckpointError(f"{directory}: no shard of {INDEX_FILE} holds the manifest: the checkpoint is corrupt")
    lost = sorted(weight_map.keys() - tensors.keys())
    if lost:
        raise CheckpointError(f"{directory}: {lost[0]} is in {INDEX_FILE} but in no shard: the checkpoint is corrupt")
    return metadata, tensors


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
        path: a .rps.safetensors checkpoint written by `save` or the command line, or a model
            directory holding one.
        model: a model of the original architecture (any weights: they are replaced; it is
            converted in place). Without one, the model is rebuilt from the architecture the file
            records (torchvision, timm or Hugging Face), else from a model directory's config.json.
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
    path = path.parent if path.name == INDEX_FILE else path  # a sharded checkpoint is its directory
    ckpt = read(path)
    rebuilt = model is None
    if rebuilt:
        model = _rebuild(ckpt.manifest.get("architecture"), path)
    _check_skeleton(model, ckpt, path, strict)
    install(model, ckpt.pool)
    if rebuilt:
        _assign(model, ckpt.dense_state(), path)
    else:
        state = OrderedDict({**ckpt.dense_state(), **{name: t.data for name, t in ckpt.pool.tensors.items()}})
        # the layout versions of the skeleton's own modules: safetensors cannot carry torch's
        # `_metadata`, and some modules refuse a state dict without it (torchvision's MNASNet 0.75)
        state._metadata = model.state_dict()._metadata
        model.load_state_dict(state, strict=strict)
    return set_mode(model.to(device), mode)  # after the move, so a cache is made where it is used


def _assign(model: nn.Module, dense: dict[str, torch.Tensor], path: Path) -> None:
    """Put the checkpoint's dense tensors into a skeleton rebuilt with its parameters on the meta
    device, as they are (no copy); parameters the skeleton ties stay one Parameter. A skeleton
    built with real parameters would hold the dense model's bytes for a moment, and the peak is
    what a memory budget has to count: loading a 33 MB checkpoint of a 134M-weight Llama peaked
    at 15 times the file that way, once its compressed weights' initialization was counted."""
    ties: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    state = OrderedDict(dense)
    state._metadata = model.state_dict()._metadata  # as above: the modules' layout versions
    model.load_state_dict(state, strict=False, assign=True)
    for first, *others in ties.values():
        for name in others:  # assign gave each name its own Parameter: one again, as the model tied them
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, model.get_parameter(first))
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path} holds no value for {', '.join(left[:3])}, which its architecture has: pass the model, load(path, model=...)")


def from_pretrained(directory: str | os.PathLike, *, device: str | torch.device = "cpu", mode: str = "lean") -> nn.Module:
    """A converted model from a model directory `save` wrote, rebuilt without a skeleton and in eval
    mode, as transformers' `from_pretrained` returns a model; `load` has the other options.

    Example:
        >>> bert = from_pretrained("bert-rps")
    """
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory} is not a directory: from_pretrained reads a model directory (save(model, 'dir/')), load reads a file")
    return load(directory, device=device, mode=mode).eval()


def _rebuild(architecture: str | dict | None, path: Path) -> nn.Module:
    skeleton = "pass a model of the original architecture, load(path, model=MyModel()), or use decompress(path) for a plain state dict"
    if not architecture and (path / CONFIG_FILE).is_file():  # a model directory of a model converted without its architecture
        architecture = _config_architecture(path / CONFIG_FILE, skeleton)
    if not architecture:
        raise CheckpointError(f"{path} records no architecture: {skeleton}")
    try:
        with parameters_on_meta():  # filled from the file (`_assign`): no dense copy, no initialization
            return build(architecture)
    except ArchitectureError as exc:
        raise CheckpointError(f"{path}: {exc}; or {skeleton}") from None


def _config_architecture(file: Path, skeleton: str) -> dict:
    """The Hugging Face architecture a model directory's config.json names (its class and config)."""
    try:
        config = json.loads(file.read_text())
        model_config = {key: value for key, value in config.items() if key not in LOADER_KEYS}  # what loads it, not what it is
        return {"source": "transformers", "name": config["architectures"][0], "config": model_config}
    except (ValueError, KeyError, IndexError, TypeError):
        raise CheckpointError(f"{file} names no model class (no 'architectures' list): {skeleton}") from None


def decompress(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict of a checkpoint: it loads with `load_state_dict(sd, strict=True)` into
    the original architecture, and needs no rpsconvert afterwards (deploy anywhere PyTorch runs)."""
    ckpt = read(path)
    made: dict[int, torch.Tensor] = {}  # a tied weight is generated once, the same tensor under each name
    state = OrderedDict()
    for name, t in _deferred_state(ckpt).items():
        state[name] = made.setdefault(id(t), t.make()) if isinstance(t, Deferred) else t
    state._metadata = state_metadata(state, ckpt.manifest.get("module_versions", {}))
    return state


def write_dense(path: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the state dict `decompress` gives as one safetensors file, atomically, each compressed
    weight generated as it is written: the memory is the checkpoint and one weight, not the dense
    model (a 7B model's is 13.5 GB in bf16)."""
    return save_dense(_deferred_state(read(path)), output, overwrite=overwrite)


def _deferred_state(ckpt: Checkpoint) -> dict[str, torch.Tensor | Deferred]:
    """A checkpoint's dense state dict with every compressed weight Deferred (format/serialized.py),
    a tied one the same Deferred under each of its names."""
    state: dict[str, torch.Tensor | Deferred] = OrderedDict(ckpt.dense_state())

    def generate(weight) -> torch.Tensor:
        with torch.no_grad():
            return ckpt.pool.weight(weight.name).to(weight.dtype).contiguous()

    for weight in ckpt.pool.weights.values():
        deferred = Deferred(weight.dtype, weight.shape, lambda w=weight: generate(w))
        state.update(dict.fromkeys((weight.name, *weight.aliases), deferred))
    return state
