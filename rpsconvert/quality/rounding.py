"""Data-aware rounding of a quantized pool: GPTQ's error feedback, onto the grid the pool is stored on.

Rounding each weight to its nearest code (what `PoolStorage.snap` does) ignores how the errors of a
row add up on the layer's inputs. With the inputs' second moments H = X^T X, which calibration
collects anyway, GPTQ (Frantar et al., 2023) rounds the columns of a weight one at a time and
spreads each column's rounding error over the columns not yet rounded, along H's inverse
Cholesky factor, so that the output error ||X (W - Q)^T||^2 grows as little as it can:

    for each column j:  q_j = round(w_j);  e = (w_j - q_j) / U_jj;  w_{j+1:} -= e U_{j, j+1:}

Two rules keep the result a grid value that the pool reproduces exactly: each element keeps the
step (block scale) and code range round-to-nearest would give it; and an element that
round-to-nearest puts at its block's largest code keeps that code (as does a zero). A block then
still holds its largest code, so `snap` finds the same scale again and leaves the rounded values as
they are: the model that runs is the one that was rounded, and the one that is saved.
"""

from __future__ import annotations

import torch

from rpsconvert.engine.kinds import grouped
from rpsconvert.engine.mapping import chunks
from rpsconvert.engine.operator import CompressedWeight
from rpsconvert.engine.pool import RPSPool


