"""Mappings h: global element index -> pool slot.

Every element of every compressed weight has a global index in one virtual vector (a weight's
elements start at its `offset`). A mapping turns any range of global indices into slots, so a weight
can be generated, projected or counted chunk by chunk with bounded temporary memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Protocol

import torch

from rpsconvert.hashing import (
    STREAM_ROTATION,
    STREAM_SLOT,
    STREAM_TILE,
    hash32,
    signs,
    stream_key,
)

CHUNK = 1 << 20  # elements generated at once: about ten int64 temporaries of 8 MB each
MAX_SLOTS = 1 << 32  # hash words are 32-bit, so slots beyond 2**32 would never be reached
_MAX_SEGMENTS = 64  # RandomFold: above this many folds in one range, arithmetic beats ranges


class Mapping(Protocol):
    name: str

    def slots(self, start: int, stop: int, m: int, seed: int, device: torch.device | str) -> torch.Tensor:
        """h(i) for the global indices [start, stop), int64 in [0, m)."""
        ...


@lru_cache(maxsize=64)
def _key(seed: int, stream: int) -> int:
    return stream_key(seed, stream)


@dataclass(frozen=True)
class RandomFold:
    """STABLE-RPS: fold c = i // m lies on the pool rotated by H(c).

    Every slot gets floor(N/m) or ceil(N/m) elements, and for m >= N the map is a bijection, so
    conversion at ratio 1.0 is lossless.
    """

    name: str = "randomfold"

    def slots(self, start, stop, m, seed, device="cpu"):
        first, last = start // m, (stop - 1) // m
        rotation = hash32(torch.arange(first, last + 1, device=device), _key(seed, STREAM_ROTATION)) % m
        if last - first > _MAX_SEGMENTS:  # many tiny folds: one vectorised expression
            i = torch.arange(start, stop, device=device)
            return (rotation[i // m - first] + i % m) % m
        # few folds: each fold's slots are one or two ascending runs, so no per-element arithmetic
        runs = []
        for fold, r in zip(range(first, last + 1), rotation.tolist()):
            lo, hi = max(start, fold * m) - fold * m, min(stop, (fold + 1) * m) - fold * m
            begin = (lo + r) % m
            end = begin + hi - lo
            runs.append(torch.arange(begin, min(end, m), device=device))
            if end > m:
                runs.append(torch.arange(0, end - m, device=device))
        return torch.cat(runs) if len(runs) > 1 else runs[0]


@dataclass(frozen=True)
class HashedNet:
    """Chen et al. 2015: an independent hash per element (unbalanced, lossy even at m = N)."""

    name: str = "hashednet"

    def slots(self, start, stop, m, seed, device="cpu"):
        return hash32(torch.arange(start, stop, device=device), _key(seed, STREAM_SLOT)) % m


@dataclass(frozen=True)
class RoastTile:
    """ROAST: contiguous tiles of `tile` elements are hashed as a whole onto the pool."""

    name: str = "roast"
    tile: int = 1024

    def slots(self, start, stop, m, seed, device="cpu"):
        i = torch.arange(start, stop, device=device)
        tile = i // self.tile
        first = start // self.tile
        offsets = hash32(torch.arange(first, (stop - 1) // self.tile + 1, device=device), _key(seed, STREAM_TILE))
        return (offsets[tile - first] + i % self.tile) % m


MAPPINGS: dict[str, Mapping] = {m.name: m for m in (RandomFold(), HashedNet(), RoastTile())}


def get_mapping(name: str) -> Mapping:
    try:
        return MAPPINGS[name]
    except KeyError:
        raise ValueError(f"unknown mapping {name!r}: choose one of {', '.join(MAPPINGS)}") from None


def chunks(
    mapping: Mapping, offset: int, numel: int, m: int, seed: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(local start, local stop, slots, signs) for one weight's elements, CHUNK at a time."""
    for lo in range(0, numel, CHUNK):
        hi = min(lo + CHUNK, numel)
        yield lo, hi, mapping.slots(offset + lo, offset + hi, m, seed, device), signs(offset + lo, offset + hi, seed, device)
