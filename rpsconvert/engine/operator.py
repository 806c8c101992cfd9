"""The pool operator: the one linear map from the pool to every compressed weight.

Every compressed weight is `W = A_w(theta)`, with `A_w[i, h(i)] = scale_w * g(i)` and zeros
elsewhere. Everything the engine and the quality tools do with the pool is one of three uses of A:

- `generate`: W = A_w(theta) (the weights a model runs with);
- `adjoint`: A_w^T(u), a scatter-add of sign- and scale-corrected values into their slots
  (projection's numerator, calibration's gradients);
- `counts`: how many elements of each weight land in each slot, from which the diagonal of A^T A
  (projection's denominator, calibration's preconditioner) and STABLE-RPS's gradient divisor follow.

They all walk the weight's elements CHUNK at a time, so temporaries stay bounded whatever the
model's size; a faster generation or a quantized pool changes this file only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from rpsconvert.engine.mapping import CHUNK, Mapping, chunks


@dataclass(frozen=True)
class CompressedWeight:
    """One compressed weight: its elements are [offset, offset + numel) of the virtual vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    scale: float
    aliases: tuple[str, ...] = ()  # other names of a tied weight

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class PoolOperator:
    """A (mapping, pool size, seed): what turns pool vectors into weights and back."""

    mapping: Mapping
    slots: int
    seed: int

    def _chunks(self, weight: CompressedWeight, device) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        return chunks(self.mapping, weight.offset, weight.numel, self.slots, self.seed, device)

    def generate(self, theta: torch.Tensor, weight: CompressedWeight) -> torch.Tensor:
        """A_w(theta): the weight `theta` generates, in theta's dtype (differentiable in theta)."""
        pieces = [theta[slots] * (sign.to(theta.dtype) * weight.scale) for _, _, slots, sign in self._chunks(weight, theta.device)]
        return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).view(weight.shape)

    def adjoint(self, weight: CompressedWeight, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A_w^T(u), added into `out` (a fresh zero vector of the pool's size by default).

        <A_w^T(u), v> = <u, A_w(v)> for every pool vector v.
        """
        out = torch.zeros(self.slots, dtype=u.dtype, device=u.device) if out is None else out
        flat = u.reshape(-1)
        for lo, hi, slots, sign in self._chunks(weight, u.device):
            out.index_add_(0, slots, flat[lo:hi].to(out.dtype) * sign, alpha=weight.scale)
        return out

    def counts(
        self,
        weights: Iterable[CompressedWeight],
        device: torch.device | str = "cpu",
        factor: Callable[[CompressedWeight], float] = lambda weight: 1.0,
    ) -> torch.Tensor:
        """sum over `weights` of factor(w) * (elements of w in each slot), float64.

        With factor = scale^2 this is the diagonal of A^T A; with factor = scale, the sum of the
        scales of each slot's elements (STABLE-RPS).
        """
        weights = list(weights)
        out = torch.zeros(self.slots, dtype=torch.float64, device=device)
        ones = torch.ones(min(CHUNK, max((w.numel for w in weights), default=0)), dtype=torch.float64, device=device)
        for weight in weights:
            for lo, hi, slots, _ in self._chunks(weight, device):
                out.index_add_(0, slots, ones[: hi - lo], alpha=factor(weight))
        return out

    def diagonal(self, weights: Iterable[CompressedWeight], device: torch.device | str = "cpu") -> torch.Tensor:
        """The diagonal of sum_w A_w^T A_w: the sum of scale^2 over the elements in each slot."""
        return self.counts(weights, device, lambda weight: weight.scale**2)