def feedback_factor(hessian: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor of the damped inverse of `hessian` (G, d, d), along which GPTQ
    spreads each column's rounding error: `damping` times H's mean diagonal is added to it, so that
    inputs the data never excites do not blow up the feedback. Layers fed the same inputs (a
    transformer's q, k and v) share it: it is the d^3 part of rounding a layer."""
    h = hessian.double().clone()
    torch.diagonal(h, dim1=1, dim2=2).copy_(damped_diagonal(hessian, damping))
    h = torch.linalg.cholesky(h)  # one d x d temporary at a time: 1 GB each for a 7B's down projection
    h = torch.cholesky_inverse(h)
    return torch.linalg.cholesky(h, upper=True)  # (G, d, d)


def damped_diagonal(hessian: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """H's diagonal (G, d) as `feedback_factor` damps it: an input the data never sets counts 1
    (its column is rounded alone), then `damping` times the mean diagonal is added."""
    diagonal = hessian.diagonal(dim1=1, dim2=2).double().clone()
    diagonal[diagonal <= 0] = 1.0
    return diagonal + damping * diagonal.mean(dim=1, keepdim=True)


def solve_alone(hessian: torch.Tensor, cross: torch.Tensor, current: torch.Tensor, factor: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """The weight (G, o, d) that minimizes ||X W^T - Y||^2 + ||W - W_0||^2_D for a layer whose slots
    are its own, from H = X^T X (`hessian`), B = Y^T X (`cross`) and W_0 (`current`), with D the
    damping `feedback_factor` adds to H: W = (B + W_0 D)(H + D)^-1, through that function's
    factor U, (H + D)^-1 = U^T U. Conjugate gradients would reach the same minimum in many
    products; the factor is computed anyway for the rounding that follows."""
    shift = damped_diagonal(hessian, damping) - hessian.diagonal(dim1=1, dim2=2)  # D
    return ((cross + current * shift.unsqueeze(1)) @ factor.transpose(1, 2)) @ factor


def output_error(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, targets: float) -> float:
    """||X W^T - Y|| / ||Y|| of a weight (G, o, d) from H, B and ||Y||^2 (`targets`), in float32 products."""
    w = weight.float()
    quadratic = float(((w @ hessian.float()) * w).sum()) - 2 * float((cross.float() * w).sum())
    return max(quadratic + targets, 0.0) ** 0.5 / max(targets, 1e-30) ** 0.5


def round_with_feedback(
    weight: torch.Tensor, hessian: torch.Tensor | None, steps: torch.Tensor, levels: torch.Tensor, damping: float = 0.01, block: int = 128,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer codes for `weight` (G, o, d): the rows of each group g rounded against the input
    second moments `hessian[g]` (d, d), element by element on the grid `steps` * code with
    |code| <= `levels` (both shaped like `weight`), damped as `feedback_factor` says (or along
    `factor`, that function's result, given in place of `hessian`).

    Columns go in blocks of `block`: inside a block each column's error is fed to the block's later
    columns at once, and to the columns after the block in one product when the block is done (the
    same sums in another order). On a 384 x 1536 layer that is 4x faster than feeding every column
    to all the rest, with the same codes in a check on random data."""
    # columns are rows of the transposed weights (G, d, o): each column's steps read contiguous
    # memory, where a column of (G, o, d) strides over every row (3.4x slower on a 5504 x 2048 layer)
    w = weight.double().transpose(1, 2).contiguous()
    steps, levels = steps.double().transpose(1, 2).contiguous(), levels.double().transpose(1, 2).contiguous()
    nearest = torch.maximum(torch.minimum(torch.round(w / steps), levels), -levels)
    pinned = (nearest.abs() == levels) | (w == 0)
    factor = feedback_factor(hessian, damping) if factor is None else factor
    codes = torch.empty_like(w)
    d = w.shape[1]
    for start in range(0, d, block):  # GPTQ's lazy batches: the feedback beyond a block is one matmul
        end = min(start + block, d)
        errors = torch.empty(w.shape[0], end - start, w.shape[2], dtype=w.dtype, device=w.device)
        for j in range(start, end):
            column = w[:, j]
            code = torch.maximum(torch.minimum(torch.round(column / steps[:, j]), levels[:, j]), -levels[:, j])
            code = torch.where(pinned[:, j], nearest[:, j], code)
            codes[:, j] = code
            errors[:, j - start] = error = (column - code * steps[:, j]) / factor[:, j, j].unsqueeze(1)
            w[:, j + 1 : end] -= factor[:, j, j + 1 : end].unsqueeze(2) * error.unsqueeze(1)
        w[:, end:] -= factor[:, start:end, end:].transpose(1, 2) @ errors
    return codes.transpose(1, 2)


def sole_slots(pool: RPSPool) -> torch.Tensor:
    """Which slots hold exactly one element of one weight (every slot of a lossless RandomFold
    pool): only there can a weight's rounding be chosen for it alone."""
    return pool.operator.counts(pool.weights.values(), pool.pool.device) == 1


def round_layer(
    pool: RPSPool, weight: CompressedWeight, hessian: torch.Tensor, sole: torch.Tensor, damping: float = 0.01, factor: torch.Tensor | None = None
) -> bool:
    """Round the slots of `weight` onto the pool's stored grid with error feedback against its
    inputs' second moments `hessian` (G, d, d), in place; False, and nothing done, unless every one
    of its slots is `sole` (shared slots are rounded by `snap`, since their value serves several
    weights). The values are g(i) * W[i] / scale, so the grid and the rounding are the weight's own.
    `factor` is `feedback_factor(hessian, damping)` where the caller has it already."""
    pieces = list(chunks(pool.mapping, weight.offset, weight.numel, pool.size, pool.seed, pool.pool.device))
    slots, signs = torch.cat([piece[2] for piece in pieces]), torch.cat([piece[3] for piece in pieces]).float()
    if not bool(sole[slots].all()):
        return False
    theta = pool.pool.detach()
    lo, hi = int(slots.min()), int(slots.max()) + 1
    steps, levels = (t[slots - lo] for t in pool.storage.grid(theta, lo, hi))
    groups = hessian.shape[0]

    def by_group(per_element: torch.Tensor) -> torch.Tensor:
        return grouped(per_element.view(weight.shape), groups)

    codes = round_with_feedback(by_group(theta[slots].double() * signs), hessian, by_group(steps), by_group(levels), damping, factor=factor)
    theta[slots] = (codes.reshape(-1).float() * signs * steps).to(theta.dtype)  # exact: a code times a block scale
    return True
