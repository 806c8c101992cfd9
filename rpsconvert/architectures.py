"""Rebuild a model from the architecture spec recorded in a checkpoint (no weights, no pickle)."""

from __future__ import annotations

from torch import nn


class ArchitectureError(ValueError):
    """An architecture spec that cannot be built here."""


def build(spec: str | dict) -> nn.Module:
    """`"torchvision:resnet50"` or `{"source": "torchvision", "name": ..., "kwargs": {...}}` -> model."""
    if isinstance(spec, str):
        source, _, name = spec.partition(":")
        spec = {"source": source, "name": name, "kwargs": {}}
    source, name, kwargs = spec.get("source"), spec.get("name"), spec.get("kwargs", {})
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except (ValueError, KeyError) as exc:
            raise ArchitectureError(f"torchvision has no model {name!r}: {exc}") from None
    raise ArchitectureError(f"cannot rebuild the architecture {spec!r}: pass the model to load(path, model=...)")
