"""The baselines RPS is compared against, each with the bytes it must store.

Every method compresses the same weights (those rpsconvert compresses); all other tensors (biases,
norms, small weights) stay dense in fp32 for every method, so only the compressed weights' bytes
differ. Byte counts:

- magnitude pruning: fp32 values plus, per tensor, the cheapest of int32 flat indices, CSR with
  int16 column indices (and int32 row pointers), or a bitmask of the whole tensor;
- low-rank SVD: both fp32 factors, rank r costs 4 * r * (rows + columns) bytes (a conv kernel is
  the matrix out x (in * kh * kw));
- fp16: 2 bytes per weight; int8: 1 byte per weight plus one fp32 scale per output row; int4: half
  a byte per weight plus one fp16 scale per group of 32 weights of an output row (4.5 bits a weight
  when a row's length is a multiple of 32);
- small dense model: every parameter of a narrower model of the same architecture.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from rpsconvert import convert, report

INT4_GROUP = 32


def compressed_names(model: nn.Module) -> list[str]:
    """The weights rpsconvert compresses in `model` (every method compresses the same ones)."""
    return [w.name for w in report(convert(model, ratio=1.0)).weights if w.compressed]


def _weights(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owning module, attribute, tensor) for each named weight."""
    out = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        out.append((module, attr, getattr(module, attr)))
    return out


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A weight as a matrix: output rows by everything else (a conv kernel's in * kh * kw)."""
    return shape[0], math.prod(shape[1:])


# ---------------------------------------------------------------- pruning


def sparse_bytes(shape: tuple[int, ...], nonzeros: int) -> int:
    """fp32 values plus the cheapest way to say where they are."""
    rows, cols = _matrix_shape(shape)
    index = [4 * nonzeros, math.ceil(rows * cols / 8)]  # int32 flat index, bitmask
    if cols <= 2**16:
        index.append(2 * nonzeros + 4 * (rows + 1))  # CSR: int16 column index, int32 row pointers
    return 4 * nonzeros + min(index)


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _keep_counts(shapes: list[tuple[int, ...]], budget: int) -> list[int] | None:
    """Nonzeros per tensor at the largest uniform density whose sparse bytes fit in `budget`."""

    def counts(density: float) -> list[int]:
        return [math.floor(density * math.prod(s)) for s in shapes]

    def cost(density: float) -> int:
        return sum(sparse_bytes(s, k) for s, k in zip(shapes, counts(density)))

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return counts(lo) if sum(counts(lo)) > 0 else None


def prune(model: nn.Module, names: list[str], budget: int) -> tuple[nn.Module, int] | None:
    """Layer-wise magnitude pruning at one density for all tensors; the mask stays fixed in training."""
    pruned = copy.deepcopy(model)
    weights = _weights(pruned, names)
    keep = _keep_counts([tuple(w.shape) for _, _, w in weights], budget)
    if keep is None:
        return None
    for (module, attr, w), k in zip(weights, keep):
        mask = torch.zeros(w.numel())
        mask[w.detach().abs().flatten().topk(k).indices] = 1.0
        with torch.no_grad():
            w.mul_(mask.view_as(w))
        parametrize.register_parametrization(module, attr, _Mask(mask.view_as(w)))
    return pruned, sum(sparse_bytes(tuple(w.shape), k) for (_, _, w), k in zip(weights, keep))


# ---------------------------------------------------------------- low rank


class _LowRank(nn.Module):
    """The weight is the product of two trainable factors; the original tensor is ignored."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, shape: torch.Size):
        super().__init__()
        self.left, self.right, self.shape = nn.Parameter(left), nn.Parameter(right), shape

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.left @ self.right).view(self.shape)


def _energy_ranks(singular_values: list[torch.Tensor], costs: list[int], budget: int) -> list[int] | None:
    """Ranks keeping the same fraction of every weight's energy (sum of squared singular values),
    the largest fraction whose factors fit in `budget`; None when rank 1 of every weight does not."""
    energies = [(s.square().cumsum(0) / s.square().sum()).tolist() for s in singular_values]

    def ranks(fraction: float) -> list[int]:  # the smallest rank reaching `fraction`, at least 1
        return [min(len(e), 1 + sum(x < fraction for x in e)) for e in energies]

    def cost(fraction: float) -> int:
        return sum(r * c for r, c in zip(ranks(fraction), costs))

    if cost(0.0) > budget:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return ranks(lo)


def low_rank(model: nn.Module, names: list[str], budget: int) -> tuple[nn.Module, int] | None:
    """Truncated SVD of every weight, ranks chosen by equal retained energy; factors train in recovery."""
    factored = copy.deepcopy(model)
    weights = _weights(factored, names)
    svds = [torch.linalg.svd(w.detach().reshape(_matrix_shape(tuple(w.shape))), full_matrices=False) for _, _, w in weights]
    costs = [4 * sum(_matrix_shape(tuple(w.shape))) for _, _, w in weights]  # bytes per unit of rank
    ranks = _energy_ranks([s for _, s, _ in svds], costs, budget)
    if ranks is None:
        return None
    for (module, attr, w), (u, s, vh), r in zip(weights, svds, ranks):
        root = s[:r].sqrt()
        parametrize.register_parametrization(
            module, attr, _LowRank(u[:, :r] * root, root[:, None] * vh[:r], w.shape), unsafe=True
        )
        getattr(module.parametrizations, attr).original.requires_grad_(False)
    return factored, sum(r * c for r, c in zip(ranks, costs))


# ---------------------------------------------------------------- quantization


def _quantized(model: nn.Module, names: list[str], roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    result = copy.deepcopy(model)
    with torch.no_grad():
        for _, _, w in _weights(result, names):
            w.copy_(roundtrip(w))
    return result


def fp16(model: nn.Module, names: list[str]) -> tuple[nn.Module, int]:
    numel = sum(w.numel() for _, _, w in _weights(model, names))
    return _quantized(model, names, lambda w: w.half().float()), 2 * numel


def _int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    rows = w.reshape(w.shape[0], -1)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return ((rows / scale).round().clamp(-127, 127) * scale).view_as(w)


def int8(model: nn.Module, names: list[str]) -> tuple[nn.Module, int]:
    """Symmetric per-output-row int8 with one fp32 scale per row."""
    weights = _weights(model, names)
    size = sum(w.numel() + 4 * w.shape[0] for _, _, w in weights)
    return _quantized(model, names, _int8_roundtrip), size


def _int4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    rows = w.reshape(w.shape[0], -1)
    groups = F.pad(rows, (0, -rows.shape[1] % INT4_GROUP)).view(rows.shape[0], -1, INT4_GROUP)
    scale = (groups.abs().amax(dim=2, keepdim=True) / 7).half().float().clamp(min=1e-12)
    codes = (groups / scale).round().clamp(-7, 7)
    return (codes * scale).flatten(1)[:, : rows.shape[1]].view_as(w)


def int4(model: nn.Module, names: list[str]) -> tuple[nn.Module, int]:
    """Group-wise int4 round-to-nearest (symmetric, the group's peak as level 7), the common
    weight-only scheme: one fp16 scale per group of INT4_GROUP weights of an output row."""
    weights = _weights(model, names)
    size = sum(math.ceil(w.numel() / 2) + 2 * w.shape[0] * math.ceil(w[0].numel() / INT4_GROUP) for _, _, w in weights)
    return _quantized(model, names, _int4_roundtrip), size


# ---------------------------------------------------------------- smaller dense model


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kept_bytes(model: nn.Module, names: list[str]) -> int:
    """The bytes of every tensor of the state dict but the compressed weights (buffers included):
    what every method stores as the original has it."""
    compressed = set(names)
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in compressed)


def small_width(build: Callable[[int], nn.Module], width: int, total_budget: int) -> int | None:
    """The largest width below `width` whose model's parameters fit in `total_budget` bytes."""
    for w in range(width - 1, 0, -1):
        if parameter_bytes(build(w)) <= total_budget:
            return w
    return None
