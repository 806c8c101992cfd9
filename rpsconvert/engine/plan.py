"""The plan for a byte budget: how many bits each slot gets, and so how many slots there are.

A budget can buy few precise slots or many coarse ones. Hashing k weights into a slot keeps about
1/k of a matrix's energy, while rounding to b bits adds noise about 2**-b of the block's peak, so
near the dense size precision is what to cut, and collisions only when bytes are scarce. The plan
projects the weights once per candidate storage, puts the pool on that storage's grid, and keeps
the candidate whose generated weights are closest to the originals: the mean over layers of the
relative squared error, so a small layer counts as much as a big one (each layer's error passes
through the network multiplicatively). Weighing each element's error by its input feature's mean
square on example inputs (the output error's diagonal, as activation-aware quantizers do) was
measured and dropped: on a pretrained MobileNetV2 at 1/4, 1/6 and 1/8 of the bytes it chose the
same mixes, within one or two crops of agreement (docs/quality.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rpsconvert.engine.mapping import Mapping
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.projection import project
from rpsconvert.engine.storage import MixedStorage, PoolStorage

# What the plan weighs against each other: float32, float16 and every integer width from 8 down to
# 2 bits. Scales are float16: half the bytes of float32 scales, the same agreement on a pretrained
# MobileNetV2 (docs/quality.md, "Pool storage"), where blocks of 32 kept int8 at 100 % top-1
# agreement and blocks of 64 and 128 lost 3 and 6 points. Every width earns its place: each bit
# cuts the rounding error about fourfold, and a budget between two widths is met by a per-layer
# mix of those two (see `mixed`), so the finer the ladder the less a budget wastes on the coarser.
QUANTIZED = tuple(PoolStorage(torch.float16, bits=bits, block=32) for bits in range(8, 1, -1))
CANDIDATES = (PoolStorage(torch.float32), PoolStorage(torch.float16), *QUANTIZED)
# Neighbouring widths a lossless pool may mix, layer by layer; at most one pair straddles a budget.
MIXES = tuple(zip(QUANTIZED, QUANTIZED[1:]))


@dataclass(frozen=True)
class Candidate:
    """One way to spend the budget, with what it would cost and how far from the original it is."""

    storage: PoolStorage | MixedStorage
    slots: int
    file_bytes: int  # the checkpoint's bytes, header and dense tensors included
    error: float  # mean over layers of ||W - W_generated||^2 / ||W||^2

    def row(self) -> dict:
        return {"storage": str(self.storage), "slots": self.slots, "file_bytes": self.file_bytes, "weight_error": self.error}


def layer_errors(operator: PoolOperator, layout: Sequence[CompressedWeight], weights: Sequence[torch.Tensor], theta: torch.Tensor) -> list[float]:
    """The relative squared error of each weight `theta` generates."""
    errors = []
    with torch.no_grad():
        for spec, weight in zip(layout, weights):
            original = weight.detach().double()
            norm = float(original.square().sum())
            diff = float((operator.generate(theta, spec).double() - original).square().sum())
            errors.append(diff / norm if norm > 0 else float(diff > 0))
    return errors


def weight_error(operator: PoolOperator, layout: Sequence[CompressedWeight], weights: Sequence[torch.Tensor], theta: torch.Tensor) -> float:
    """Mean over layers of the relative squared error of the weights `theta` generates."""
    errors = layer_errors(operator, layout, weights, theta)
    return sum(errors) / max(len(errors), 1)


def mixed(
    operator: PoolOperator,
    layout: Sequence[CompressedWeight],
    weights: Sequence[torch.Tensor],
    high: PoolStorage,
    low: PoolStorage,
    room: Callable[[MixedStorage], int],
) -> MixedStorage | None:
    """Mixed precision per layer for a lossless pool (one slot per element): every layer starts at
    `high`; the layers whose error grows least per byte saved move to `low` until the pool's bytes
    fit `room(storage)` (the budget left once the header, which lists the runs, is paid); of the
    layer that tips the balance only as many slots move as the budget needs.

    The greedy order is the knapsack heuristic of mixed-precision allocators (HAWQ's, llama.cpp's
    target size): a big layer that int4 barely hurts saves the most bytes for the least error.
    None when even all `low` does not fit.
    """
    theta = project(operator, list(zip(layout, weights))).to(weights[0].dtype)
    gain = [
        (b - a) / max(w.numel * (high.bits - low.bits), 1)
        for a, b, w in zip(*(layer_errors(operator, layout, weights, s.snap(theta)) for s in (high, low)), layout)
    ]
    device = weights[0].device
    bits = torch.full((operator.slots,), high.bits, dtype=torch.int8, device=device)
    parts = {high.bits: high, low.bits: low}

    def fits(bits: torch.Tensor) -> MixedStorage | None:
        storage = MixedStorage.from_bits(bits, parts)
        return storage if storage.bytes(operator.slots) <= room(storage) else None

    if fits(bits):
        return fits(bits)
    for step in sorted(range(len(layout)), key=gain.__getitem__):
        slots = torch.nonzero(operator.counts([layout[step]], device) > 0).flatten()
        trial = bits.clone()
        trial[slots] = low.bits
        if not fits(trial):
            bits = trial
            continue
        # this layer tips it: move only as many of its slots as the budget needs, so no byte idles
        few, many = 0, len(slots)  # moving `many` fits, moving `few` does not
        while many - few > 1:
            middle = (few + many) // 2
            trial = bits.clone()
            trial[slots[:middle]] = low.bits
            few, many = (few, middle) if fits(trial) else (middle, many)
        bits[slots[:many]] = low.bits
        return fits(bits)
    return None


def choose(
    candidates: Sequence[tuple[PoolStorage | MixedStorage, int, int]],
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
