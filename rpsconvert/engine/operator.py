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

import bisect
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Sequence

import torch

from rpsconvert.engine import kernels
from rpsconvert.engine.hashing import STREAM_ROTATION, STREAM_SIGN, hash32, stream_key
from rpsconvert.engine.mapping import CHUNK, Mapping, RandomFold, chunks

FOLD_CHUNK = 1 << 20  # RandomFold elements generated at once: about 1 MB of sign factors and bytes
_MIN_RUN = 1 << 12  # RandomFold pools smaller than this are gathered: a slice per fold would cost more


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

    def __post_init__(self):
        # Hash keys as plain ints, computed once: generation then runs no tensor code to find them,
        # which keeps it traceable by torch.compile and torch.export (no .item() while tracing).
        object.__setattr__(self, "_sign_key", stream_key(self.seed, STREAM_SIGN))
        object.__setattr__(self, "_rotation_key", stream_key(self.seed, STREAM_ROTATION))

    def _chunks(self, weight: CompressedWeight, device) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        return chunks(self.mapping, weight.offset, weight.numel, self.slots, self.seed, device)

    def _folded(self) -> bool:
        """Whether weights are generated fold by fold: RandomFold with folds long enough to slice,
        or any RandomFold while torch.compile or torch.export traces (the element-wise slots read
        fold rotations back with .tolist(), which a trace cannot follow)."""
        return isinstance(self.mapping, RandomFold) and (self.slots >= _MIN_RUN or torch.compiler.is_compiling())

    def generate(self, theta: torch.Tensor, weight: CompressedWeight) -> torch.Tensor:
        """A_w(theta): the weight `theta` generates, in theta's dtype (differentiable in theta).

        RandomFold (the default) reads each fold as one or two slices of the pool and applies the
        signs eight at a time from a byte table, or on a GPU runs one fused kernel (kernels.py);
        other mappings gather one slot per element. All give the same bits (`generate_elementwise`
        is the reference the tests compare with).
        """
        if isinstance(self.mapping, RandomFold) and torch.compiler.is_compiling():
            return self._generate_expression(theta, weight)
        if isinstance(self.mapping, RandomFold) and kernels.available(theta):
            if torch.is_grad_enabled() and theta.requires_grad:
                return _FusedGeneration.apply(theta, self, weight)
            return self._generate_fused(theta, (weight,)).view(weight.shape)
        if not self._folded():
            return self.generate_elementwise(theta, weight)
        pieces = self._fold_pieces(theta, weight)
        if torch.is_grad_enabled() and theta.requires_grad:
            return torch.cat([values * factors for _, _, values, factors in pieces]).view(weight.shape)
        out = torch.empty(weight.numel, dtype=theta.dtype, device=theta.device)
        for lo, hi, values, factors in pieces:
            torch.mul(values, factors, out=out[lo:hi])
        return out.view(weight.shape)

    def generate_all(self, theta: torch.Tensor, weights: Iterable[CompressedWeight]) -> dict[str, torch.Tensor]:
        """Every weight of `weights` by name, without gradients: on a GPU one kernel launch
        generates them all, into views of one buffer."""
        weights = tuple(weights)
        if not (isinstance(self.mapping, RandomFold) and kernels.available(theta)):
            return {weight.name: self.generate(theta, weight) for weight in weights}
        flat = self._generate_fused(theta, weights)
        starts = [0, *itertools.accumulate(weight.numel for weight in weights)]
        return {weight.name: flat[start : start + weight.numel].view(weight.shape) for weight, start in zip(weights, starts)}

    def _generate_fused(self, theta: torch.Tensor, weights: tuple[CompressedWeight, ...]) -> torch.Tensor:
        plan = _launch(self, weights, theta.dtype, theta.device)
        return kernels.generate(theta, plan, self.slots, self._rotation_key, self._sign_key)

    def _generate_expression(self, theta: torch.Tensor, weight: CompressedWeight) -> torch.Tensor:
        """RandomFold's slot and sign of every element from its index, as one expression of tensor
        operations: what torch.compile fuses into a single loop (the fold path would unroll into
        thousands of operations, minutes of compilation). In eager mode its int64 temporaries
        would be many times the weight, so it only runs under the compiler."""
        m = self.slots
        i = torch.arange(weight.offset, weight.offset + weight.numel, device=theta.device)
        slot = (hash32(i // m, self._rotation_key) % m + i % m) % m
        bit = (hash32(i >> 5, self._sign_key) >> (i & 31)) & 1
        return (theta[slot] * self.signed(theta, weight.scale)[bit]).view(weight.shape)

    def generate_elementwise(self, theta: torch.Tensor, weight: CompressedWeight) -> torch.Tensor:
        """A_w(theta) by gathering `theta[h(i)] * g(i) * scale` element by element, for any mapping."""
        pieces = [theta[slots] * (sign.to(theta.dtype) * weight.scale) for _, _, slots, sign in self._chunks(weight, theta.device)]
        return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).view(weight.shape)

    def fold_runs(self, weight: CompressedWeight) -> Iterator[tuple[int, int, int]]:
        """(local start, local stop, first slot) of every run of every RandomFold fold of `weight`.

        Fold c covers the global indices [c m, (c + 1) m) and reads the pool rotated by
        H(c) mod m: the part of a fold inside one chunk of FOLD_CHUNK elements is at most two
        ascending runs of slots, so its pool values are slices (views, no index tensor).
        """
        m = self.slots
        for lo in range(0, weight.numel, FOLD_CHUNK):
            start, stop = weight.offset + lo, weight.offset + min(lo + FOLD_CHUNK, weight.numel)
            for fold in range(start // m, (stop - 1) // m + 1):
                first, last = max(start, fold * m), min(stop, (fold + 1) * m)  # global indices in this chunk
                begin = (hash32(fold, self._rotation_key) % m + first - fold * m) % m
                split = min(last, first + m - begin)  # where the run wraps to slot 0
                yield first - weight.offset, split - weight.offset, begin
                if split < last:
                    yield split - weight.offset, last - weight.offset, 0

    def _fold_pieces(self, theta: torch.Tensor, weight: CompressedWeight, scale: float | None = None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(local start, local stop, pool slice, sign factors) for every run of `fold_runs`. The
        factors are g(i) * scale in theta's dtype, rounded exactly as `generate_elementwise` rounds
        them, computed a chunk of FOLD_CHUNK elements at a time."""
        signed = self.signed(theta, weight.scale if scale is None else scale)
        bits = (torch.arange(256, device=theta.device).unsqueeze(1) >> torch.arange(8, device=theta.device)) & 1
        table = signed[bits]  # (256, 8): the factors of the 8 elements whose sign bits are one byte
        chunk = None
        for lo, hi, begin in self.fold_runs(weight):
            if lo // FOLD_CHUNK != chunk:
                chunk = lo // FOLD_CHUNK
                start = chunk * FOLD_CHUNK
                factors = self._sign_factors(weight.offset + start, weight.offset + min(start + FOLD_CHUNK, weight.numel), table)
            yield lo, hi, theta[begin : begin + hi - lo], factors[lo - start : hi - start]

    def landing(self, layout: Sequence[CompressedWeight], lo: int, hi: int) -> Iterator[tuple[int, int, int, int]]:
        """(weight index, local start, local stop, first slot) of every run of elements that lands
        in the slots [lo, hi) of a RandomFold pool, fold by fold (so in the order of their global
        indices within each slot). `layout` holds consecutive weights from offset 0.

        Fold c reads the pool rotated by r = H(c) mod m, so a slot range is one or two ranges of
        positions in each fold: the pool's slots can be computed range by range, each reading only
        the elements that land there (a model larger than memory is projected in pieces)."""
        m, total = self.slots, layout[-1].offset + layout[-1].numel if layout else 0
        offsets = [w.offset for w in layout]
        for fold in range(-(-total // m)):
            rotation = hash32(fold, self._rotation_key) % m
            # slot s holds position (s - r) mod m, which wraps to 0 where s reaches r
            parts = [(lo, rotation), (rotation, hi)] if lo < rotation < hi else [(lo, hi)]
            for first, last in parts:
                start = fold * m + (first - rotation) % m
                stop = min(start + last - first, total)
                index = bisect.bisect_right(offsets, start) - 1
                while start < stop:
                    weight = layout[index]
                    end = min(stop, weight.offset + weight.numel)
                    yield index, start - weight.offset, end - weight.offset, first
                    first, start, index = first + end - start, end, index + 1

    def signs(self, start: int, stop: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """g(i) for the global indices [start, stop), in `dtype`."""
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        return self._sign_factors(start, stop, torch.tensor([1, -1], dtype=dtype, device=device)[bits])

    @staticmethod
    def signed(theta: torch.Tensor, scale: float) -> torch.Tensor:
        """(+scale, -scale) rounded in theta's dtype: the factors of sign bits 0 and 1."""
        return torch.tensor([1, -1], dtype=theta.dtype, device=theta.device) * scale

    def _sign_factors(self, start: int, stop: int, table: torch.Tensor) -> torch.Tensor:
        """table's factors for the global indices [start, stop): bit i mod 32 of H(i // 32) picks
        +scale or -scale (docs/format.md), looked up a byte (8 elements) at a time."""
        first = start >> 5
        words = hash32(torch.arange(first, ((stop - 1) >> 5) + 1, device=table.device), self._sign_key)
        octets = (words.unsqueeze(1) >> torch.arange(0, 32, 8, device=table.device)) & 0xFF  # low byte first
        return table.index_select(0, octets.reshape(-1)).reshape(-1)[start - 32 * first : stop - 32 * first]

    def adjoint(self, weight: CompressedWeight, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A_w^T(u), added into `out` (a fresh zero vector of the pool's size by default).

        <A_w^T(u), v> = <u, A_w(v)> for every pool vector v. RandomFold adds each fold's run into
        a slice of `out`; other mappings scatter element by element.
        """
        out = torch.zeros(self.slots, dtype=u.dtype, device=u.device) if out is None else out
        flat = u.reshape(-1)
        if self._folded():
            for lo, hi, target, factors in self._fold_pieces(out, weight, scale=1.0):
                target.add_(flat[lo:hi].to(out.dtype) * factors, alpha=weight.scale)
            return out
        for lo, hi, slots, sign in self._chunks(weight, u.device):
            out.index_add_(0, slots, flat[lo:hi].to(out.dtype) * sign, alpha=weight.scale)
        return out

    def counts(
        self,
        weights: Iterable[CompressedWeight],
        device: torch.device | str = "cpu",
        factor: Callable[[CompressedWeight], float] = lambda weight: 1.0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sum over `weights` of factor(w) * (elements of w in each slot), float64, added into
        `out` (a fresh zero vector of the pool's size by default).

        With factor = scale^2 this is the diagonal of A^T A; with factor = scale, the sum of the
        scales of each slot's elements (STABLE-RPS).
        """
        weights = list(weights)
        out = torch.zeros(self.slots, dtype=torch.float64, device=device) if out is None else out
        ones = torch.ones(min(CHUNK, max((w.numel for w in weights), default=0)), dtype=torch.float64, device=device)
        for weight in weights:
            for lo, hi, slots, _ in self._chunks(weight, device):
                out.index_add_(0, slots, ones[: hi - lo], alpha=factor(weight))
        return out

    def diagonal(self, weights: Iterable[CompressedWeight], device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
        """The diagonal of sum_w A_w^T A_w: the sum of scale^2 over the elements in each slot."""
        return self.counts(weights, device, lambda weight: weight.scale**2, out)


@lru_cache(maxsize=1024)
def _launch(operator: PoolOperator, weights: tuple[CompressedWeight, ...], dtype: torch.dtype, device: torch.device) -> kernels.Launch:
    """The fused kernel's tables for these weights, kept: a lean forward then copies nothing to
    the GPU per layer."""
    empty = torch.empty(0, dtype=dtype, device=device)
    factors = torch.stack([operator.signed(empty, weight.scale) for weight in weights])
    return kernels.launch([weight.offset for weight in weights], [weight.numel for weight in weights], factors)


class _FusedGeneration(torch.autograd.Function):
    """The GPU kernel's generation, differentiable: the gradient of A_w(theta) is A_w^T(grad)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, operator: PoolOperator, weight: CompressedWeight) -> torch.Tensor:
        ctx.operator, ctx.weight = operator, weight
        return operator._generate_fused(theta, (weight,)).view(weight.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.operator.adjoint(ctx.weight, grad), None, None
