"""A model's skeleton from its files: the structure, with every parameter on the meta device.

A model larger than memory is converted (streaming.py) and distilled from (quality/sharding.py)
without being loaded, so both need the model's structure without its values: built from a Hugging
Face directory's config.json, in the dtype `from_pretrained` would give it, or from a recorded
architecture, with parameters on the meta device (no memory, no initialization) and buffers made
for real; and the files' name of each of its tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from rpsconvert.errors import ArchitectureError, InputError
from rpsconvert.format.architectures import build, identify, normalize, parameters_on_meta
from rpsconvert.format.lazy_weights import SafetensorsFiles

CONFIG_FILE = "config.json"


def skeleton(path: Path, arch: str | dict | None, files: SafetensorsFiles) -> tuple[nn.Module, str | dict | None]:
    """The model `path` holds with its parameters on the meta device (buffers are made for real:
    some, such as rotary frequencies, are computed and never stored), and its architecture."""
    if path.is_dir():
        return _hugging_face(path, files)
    if arch is None:
        raise InputError(f"{path} is a state dict, not a model: pass its architecture, for example {{arch}}", arch="torchvision:resnet50")
    try:
        with parameters_on_meta():
            model = build(arch)
    except ArchitectureError as exc:
        raise InputError(str(exc)) from None
    return model, normalize(arch)


def _hugging_face(path: Path, files: SafetensorsFiles) -> tuple[nn.Module, dict]:
    """A Hugging Face model's skeleton, in the dtype `from_pretrained` would give it (config.json's
    dtype, else the checkpoint's)."""
    cls, config = hugging_face_class(path)
    if cls.__name__ == "AutoModel":  # a config that names no class: the base model of its type
        cls = cls._model_mapping[type(config)]
    dtype = getattr(config, "dtype", None) or next((e.dtype for e in files.entries.values() if e.dtype.is_floating_point), torch.float32)
    with parameters_on_meta():
        model = cls._from_config(config, dtype=dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype)))
    return model, identify(model)


def hugging_face_class(path: Path) -> tuple[type, object]:
    """The transformers class a Hugging Face directory's config.json names (AutoModel when it names
    none) and its config, from transformers itself: rpsconvert never runs a model's own code."""
    if not (path / CONFIG_FILE).is_file():
        raise InputError(f"{path} is a directory without config.json: a Hugging Face model directory has config.json and model.safetensors")
    try:
        import transformers
    except ImportError:
        raise InputError(f"{path} is a Hugging Face model: pip install transformers to read it") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise InputError(f"cannot read {path / CONFIG_FILE} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    name = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and (issubclass(cls, transformers.PreTrainedModel) or name == "AutoModel")):
        raise InputError(f"{path}: transformers has no model class {name!r} (rpsconvert never runs a model's own code)")
    return cls, config


def file_keys(names: Iterable[str], model: nn.Module, files: SafetensorsFiles) -> dict[str, str]:
    """The files' name of each of `model`'s state-dict `names` that they hold: the same name, or
    with the model's base-model prefix added or removed (a checkpoint saved from a task model,
    loaded as its base model, and back), as `from_pretrained` matches them."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = {}
    for name in names:
        candidates = (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if prefix else (name,)
        found = next((candidate for candidate in candidates if candidate in files.entries), None)
        if found is not None:
            keys[name] = found
    return keys


def load_dense(model: nn.Module, files: SafetensorsFiles, keys: dict[str, str], compressed: set[str], path: Path) -> None:
    """Read every tensor but the `compressed` ones into the skeleton, in the model's own dtype, a
    tied tensor once (the same Parameter under each name); refuse a file that does not fit the model."""
    state = model.state_dict(keep_vars=True)
    ties: dict[int, list[str]] = {}
    for name, tensor in state.items():
        ties.setdefault(id(tensor), []).append(name)
    missing = [name for name in state if name not in compressed and not any(n in keys for n in ties[id(state[name])])]
    missing = [name for name in missing if state[name].device.type == "meta"]  # a buffer made at init need not be stored
    if missing:
        raise InputError(f"{path} does not fit the model it describes (missing: {', '.join(missing[:3])})")
    dense = {}
    for group in ties.values():
        if group[0] in compressed:
            continue
        stored = next((keys[n] for n in group if n in keys), None)
        if stored is None:
            continue
        like = state[group[0]]
        entry = files.entries[stored]
        if tuple(entry.shape) != tuple(like.shape):
            raise InputError(f"{path} does not fit the model: {stored} has shape {tuple(entry.shape)}, the model {tuple(like.shape)}")
        value = files.tensor(stored).to(like.dtype)
        value = nn.Parameter(value, requires_grad=like.requires_grad) if isinstance(like, nn.Parameter) else value
        dense.update(dict.fromkeys(group, value))
    model.load_state_dict(dense, strict=False, assign=True)
