"""The plan for a byte budget: how many bits each slot gets, and so how many slots there are.

A budget can buy few precise slots or many coarse ones. Hashing k weights into a slot keeps about
1/k of a matrix's energy, while rounding to b bits adds noise about 2**-b of the block's peak, so
near the dense size precision is what to cut, and collisions only when bytes are scarce. The plan
projects the weights once per candidate storage, puts the pool on that storage's grid, and keeps
the candidate whose generated weights are closest to the originals: the mean over layers of the
relative squared error, so a small layer counts as much as a big one (each layer's error passes
through the network multiplicatively).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rpsconvert.engine.mapping import Mapping
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.projection import project
from rpsconvert.engine.storage import PoolStorage

# What the plan weighs against each other. Scales are float16 (half the bytes of float32 for the
# same measured quality: docs/quality.md); int4 in blocks of 32 and int8 in blocks of 64 are the
# block sizes measured best at their bytes, int2 (ternary) only pays at extreme budgets.
CANDIDATES = (
    PoolStorage(torch.float32),
    PoolStorage(torch.float16),
    PoolStorage(torch.float16, bits=8, block=64),
    PoolStorage(torch.float16, bits=4, block=32),
    PoolStorage(torch.float16, bits=2, block=32),
)


@dataclass(frozen=True)
class Candidate:
    """One way to spend the budget, with what it would cost and how far from the original it is."""

    storage: PoolStorage
    slots: int
    file_bytes: int  # the checkpoint's bytes, header and dense tensors included
    error: float  # mean over layers of ||W - W_generated||^2 / ||W||^2

    def row(self) -> dict:
        return {"storage": str(self.storage), "slots": self.slots, "file_bytes": self.file_bytes, "weight_error": self.error}


def weight_error(operator: PoolOperator, layout: Sequence[CompressedWeight], weights: Sequence[torch.Tensor], theta: torch.Tensor) -> float:
    """Mean over layers of the relative squared error of the weights `theta` generates."""
    errors = []
    with torch.no_grad():
        for spec, weight in zip(layout, weights):
            original = weight.detach().double()
            norm = float(original.square().sum())
            diff = float((operator.generate(theta, spec).double() - original).square().sum())
            errors.append(diff / norm if norm > 0 else float(diff > 0))
    return sum(errors) / max(len(errors), 1)


def choose(
    candidates: Sequence[tuple[PoolStorage, int, int]],
    mapping: Mapping,
    seed: int,
    weights: Sequence[torch.Tensor],
    layout_for: Callable[[int], list[CompressedWeight]],
) -> tuple[Candidate, list[Candidate]]:
    """The candidate (storage, slots, file bytes) with the least weight error, and all of them scored.

    `layout_for(slots)` gives the weights' layout (their scales depend on whether the pool is
    lossless). Ties go to the earlier candidate.
    """
    scored = []
    for storage, slots, file_bytes in candidates:
        operator = PoolOperator(mapping, slots, seed)
        layout = layout_for(slots)
        theta = storage.snap(project(operator, list(zip(layout, weights))).to(weights[0].dtype))
        scored.append(Candidate(storage, slots, file_bytes, weight_error(operator, layout, weights, theta)))
    return min(scored, key=lambda c: c.error), scored
