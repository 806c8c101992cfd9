"""A model's chain of repeated blocks: a transformer's layers, a CNN's stages.

Calibration moves through the model block by block, and recovery distills each block's output;
both look for the blocks in the same place: the children of the ModuleList or Sequential (below
the root) that holds the most of the compressed weights.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn


def repeated_blocks(model: nn.Module, weight_names: Iterable[str]) -> list[str]:
    """The module names of the blocks, in order; empty when no list below the root holds any of
    `weight_names` (a plain Sequential model is one block, not a chain)."""
    names = list(weight_names)
    lists = [
        (sum(weight.startswith(f"{name}.") for weight in names), name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1
    ]
    most, prefix, container = max(lists, default=(0, "", None), key=lambda entry: entry[:2])
    return [f"{prefix}.{child}" for child, _ in container.named_children()] if most else []
