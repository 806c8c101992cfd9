"""RandomFold generation on a GPU as one fused Triton kernel.

On a GPU the fold-by-fold generation of operator.py is bound by kernel launches, not by memory: a
weight of a million elements spans hundreds of folds, each a slice and a multiply of its own. This
kernel computes every element's slot and sign from the hash functions of docs/format.md (exact
32-bit integer arithmetic, as hashing.py) and writes `pool[slot] * (+-scale)` in one pass: the pool
is small and stays in cache. One launch generates any number of weights (all of them when a model
is materialized), each program a block of one weight, so small layers cost no launch of their own.

The factors +-scale are rounded in the pool's dtype on the host, exactly as operator.py rounds
them, and each element is one multiply, so the kernel's bits are the CPU's (tests/test_runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with torch's CUDA builds; without it the fold path runs
    triton = None

BLOCK = 1024  # elements per program


def available(theta: torch.Tensor) -> bool:
    """Whether the kernel can generate from `theta`: a CUDA tensor (a pool held packed is read by
    the fold path, which dequantizes run by run), and Triton installed."""
    return triton is not None and isinstance(theta, torch.Tensor) and theta.is_cuda


@dataclass(frozen=True)
class Launch:
    """Where each program of one launch works, for a list of weights laid out one after another
    in the output: made once per list of weights and device (operator.py keeps them)."""

    block_weight: torch.Tensor  # (programs,) int32: the weight a program generates a block of
    block_start: torch.Tensor  # (programs,) int64: the block's first element within its weight
    starts: torch.Tensor  # (weights,) int64: each weight's first element in the output
    offsets: torch.Tensor  # (weights,) int64: each weight's first global index
    numels: torch.Tensor  # (weights,) int64
    factors: torch.Tensor  # (weights, 2) in the pool's dtype: +scale and -scale of each weight
    total: int  # elements in the output


def launch(offsets: list[int], numels: list[int], factors: torch.Tensor) -> Launch:
    device = factors.device
    blocks = torch.tensor([-(-n // BLOCK) for n in numels], device=device)
    block_weight = torch.repeat_interleave(torch.arange(len(numels), device=device, dtype=torch.int32), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    block_start = (torch.arange(len(block_weight), device=device) - first_block[block_weight.long()]) * BLOCK
    starts = torch.tensor([0, *numels[:-1]], device=device).cumsum(0)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    return Launch(block_weight, block_start, starts, as_tensor(offsets), as_tensor(numels), factors.contiguous(), sum(numels))


def generate(theta: torch.Tensor, plan: Launch, slots: int, rotation_key: int, sign_key: int) -> torch.Tensor:
    """The weights of `plan`, one after another in one flat tensor of theta's dtype."""
    theta = theta.contiguous()
    out = torch.empty(plan.total, dtype=theta.dtype, device=theta.device)
    if len(plan.block_weight):
        _randomfold[(len(plan.block_weight),)](
            theta, plan.factors, out, plan.block_weight, plan.block_start, plan.starts, plan.offsets, plan.numels,
            slots, rotation_key, sign_key, BLOCK=BLOCK,
        )
    return out


if triton is not None:

    @triton.jit
    def _fmix32(x):
        """murmur3's finalizer on uint32 (products wrap modulo 2**32, as hashing._mul32 computes)."""
        x ^= x >> 16
        x *= 0x85EBCA6B
        x ^= x >> 13
        x *= 0xC2B2AE35
        return x ^ (x >> 16)

    @triton.jit
    def _hash32(x, key):
        """hashing.hash32 of non-negative int64 values."""
        low = (x & 0xFFFFFFFF).to(tl.uint32)
        return _fmix32(_fmix32(low ^ key) ^ (x >> 32).to(tl.uint32))

    @triton.jit
    def _randomfold(theta, factors, out, block_weight, block_start, starts, offsets, numels, slots, rotation_key, sign_key, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        weight = tl.load(block_weight + program)
        local = tl.load(block_start + program) + tl.arange(0, BLOCK)
        inside = local < tl.load(numels + weight)
        i = tl.load(offsets + weight) + local  # global index: fold i // m reads the pool rotated by H(fold)
        rotation = _hash32(i // slots, rotation_key.to(tl.uint32)).to(tl.int64) % slots
        slot = (rotation + i % slots) % slots
        bit = (_hash32(i >> 5, sign_key.to(tl.uint32)) >> (i & 31).to(tl.uint32)) & 1
        value = tl.load(theta + slot, mask=inside) * tl.load(factors + 2 * weight + bit.to(tl.int32), mask=inside)
        tl.store(out + tl.load(starts + weight) + local, value, mask=inside)
