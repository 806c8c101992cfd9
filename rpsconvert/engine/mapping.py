"""Mappings h: global element index -> pool slot, and the registry that names them.

Every element of every compressed weight has a global index in one virtual vector (a weight's
elements start at its `offset`). A mapping turns any range of global indices into slots, so a weight
can be generated, projected or counted chunk by chunk with bounded temporary memory.

A mapping is a frozen dataclass registered under its `name`: the name and the dataclass fields
(ROAST's tile size) are written into every checkpoint, so a file regenerates its weights with the
very mapping that made it. `register_mapping` is all a new mapping needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, ClassVar, Iterator, Protocol

import torch

from rpsconvert.engine.hashing import (
    STREAM_ROTATION,
    STREAM_SLOT,
    STREAM_TILE,
    hash32,
    signs,
    stream_key,
)

CHUNK = 1 << 20  # elements generated at once: about ten int64 temporaries of 8 MB each
HASHED_SLOTS = 1 << 32  # a slot drawn from one 32-bit hash word: a pool beyond 2**32 slots is never reached past it
_MAX_SEGMENTS = 64  # RandomFold: above this many folds in one range, arithmetic beats ranges


class Mapping(Protocol):
    name: ClassVar[str]
    max_slots: ClassVar[int]  # pools must have fewer slots than this (the format's bound, docs/format.md)

    def slots(self, start: int, stop: int, m: int, seed: int, device: torch.device | str) -> torch.Tensor:
        """h(i) for the global indices [start, stop), int64 in [0, m)."""
        ...


MAPPINGS: dict[str, type[Mapping]] = {}


def register_mapping(cls: type[Mapping]) -> type[Mapping]:
    """Class decorator: make a mapping known to `convert(mapping=...)`, the CLI and the file reader.

    A mapping that does not state `max_slots` gets the bound of a slot drawn from a hash word."""
    if cls.name in MAPPINGS:
        raise ValueError(f"a mapping named {cls.name!r} is already registered")
    if not hasattr(cls, "max_slots"):
        cls.max_slots = HASHED_SLOTS
    MAPPINGS[cls.name] = cls
    return cls


def get_mapping(mapping: str | Mapping, params: dict[str, Any] | None = None) -> Mapping:
    """The mapping named `mapping` with `params` (its dataclass fields), or `mapping` itself."""
    if not isinstance(mapping, str):
        if type(mapping) not in MAPPINGS.values():
            raise ValueError(f"{type(mapping).__name__} is not a registered mapping: decorate it with register_mapping")
        return mapping
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r}: choose one of {', '.join(MAPPINGS)}")
    try:
        return MAPPINGS[mapping](**(params or {}))
    except TypeError as exc:
        raise ValueError(f"invalid parameters {params} for mapping {mapping!r} ({exc})") from None


def mapping_params(mapping: Mapping) -> dict[str, Any]:
    """The parameters that, with its name, rebuild `mapping` (recorded in checkpoints)."""
    return {f.name: getattr(mapping, f.name) for f in fields(mapping)}


@lru_cache(maxsize=64)
def _key(seed: int, stream: int) -> int:
    return stream_key(seed, stream)


@register_mapping
@dataclass(frozen=True)
class RandomFold:
    """STABLE-RPS: fold c = i // m lies on the pool rotated by H(c).

    Every slot gets floor(N/m) or ceil(N/m) elements, and for m >= N the map is a bijection, so
    conversion at ratio 1.0 is lossless.

    The offset `i mod m` reaches every slot whatever the size of the pool, so a pool may have more
    slots than a hash word has values (a 7B model at ratio 1 needs 6.7e9): beyond 2**32 slots the
    rotations H(c) mod m all fall in the first 2**32, which changes no slot's load (each fold still
    covers the pool once). The bound is 2**53, the largest integer every JSON reader holds exactly.
    """

    name: ClassVar[str] = "randomfold"
    max_slots: ClassVar[int] = 1 << 53

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


@register_mapping
@dataclass(frozen=True)
class HashedNet:
    """Chen et al. 2015: an independent hash per element (unbalanced, lossy even at m = N)."""

    name: ClassVar[str] = "hashednet"
    max_slots: ClassVar[int] = HASHED_SLOTS

    def slots(self, start, stop, m, seed, device="cpu"):
        return hash32(torch.arange(start, stop, device=device), _key(seed, STREAM_SLOT)) % m


@register_mapping
@dataclass(frozen=True)
class RoastTile:
    """ROAST: contiguous tiles of `tile` elements are hashed as a whole onto the pool."""

    name: ClassVar[str] = "roast"
    max_slots: ClassVar[int] = HASHED_SLOTS
    tile: int = 1024

    def __post_init__(self):
        if not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"ROAST's tile must be a positive integer, got {self.tile!r}")

    def slots(self, start, stop, m, seed, device="cpu"):
        i = torch.arange(start, stop, device=device)
        tile = i // self.tile
        first = start // self.tile
        offsets = hash32(torch.arange(first, (stop - 1) // self.tile + 1, device=device), _key(seed, STREAM_TILE))
        return (offsets[tile - first] + i % self.tile) % m


def chunks(
    mapping: Mapping, offset: int, numel: int, m: int, seed: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(local start, local stop, slots, signs) for one weight's elements, CHUNK at a time."""
    for lo in range(0, numel, CHUNK):
        hi = min(lo + CHUNK, numel)
        yield lo, hi, mapping.slots(offset + lo, offset + hi, m, seed, device), signs(offset + lo, offset + hi, seed, device)
