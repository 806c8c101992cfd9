"""Weight-space projection: the least-squares pool for trained weights.

theta[j] = sum_{h(i)=j} lambda_i g_i W_i / sum_{h(i)=j} lambda_i^2, accumulated in float64 chunk by
chunk through the pool operator, so the temporary memory is two float64 vectors of the pool's size
plus one chunk.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Iterable, Iterator, Sequence

import torch

from rpsconvert.engine.operator import CompressedWeight, PoolOperator


def layer_scales(weights: Iterable[torch.Tensor], power_of_two: bool = False) -> list[float]:
    """lambda_l = RMS of layer l / the median of the layers' RMS (layers of zeros left out).

    Adam moves every pool slot by about its learning rate per step, so a generated weight moves by
    about lambda_l * lr where a dense one moves by lr: the pool's unit is the speed of training.
    The median layer gets lambda 1, so the learning rate used for the dense model moves a typical
    layer as fast as it did there, and one layer far from the others cannot set the unit of all: a
    unit of the RMS of all weights let nn.Embedding's std-1 tables put nn.Linear's scales near 0.17,
    and a byte-level LM trained from scratch at ratio 1/8 reached 4.16 bits per byte instead of 3.82
    (docs/benchmarks.md, "Training from scratch"), behind the smaller dense model instead of
    ahead. The ratios between scales, which decide how colliding layers are weighed, are those of
    the layers' RMS whatever the unit. A layer of zeros gets 1. With `power_of_two` each scale is
    rounded to the nearest power of two, which makes multiplying and dividing by it exact: at ratio
    1.0 (one element per slot, where the scales do not change the fit) the generated weights then
    equal the originals bit for bit. Below 1.0 the exact ratios weigh colliding layers better
    (measured on the digits CNN at ratios 1/2 to 1/8: rounded scales lost 3 to 27 points of
    projection-only accuracy).
    """
    rms = [math.sqrt(float(w.detach().double().square_().mean())) if w.numel() else 0.0 for w in weights]  # one float64 copy
    unit = statistics.median([r for r in rms if r > 0] or [1.0])
    scales = [r / unit if r > 0 else 1.0 for r in rms]
    return powers_of_two(scales) if power_of_two else scales


def powers_of_two(scales: list[float]) -> list[float]:
    """Each scale rounded to the nearest power of two (`layer_scales(power_of_two=True)`)."""
    return [2.0 ** round(math.log2(s)) for s in scales]


def project(operator: PoolOperator, weights: list[tuple[CompressedWeight, torch.Tensor]]) -> torch.Tensor:
    """The float64 pool minimizing sum_i (W_i - lambda_i g_i theta[h(i)])^2 over (layout, tensor) pairs:
    A^T(W) / diag(A^T A), slot by slot. Slots no element reaches stay 0.
    """
    layout, tensors = [weight for weight, _ in weights], {weight.name: tensor for weight, tensor in weights}
    return project_range(operator, layout, in_memory(tensors), 0, operator.slots)


def project_range(operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, lo: int, hi: int) -> torch.Tensor:
    """The slots [lo, hi) of `project`'s pool, reading through `read` only the elements that land
    there (RandomFold), so a pool is computed piece by piece and a model is read once in pieces
    whatever its size.

    Each slot adds its elements in the order of their global indices, fold by fold, as a whole
    pool computed at once does: the same bits for any pieces. Other mappings and pools too small
    to slice (PoolOperator._folded) scatter whole weights into a pool-sized vector.
    """
    device = _device(layout, read)
    if operator._folded() and len(layout):
        return solve(signed_runs(operator, layout, read, lo, hi), layout, lo, hi, device)
    whole = torch.zeros(operator.slots, dtype=torch.float64, device=device)
    for weight in layout:
        operator.adjoint(weight, read(weight, 0, weight.numel).double(), out=whole)
    return whole[lo:hi].div_(operator.diagonal(layout, device)[lo:hi].clamp_(min=1e-300))


def signed_runs(operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, lo: int, hi: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(weight index, first slot, its elements times their signs in float64) of every run of
    elements landing in the slots [lo, hi) of a sliced RandomFold pool (`PoolOperator.landing`)."""
    for index, start, stop, slot in operator.landing(layout, lo, hi):
        yield index, slot, signed(operator, layout[index], read, start, stop)


def signed(operator: PoolOperator, weight: CompressedWeight, read: Reader, start: int, stop: int) -> torch.Tensor:
    """The elements [start, stop) of `weight` times their signs, in float64."""
    values = read(weight, start, stop).double()
    return values.mul_(operator.signs(weight.offset + start, weight.offset + stop, torch.float64, values.device))


def solve(runs: Iterable[tuple[int, int, torch.Tensor]], layout: Sequence[CompressedWeight], lo: int, hi: int, device) -> torch.Tensor:
    """The least-squares slots [lo, hi) from every `signed_runs` run landing there."""
    numerator = torch.zeros(hi - lo, dtype=torch.float64, device=device)
    denominator = torch.zeros(hi - lo, dtype=torch.float64, device=device)
    for index, slot, values in runs:
        numerator[slot - lo : slot - lo + len(values)].add_(values, alpha=layout[index].scale)
        denominator[slot - lo : slot - lo + len(values)].add_(layout[index].scale ** 2)
    return numerator.div_(denominator.clamp_(min=1e-300))  # in place: the temporaries are pool-sized


Reader = Callable[[CompressedWeight, int, int], torch.Tensor]
"""The elements [lo, hi) of a weight, flat, in its dtype: from memory (`in_memory`) or from the
files of a model larger than memory (format/lazy_weights.py)."""


def in_memory(tensors: dict[str, torch.Tensor]) -> Reader:
    """A Reader of tensors held in memory, by weight name."""
    return lambda weight, lo, hi: tensors[weight.name].detach().reshape(-1)[lo:hi]


def _device(layout: Sequence[CompressedWeight], read: Reader) -> torch.device:
    """Where the weights `read` gives live (an empty read of the first)."""
    return read(layout[0], 0, 0).device if layout else torch.device("cpu")
