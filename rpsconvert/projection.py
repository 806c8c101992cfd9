"""Weight-space projection: the least-squares pool for trained weights.

theta[j] = sum_{h(i)=j} lambda_i g_i W_i / sum_{h(i)=j} lambda_i^2, accumulated in float64 chunk by
chunk, so the temporary memory is two float64 vectors of the pool's size plus one chunk.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from rpsconvert.mapping import CHUNK, Mapping, chunks


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


def project(
    weights: list[tuple[torch.Tensor, int, float]], mapping: Mapping, m: int, seed: int
) -> torch.Tensor:
    """The float64 pool minimizing sum_i (W_i - lambda_i g_i theta[h(i)])^2.

    `weights` holds (tensor, global offset, scale) for each compressed weight.
    """
    device = weights[0][0].device if weights else "cpu"
    num = torch.zeros(m, dtype=torch.float64, device=device)
    den = torch.zeros(m, dtype=torch.float64, device=device)
    ones = torch.ones(min(CHUNK, max((w.numel() for w, _, _ in weights), default=0)), dtype=torch.float64, device=device)
    for tensor, offset, scale in weights:
        flat = tensor.detach().reshape(-1)
        for lo, hi, slots, sign in chunks(mapping, offset, flat.numel(), m, seed, device):
            num.index_add_(0, slots, flat[lo:hi].double() * sign, alpha=scale)
            den.index_add_(0, slots, ones[: hi - lo], alpha=scale * scale)
    return num.div_(den.clamp_(min=1e-300))  # in place: slots no element reaches have num = 0
