"""What the command accepts as a model, read without running code the file's author chose.

A pickled model is the common way to hand over a PyTorch model, and unpickling can run arbitrary
code. So a pickle is read with `torch.load(weights_only=True)`, which only rebuilds tensors and
the classes it is allowed, and rpsconvert allows only layer and model classes of torch.nn,
torchvision and timm. Anything else needs the user's explicit `--trust-pickle`.
"""

from __future__ import annotations

import enum
import functools
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from rpsconvert.errors import ArchitectureError, InputError
from rpsconvert.format.architectures import build, identify, matches, normalize
from rpsconvert.format.skeleton import hugging_face_class
from rpsconvert.quality.batches import MAX_TOKENS, TEXT_SUFFIXES, Batch, load_calibration

# Modules whose nn.Module and Enum classes may be unpickled: their constructors and __setstate__
# only build layers. A class is imported (only from these packages) to check what it is.
SAFE_PACKAGES = ("torch.nn.modules.", "torchvision.models.", "torchvision.ops.", "timm.models.", "timm.layers.")
SAFE_GLOBALS = {"functools.partial": functools.partial}  # torchvision stores partial(nn.LayerNorm, eps=...)
# A tokenizer's vocabulary: without one, transformers makes an empty tokenizer that reads every word as unknown
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class ModelInput:
    model: nn.Module
    architecture: str | dict | None  # recorded in the checkpoint so that it loads without a skeleton
    output: Path  # where the converted model goes by default: <stem>.rps.safetensors


def _safe_global(name: str) -> object | None:
    """The object a pickle's global `module.attr` names, if it is on the allowlist, else None."""
    if name in SAFE_GLOBALS:
        return SAFE_GLOBALS[name]
    module_name, _, attr = name.rpartition(".")
    if not (module_name + ".").startswith(SAFE_PACKAGES):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, (nn.Module, enum.Enum)) else None


