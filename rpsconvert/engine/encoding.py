"""The stored pool computed piece by piece: projected, rounded and packed a range of slots at a time.

A pool that is computed whole needs a float64 vector of its size twice over (numerator and
count) and a float copy in the weights' dtype before it is packed: for the pool of a 7 B model at
ratio 1 that is 110 GB, where its codes take 3.5 GB. Computed in pieces of PIECE slots, only the
codes grow with the pool; the weights are read through a Reader (engine/projection.py), so they may
live in the files of a model larger than memory. Pieces start on whole blocks and on whole groups
of codes that fill whole bytes (eight in a bit stream, five in base 3), so a piece's codes and scales are exactly those of the
whole pool's, and the bytes are the same whatever the piece size.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.projection import Reader, project_range
from rpsconvert.engine.storage import MixedStorage, PoolStorage

PIECE = 1 << 20  # slots computed at once: two float64 vectors of 8 MB


def encode_pool(
    storage: PoolStorage | MixedStorage, operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors the file stores for the least-squares pool of `layout`'s weights (by name
    suffix, as `storage.encode` gives them): each piece is projected (`project_range`), put in
    the weights' `dtype` and encoded by its part of the storage, into tensors made once."""
    out = {suffix: torch.empty(shape, dtype=kind) for suffix, kind, shape in storage.tensors(operator.slots)}
    for first, count, part, starts in pieces(storage, operator):
        values = project_range(operator, layout, read, first, first + count).to(dtype)
        for suffix, tensor in part.encode(values).items():
            out[suffix][starts[suffix] : starts[suffix] + len(tensor)] = tensor.to(out[suffix].device)
    return out


def pieces(
    storage: PoolStorage | MixedStorage, operator: PoolOperator, piece: int = PIECE
) -> Iterator[tuple[int, int, PoolStorage, dict[str, int]]]:
    """(first slot, slots, the storage of those slots, where their tensors start) of every piece
    of about `piece` slots: a mixed pool's runs cut into pieces, each on whole blocks and bytes of
    its run. A pool that is projected whole anyway (a mapping other than RandomFold, or a pool too
    small to slice) is one piece per run."""
    slots = operator.slots
    runs = storage.runs if isinstance(storage, MixedStorage) else ((slots, storage),)
    first, starts = 0, {"": 0, ".scales": 0}
    for n, part in runs:
        codes, code_bytes = part.group if part.quantized else (1, 1)
        unit = codes * part.block if part.quantized else 1  # whole blocks and whole bytes
        step = max(1, piece // unit) * unit if operator._folded() else n
        for lo in range(0, n, step):
            within = {"": lo // codes * code_bytes, ".scales": lo // part.block} if part.quantized else {"": lo}
            yield first + lo, min(step, n - lo), part, {suffix: starts[suffix] + within.get(suffix, 0) for suffix in starts}
        for suffix, _, shape in part.tensors(n):
            starts[suffix] += shape[0]
        first += n


def spans(
    storage: PoolStorage | MixedStorage, stored: dict[str, torch.Tensor], slots: int, lo: int, hi: int
) -> Iterator[tuple[PoolStorage, dict[str, torch.Tensor], int, int, int]]:
    """(part, its run's stored tensors, the run's first slot, first and last slot within the run)
    of the slots [lo, hi) of a stored pool, widened to whole blocks and bytes of each run they
    touch: the least that can be encoded again on its own (calibration from files rewrites one
    layer's slots in place this way)."""
    mixed = isinstance(storage, MixedStorage)
    runs = storage.runs if mixed else ((slots, storage),)
    begin = 0
    for index, (n, part) in enumerate(runs):
        if begin < hi and lo < begin + n:
            unit = part.group[0] * part.block if part.quantized else 1
            first = (max(lo, begin) - begin) // unit * unit
            last = min(-(-(min(hi, begin + n) - begin) // unit) * unit, n)
            yield part, storage.run_tensors(stored, index) if mixed else stored, begin, first, last
        begin += n


def rewrite(part: PoolStorage, run: dict[str, torch.Tensor], first: int, values: torch.Tensor) -> None:
    """Encode `values` as the slots from `first` of one run of a stored pool (a `spans` piece),
    in place: the bytes and scales of those slots alone change."""
    codes, code_bytes = part.group if part.quantized else (1, 1)
    at = {"": first // codes * code_bytes, ".scales": first // part.block}
    for suffix, tensor in part.encode(values).items():
        run[suffix][at[suffix] : at[suffix] + len(tensor)] = tensor
