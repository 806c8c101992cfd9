"""Architectures: a few recorded words that rebuild a model's structure without pickle.

A checkpoint records how to rebuild its model so that it loads without a skeleton. An architecture is a
string `"SOURCE:NAME"` or a dict `{"source": ..., "name": ..., "kwargs": {...}}`; a Hugging Face
architecture carries the model's whole config instead of kwargs, because a local model has no name to look
up. Every source is imported only when an architecture needs it.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from rpsconvert.errors import ArchitectureError

SOURCES = ("torchvision", "timm", "transformers")


def normalize(architecture: str | dict) -> dict:
    """`"torchvision:resnet50"` -> `{"source": "torchvision", "name": "resnet50", "kwargs": {}}`."""
    if isinstance(architecture, str):
        source, _, name = architecture.partition(":")
        architecture = {"source": source, "name": name}
    if not isinstance(architecture, dict) or architecture.get("source") not in SOURCES or not architecture.get("name"):
        raise ArchitectureError(
            f"cannot read the architecture {architecture!r}: write SOURCE:NAME with SOURCE one of {', '.join(SOURCES)}, "
            "for example torchvision:resnet50"
        )
    return {"kwargs": {}, **architecture}


def build(architecture: str | dict, *, pretrained: bool = False) -> nn.Module:
    """The model an architecture names, randomly initialized (or with its library's pretrained weights)."""
    architecture = normalize(architecture)
    source, name, kwargs = architecture["source"], architecture["name"], architecture["kwargs"]
    try:
        if source == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
        if source == "timm":
            import timm

            return timm.create_model(name, pretrained=pretrained, **kwargs)
        return _build_transformers(name, architecture.get("config", {}))
    except ArchitectureError:
        raise
    except ImportError as exc:
        raise ArchitectureError(f"the architecture {source}:{name} needs {exc.name or source}: pip install {source}") from None
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ArchitectureError(f"{source} cannot build {name!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _build_transformers(name: str, config: dict) -> nn.Module:
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArchitectureError(f"transformers has no model class {name!r}")
    config = cls.config_class.from_dict(config)
    dtype = getattr(config, "dtype", None)  # what from_pretrained builds it in: a bf16 model's dense tensors stay bf16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return cls._from_config(config, dtype=dtype) if isinstance(dtype, torch.dtype) else cls(config)


def transformers_architecture(model: nn.Module) -> dict:
    """The architecture of a Hugging Face model: its class and its full config (defaults change between
    transformers versions, so the whole config is recorded, not only its differences)."""
    return {"source": "transformers", "name": type(model).__name__, "config": json.loads(model.config.to_json_string())}


def matches(architecture: str | dict, model: nn.Module) -> bool:
    """Whether `architecture` builds a model with exactly `model`'s state-dict names and shapes.

    The candidate is built on the meta device: no memory and no weight init, so checking a
    ResNet-152 costs milliseconds.
    """
    try:
        with torch.device("meta"):
            candidate = build(architecture)
    except Exception:  # a candidate that cannot be built (on meta, or at all) simply does not match
        return False
    return _shapes(candidate) == _shapes(model)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def identify(model: nn.Module) -> str | dict | None:
    """The architecture that rebuilds `model`, for torchvision, timm and Hugging Face classes; else None.

    Only libraries already imported are consulted: a model of a library that was never imported
    cannot be one of its classes.
    """
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return transformers_architecture(model)
    return next((architecture for architecture in _candidates(model) if matches(architecture, model)), None)


def _candidates(model: nn.Module) -> list[str | dict]:
    module = type(model).__module__
    names: list[str] = []
    if module.startswith("torchvision.models."):
        import torchvision

        names = [f"torchvision:{n}" for n in torchvision.models.list_models() if torchvision.models.get_model_builder(n).__module__ == module]
    elif module.startswith("timm.models.") and isinstance(getattr(model, "pretrained_cfg", None), dict):
        names = [f"timm:{model.pretrained_cfg.get('architecture')}"]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classes = getattr(model, "num_classes", linears[-1].out_features if linears else None)
    with_classes = [{**normalize(n), "kwargs": {"num_classes": classes}} for n in names] if classes else []
    return [*names, *with_classes]


def input_shape(architecture: str | dict) -> tuple[int, ...] | None:
    """One input sample's shape as the architecture's library states it, for random inputs where
    there are no example ones: timm's pretrained_cfg `input_size`, the crop of torchvision's
    default weights' classification transforms, a Hugging Face vision config's channels and image
    size. None where the library states none (text models take token ids; detection, segmentation
    and video transforms name no one image size), or is not installed."""
    architecture = normalize(architecture)
    source, name = architecture["source"], architecture["name"]
    try:
        if source == "timm":
            import timm

            stated = timm.get_pretrained_cfg(name)
            return tuple(stated.input_size) if stated is not None else None
        if source == "torchvision":
            import torchvision

            transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
            return (3, *transforms.crop_size * 2) if type(transforms).__name__ == "ImageClassification" else None
    except (ImportError, ValueError, KeyError):  # not installed, or a name it does not register
        return None
    config = architecture.get("config", {})  # transformers: the recorded config
    side, channels = config.get("image_size"), config.get("num_channels")
    if not isinstance(channels, int) or not isinstance(side, (int, list)):
        return None
    return (channels, *([side] * 2 if isinstance(side, int) else side))


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers meanwhile goes to the meta device: a model's skeleton
    costs no memory and its initialization no time, while its buffers are made as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