def load_pickle(path: str | os.PathLike, *, trust: bool = False) -> object:
    """`torch.load` a file, allowing only safe classes unless `trust` (`--trust-pickle`) is given.

    The globals the pickle needs are listed before anything is unpickled, so a refused file runs
    nothing, and the message names what was refused.
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    advice = "if you trust whoever made it, pass {trust_pickle}, or save a state dict and pass its {arch}"
    options = {"trust_pickle": True, "arch": "SOURCE:NAME"}
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a zip-format torch file: it cannot be inspected without unpickling
        raise InputError(f"cannot check {path} for unsafe content ({_first_line(exc)}): {advice}", **options) from None
    allowed = {name: _safe_global(name) for name in needed}
    refused = sorted(name for name, obj in allowed.items() if obj is None)
    if refused:
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise InputError(f"{path} needs {shown} to unpickle, and unpickling a class can run any code its author chose: {advice}", **options)
    try:
        with torch.serialization.safe_globals(list(allowed.values())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read {path} safely ({_first_line(exc)}): {advice}", **options) from None


def read_model(source: str, *, arch: str | dict | None = None, trust_pickle: bool = False) -> ModelInput:
    """A model from a pickled module, a state-dict file with `arch`, a local Hugging Face directory
    or a name such as `torchvision:resnet50` (with that library's pretrained weights).

    `arch` builds the model of a state-dict file; given with a pickled module, it must match the
    module and is what the checkpoint records.
    """
    path = Path(source)
    if path.is_dir():
        return _hugging_face(path)
    if path.is_file():
        loaded = _read_file(path, trust_pickle)
        output = default_output(path)
        if isinstance(loaded, nn.Module):
            return ModelInput(loaded, _module_architecture(loaded, arch, path), output)
        return ModelInput(_from_state_dict(loaded, arch, path), normalize(arch) if arch else None, output)
    library, _, name = source.partition(":")
    if library in ("torchvision", "timm") and name:
        return _pretrained(source, name)
    raise InputError(f"{source}: no such file or directory, nor a model name such as torchvision:resnet50 or timm:resnet50")


def default_output(path: Path) -> Path:
    """Where the converted model goes by default: beside MODEL, as <its name>.rps.safetensors."""
    return path.parent / f"{path.name}.rps.safetensors" if path.is_dir() else path.with_name(path.stem + ".rps.safetensors")


def _read_file(path: Path, trust_pickle: bool) -> object:
    if path.suffix != ".safetensors":
        return load_pickle(path, trust=trust_pickle)
    from rpsconvert.format.manifest import MANIFEST_KEY

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of bad file
        raise InputError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
    if MANIFEST_KEY in metadata:
        raise InputError(f"{path} is already an rpsconvert checkpoint: convert the original model instead")
    return tensors


def _module_architecture(model: nn.Module, arch: str | dict | None, path: Path) -> str | dict | None:
    if arch is None:
        return identify(model)
    if not matches(arch, model):
        raise InputError(f"{{arch}} does not build a model with the tensors of {path}: check the name and its options", arch=arch)
    return normalize(arch)


def _from_state_dict(state: object, arch: str | dict | None, path: Path) -> nn.Module:
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise InputError(f"{path} holds a {type(state).__name__}, neither a model nor a state dict of tensors")
    if arch is None:
        raise InputError(f"{path} is a state dict, not a model: pass its architecture, for example {{arch}}", arch="torchvision:resnet50")
    model = _build(arch)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ; torch lists them one per line after a heading
        lines = str(exc).splitlines()
        raise InputError(f"{path} does not fit {{arch}} ({lines[min(1, len(lines) - 1)].strip()})", arch=arch) from None
    # Tied weights are often saved once (safetensors refuses shared tensors): a key missing from
    # the file is fine when the model ties it to a key that is there.
    tied = {name for names in _tied_names(model) if set(names) & state.keys() for name in names}
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        detail = "; ".join(f"{what}: {', '.join(names[:3])}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names)
        raise InputError(f"{path} does not fit {{arch}} ({detail})", arch=arch)
    return model


def _tied_names(model: nn.Module) -> list[list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _build(arch: str | dict, *, pretrained: bool = False) -> nn.Module:
    try:
        return build(arch, pretrained=pretrained)
    except ArchitectureError as exc:
        raise InputError(str(exc)) from None


def _pretrained(architecture: str, name: str) -> ModelInput:
    try:
        model = _build(architecture, pretrained=True)
    except OSError as exc:  # a download that failed
        raise InputError(f"cannot get the pretrained weights of {architecture} ({_first_line(exc)}): check the network, "
                         "or pass a weights file and its {arch}", arch=architecture) from None
    return ModelInput(model, architecture, Path(re.sub(r"[^\w.-]", "_", name) + ".rps.safetensors"))


def _hugging_face(path: Path) -> ModelInput:
    """A local Hugging Face model: config.json and model.safetensors (no pickle, no remote code)."""
    cls, _ = hugging_face_class(path)
    try:
        model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise InputError(f"cannot read the Hugging Face model in {path} ({_first_line(exc)})") from None
    return ModelInput(model, identify(model), default_output(path))


def read_calibration(path: Path, model: str, holdout: float = 0.2) -> tuple[list[Batch], list[Batch]]:
    """`--calibrate FILE` (and verify's `--data FILE`): calibration and held-out batches.

    Tensor files are read as `load_calibration` reads them. A text file (`.txt`, one example per
    line) is tokenized with the tokenizer saved in MODEL, a Hugging Face directory, so a text model
    is calibrated on sentences rather than on token ids prepared by hand.
    """
    if path.suffix.lower() not in TEXT_SUFFIXES:
        return load_calibration(path, holdout)
    directory = Path(model)
    if not (directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)):
        raise InputError(f"{path} is text, and {model} has no tokenizer: pass tensors saved with torch.save/safetensors, "
                         "or a Hugging Face directory with its tokenizer files")
    tokenizer, max_length = _tokenizer(directory)
    return load_calibration(path, holdout, tokenizer=tokenizer, max_length=max_length)


def _tokenizer(directory: Path) -> tuple[object, int]:
    """The tokenizer saved in a Hugging Face directory (offline; remote code refused), and the most
    tokens an example may take: MAX_TOKENS, or fewer if the model's position table is shorter."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"{directory} is a Hugging Face model: pip install transformers to read its tokenizer") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad tokenizer or config
        raise InputError(f"cannot read the tokenizer in {directory} ({_first_line(exc)})") from None
    positions = getattr(config, "max_position_embeddings", None)
    return tokenizer, min(MAX_TOKENS, positions) if isinstance(positions, int) and positions > 0 else MAX_TOKENS


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

