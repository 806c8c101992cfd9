"""Weight-space projection: the least-squares pool for trained weights.

theta[j] = sum_{h(i)=j} lambda_i g_i W_i / sum_{h(i)=j} lambda_i^2, accumulated in float64 chunk by
chunk through the pool operator, so the temporary memory is two float64 vectors of the pool's size
plus one chunk.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from rpsconvert.engine.operator import CompressedWeight, PoolOperator


def layer_scales(weights: Iterable[torch.Tensor], power_of_two: bool = False) -> list[float]:
    """lambda_l = RMS of layer l / RMS of all compressed weights.

    The ratio keeps each layer's magnitude while the pool stays in the units of the weights, so an
    optimizer's usual learning rate moves RPS weights as fast as it moved the dense ones. A layer
    of zeros gets 1. With `power_of_two` each scale is rounded to the nearest power of two, which
    makes multiplying and dividing by it exact: at ratio 1.0 (one element per slot, where the
    scales do not change the fit) the generated weights then equal the originals bit for bit.
    Below 1.0 the exact ratios weigh colliding layers better (measured on the digits CNN at ratios
    1/2 to 1/8: rounded scales lost 3 to 27 points of projection-only accuracy).
    """
    sums = [(float(w.detach().double().square().sum()), w.numel()) for w in weights]
    total, count = sum(s for s, _ in sums), sum(n for _, n in sums)
    global_rms = math.sqrt(total / count) if total > 0 else 1.0
    scales = [math.sqrt(s / n) / global_rms if s > 0 else 1.0 for s, n in sums]
    return [2.0 ** round(math.log2(s)) for s in scales] if power_of_two else scales


def project(operator: PoolOperator, weights: list[tuple[CompressedWeight, torch.Tensor]]) -> torch.Tensor:
    """The float64 pool minimizing sum_i (W_i - lambda_i g_i theta[h(i)])^2 over (layout, tensor) pairs:
    A^T(W) / diag(A^T A), slot by slot. Slots no element reaches stay 0.
    """
    device = weights[0][1].device if weights else "cpu"
    numerator = torch.zeros(operator.slots, dtype=torch.float64, device=device)
    for weight, tensor in weights:
        operator.adjoint(weight, tensor.detach().double(), out=numerator)
    denominator = operator.diagonal([weight for weight, _ in weights], device)
    return numerator.div_(denominator.clamp_(min=1e-300))  # in place: the temporaries are pool-sized
