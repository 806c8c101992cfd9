"""The integer hash functions H and g of the file format (specified in docs/format.md).

They are part of every checkpoint: a file written today must regenerate bit-identical weights in
every future version and on every device. So the arithmetic is exact 32-bit unsigned integer
arithmetic carried in int64 tensors, with every intermediate product kept below 2**49 (no signed
overflow, which torch leaves undefined), and no per-element Python code.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B  # murmur3 fmix32 constants
_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9

# Independent hash streams, so that the sign of an element says nothing about its slot.
STREAM_ROTATION = 1  # RandomFold: rotation of each fold
STREAM_SLOT = 2  # HashedNet: slot of each element
STREAM_TILE = 3  # ROAST: offset of each tile
STREAM_SIGN = 4  # g: 32 sign bits per word


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """`(x * c) mod 2**32` for x in [0, 2**32), split in 16-bit halves so no product exceeds 2**49."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer: a bijection of [0, 2**32) with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of one hash stream for one seed."""
    check_seed(seed)
    salt = int(fmix32(torch.tensor([(stream * _GOLDEN) & MASK32])).item())
    return int(fmix32(torch.tensor([seed ^ salt])).item())


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MASK32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def hash32(x: torch.Tensor, key: int) -> torch.Tensor:
    """H(x): 32-bit hash of non-negative int64 values below 2**63 (the high word is folded in)."""
    return fmix32(fmix32((x & MASK32) ^ key) ^ (x >> 32))


def signs(start: int, stop: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """g(i) in {-1, +1} for the global indices [start, stop), as int8.

    One hash word gives the signs of 32 consecutive elements (bit i mod 32 of H(i // 32)), which
    makes the sign 32 times cheaper than a hash per element while the bits stay independent. The
    bits are unpacked byte-wise in uint8 (the low byte of a word holds bits 0-7), so the
    per-element work is on 1-byte values.
    """
    key = stream_key(seed, STREAM_SIGN)
    first_word = start >> 5
    words = hash32(torch.arange(first_word, ((stop - 1) >> 5) + 1, device=device), key)
    shifts = torch.tensor([0, 8, 16, 24], device=device)
    octets = ((words.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8)  # (words, 4), low byte first
    bits = (octets.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8, device=device)) & 1
    bits = bits.reshape(-1)[start - 32 * first_word : stop - 32 * first_word]
    return (1 - 2 * bits.to(torch.int8)).to(torch.int8)
