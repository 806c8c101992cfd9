"""The plan for a byte budget: how many bits each slot gets, and so how many slots there are.

A budget can buy few precise slots or many coarse ones. Hashing k weights into a slot keeps about
1/k of a matrix's energy, while rounding to b bits adds noise about 2**-b of the block's peak, so
near the dense size precision is what to cut, and collisions only when bytes are scarce. Where the
budget holds one slot per element, each layer gets its own width from 8 down to 2 bits (`mixed`).
The plan projects the weights once per candidate storage, puts the pool on that storage's grid, and keeps
the candidate whose generated weights are closest to the originals: the mean over layers of the
relative squared error, so a small layer counts as much as a big one (each layer's error passes
through the network multiplicatively). Weighing each element's error by its input feature's mean
square on example inputs (the output error's diagonal, as activation-aware quantizers do) was
measured and dropped: on a pretrained MobileNetV2 at 1/4, 1/6 and 1/8 of the bytes it chose the
same mixes, within one or two crops of agreement (docs/quality.md).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rpsconvert.engine.mapping import Mapping, chunks
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.encoding import PIECE, encode_pool, pieces
from rpsconvert.engine.projection import Reader, signed, signed_runs, solve
from rpsconvert.engine.storage import MixedStorage, PackedPool, PoolStorage

# What the plan weighs against each other: float32, float16 and every integer width from 8 down to
# 2 bits. Scales are float16: half the bytes of float32 scales, the same agreement on a pretrained
# MobileNetV2 (docs/quality.md, "Pool storage"), where blocks of 32 kept int8 at 100 % top-1
# agreement and blocks of 64 and 128 lost 3 and 6 points. Every width earns its place: each bit
# cuts the rounding error about fourfold, and a budget between two widths is met by a per-layer
# mix of those two (see `mixed`), so the finer the ladder the less a budget wastes on the coarser.
# int2 is packed in base 3 (1.6 bits a code, where a bit stream takes 2 for its three codes).
QUANTIZED = tuple(PoolStorage(torch.float16, bits=bits, block=32, packing="base3" if bits == 2 else "bits") for bits in range(8, 1, -1))
CANDIDATES = (PoolStorage(torch.float32), PoolStorage(torch.float16), *QUANTIZED)
# The per-layer plan's ladder (`mixed`), widest first: the widths above, then int2 with longer
# blocks, whose scales cost less. At 1/16 of the fp32 bytes (2 bits a weight) int2 in blocks of 32
# takes 2.1 bits with its scales, in blocks of 64 1.85 and of 128 1.725: only these let every
# weight keep a slot of its own there, where the shared pool's collisions cost far more (on
# all-MiniLM-L6-v2, every weight at int2 in blocks of 64 keeps a held-out embedding cosine of 0.32,
# the int3 pool at ratio 0.56 that 1/16 bought before 0.03). A step to a longer block is a step
# down the ladder as a bit is: less error per byte saved goes first.
LADDER = (*QUANTIZED, *(PoolStorage(torch.float16, bits=2, block=block, packing="base3") for block in (64, 128)))

# Told each stage of a conversion as it starts, with the passes over the compressed weights it will
# read (None where the plan decides as it goes): a model read from its files is read many times
# over, and this is how a progress display knows how far a stage is and what is left.
OnStage = Callable[[str, int | None], None]

# Elements of a layer whose error at a width the per-layer plan measures, in SPANS runs of rows
# (`_sample`): 8 MB of float64.
SAMPLE, SPANS = 1 << 20, 16


@dataclass(frozen=True)
class Candidate:
    """One way to spend the budget, with what it would cost and how far from the original it is."""

    storage: PoolStorage | MixedStorage
    slots: int
    file_bytes: int  # the checkpoint's bytes, header and dense tensors included
    error: float  # mean over layers of ||W - W_generated||^2 / ||W||^2

    def row(self) -> dict:
        return {"storage": str(self.storage), "slots": self.slots, "file_bytes": self.file_bytes, "weight_error": self.error}


def error_sums(operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, theta: torch.Tensor | PackedPool) -> list[tuple[float, float]]:
    """(||W_generated - W||^2, ||W||^2) of each weight `theta` generates, a piece of PIECE
    elements of it at a time (a weight of a model larger than memory is read in pieces)."""
    sums = []
    with torch.no_grad():
        for weight in layout:
            norm = diff = 0.0
            for lo in range(0, weight.numel, PIECE):
                hi = min(lo + PIECE, weight.numel)
                original = read(weight, lo, hi).double()
                part = dataclasses.replace(weight, shape=(hi - lo,), offset=weight.offset + lo)
                norm += float(original.square().sum())
                diff += float((operator.generate(theta, part).double() - original).square_().sum())
            sums.append((diff, norm))
    return sums


def _relative(sums: Sequence[tuple[float, float]]) -> list[float]:
    return [diff / norm if norm > 0 else float(diff > 0) for diff, norm in sums]


def _mean(errors: list[float]) -> float:
    return sum(errors) / max(len(errors), 1)


def layer_errors(operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, theta: torch.Tensor | PackedPool) -> list[float]:
    """The relative squared error of each weight `theta` generates."""
    return _relative(error_sums(operator, layout, read, theta))


def weight_error(operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, theta: torch.Tensor | PackedPool) -> float:
    """Mean over layers of the relative squared error of the weights `theta` generates."""
    return _mean(layer_errors(operator, layout, read, theta))


def stored_error(
    storage: PoolStorage | MixedStorage, operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, dtype: torch.dtype
) -> float:
    """`weight_error` of the pool `encode_pool` would store, measured as it is projected and
    never stored: each piece of slots is projected from the elements that land there, rounded as
    it would be stored, and those same elements compared with what it generates for them. A
    candidate then costs one read of the weights instead of two and holds no pool (at a quarter
    of a 7B model's bf16 bytes a float32 candidate's is 3.4 GB). Each element's squared error is
    the one generation gives (|scale * sign * v - w| = |scale * v - sign * w|, rounded alike); only
    the order of the sums differs. A piece has about PIECE landing elements, whatever the ratio.
    Pools projected whole anyway (PoolOperator._folded) are stored and measured as they are.
    """
    if not (operator._folded() and len(layout)):
        stored = encode_pool(storage, operator, layout, read, dtype)
        return weight_error(operator, layout, read, PackedPool(storage, stored, operator.slots, dtype))
    device = read(layout[0], 0, 0).device
    factors = [operator.signed(torch.empty(0, dtype=dtype, device=device), w.scale)[0] for w in layout]
    sums = [[0.0, 0.0] for _ in layout]
    for first, count, part, _ in pieces(storage, operator, max(1, PIECE * operator.slots // sum(w.numel for w in layout))):
        runs = list(signed_runs(operator, layout, read, first, first + count))
        snapped = part.snap(solve(runs, layout, first, first + count, device).to(dtype))
        for index, slot, elements in runs:  # each times its sign
            generated = snapped[slot - first : slot - first + len(elements)] * factors[index]
            sums[index][0] += float((generated.double() - elements).square_().sum())
            sums[index][1] += float(elements.square().sum())
    return _mean(_relative(sums))


def row_block(row: int, target: int = 32) -> int:
    """The block size nearest `target` slots (in ratio) that puts every row of `row` elements on
    block boundaries: a divisor of the row, or a multiple of it.

    A block that straddles two rows shares one scale between two output channels of different
    ranges; on a pretrained MobileNetV2, starting the blocks at every row lifted int4 from 0.39 to
    0.67 top-1 agreement (logit cosine 0.74 to 0.86) at the same bits (docs/quality.md).
    A row of a prime length above 2 * target has no such block nearby; it keeps `target` (a
    block of hundreds of slots would round every slot more coarsely than a shared scale does).
    """
    options = [d for d in range(1, row + 1) if row % d == 0] + [row * k for k in range(2, target + 1)]
    best = min(options, key=lambda block: (abs(math.log(block / target)), -block))
    return best if target // 2 <= best <= 2 * target else target


def _row(weight: CompressedWeight) -> int:
    """The elements of one output row (a Linear's in_features, a conv's in/groups * kernel)."""
    return weight.numel // weight.shape[0] if weight.shape else 1


def _first_slots(operator: PoolOperator, layout: Sequence[CompressedWeight], device) -> list[int]:
    """The slot of each weight's first element (its run starts there in a lossless RandomFold pool)."""
    return [int(next(chunks(operator.mapping, w.offset, 1, operator.slots, operator.seed, device))[2][0]) for w in layout]


def aligned(
    slots: int, layout: Sequence[CompressedWeight], firsts: Sequence[int], parts: Sequence[Sequence[tuple[int, PoolStorage]]]
) -> MixedStorage:
    """The storage of a lossless RandomFold pool of `slots` slots (each weight one contiguous run,
    from its first element's slot `firsts[l]`, wrapping past the pool's end) in which weight l's
    elements are stored in `parts[l]`: (elements, rung) pairs in element order, each a run of the
    rung's storage in blocks of `row_block` of the weight's rows (near the rung's block), so that
    every block holds whole rows or a part of one row."""
    m, runs = slots, []
    for weight, first, weight_parts in zip(layout, firsts, parts):
        for n, rung in weight_parts:
            storage = _on_rows(rung, weight)
            runs += [(first, min(n, m - first), storage)] + ([(0, n - (m - first), storage)] if first + n > m else [])
            first = (first + n) % m
    return MixedStorage(tuple((n, storage) for _, n, storage in sorted(runs, key=lambda run: run[0]) if n))


def _on_rows(rung: PoolStorage, weight: CompressedWeight) -> PoolStorage:
    """A ladder rung's storage for `weight`: its block moved to the nearest that keeps rows whole."""
    return dataclasses.replace(rung, block=row_block(_row(weight), rung.block))


def mixed(
    operator: PoolOperator, layout: Sequence[CompressedWeight], read: Reader, room: Callable[[MixedStorage], int]
) -> MixedStorage | None:
    """Per-layer widths for a lossless RandomFold pool (one slot per element), blocks aligned to
    rows (`aligned`): every layer starts at the widest width, and the step down one rung of
    LADDER (a bit, or at int2 a longer block) that adds the least error per byte saved is taken,
    again and again, until the pool's bytes fit
    `room(storage)` (the budget left once the header, which lists the runs, is paid); of the step
    that tips the balance only as many rows move as the budget needs. None when even every layer
    at the narrowest width does not fit.

    This is the greedy of mixed-precision allocators for a multiple-choice knapsack (HAWQ's,
    llama.cpp's target size): each bit removed costs a layer about four times the error of the one
    before, so the steps' error per byte only grows and taking the cheapest next step is close to
    the best allocation. Widths are free to differ by more than one bit between layers: on a
    pretrained MobileNetV2 at a quarter of the bytes, keeping sensitive layers at int8 and moving
    others to int4 beat int7 everywhere (docs/quality.md). At ratio 1.0 a layer's pool run is its
    weight times its signs over its scale, so its rounding error is measured on the run itself
    (on spans of its rows when it is large: `_sample`).

    The layer whose step tips the balance keeps its first rows at the wider width and moves its
    last rows down. For a matrix or a convolution which rows go is indifferent (output channels
    have no order), but an embedding's rows are tokens, and tokenizers number them by frequency
    (BPE merges in order, WordPiece and SentencePiece by count): on docstring sentences 79 % of
    all-MiniLM-L6-v2's tokens are among its first 5,000 of 30,522 ids (42 % among the first 2,000).
    At 1/8 of its bytes the plan splits that embedding between int3 and int2, and keeping its first
    rows at int3 lifted the held-out embedding cosine without data from 0.9444 to 0.9631, the same
    bytes and widths; a pretrained MobileNetV2 gained a crop or two of 128 (top-1 agreement 94.5 to
    95.3 % at 1/4, 44.5 to 46.1 % at 1/8; docs/benchmarks.md, "Recovery speed"). Counting an
    embedding's or a big layer's error more (a weight per layer of 4 to 64, or its elements' share
    to the power 0.25 to 1) moved whole widths between the embedding and the encoder and gained at
    most 0.003 (0.892 at worst): which rows it keeps matters more than how many bits it gets.
    """
    device = read(layout[0], 0, 0).device
    firsts = _first_slots(operator, layout, device)
    widths = LADDER  # widest first

    def fits(parts) -> MixedStorage | None:
        storage = aligned(operator.slots, layout, firsts, parts)
        return storage if storage.bytes(operator.slots) <= room(storage) else None

    level = [0] * len(layout)  # index into widths of each layer's width

    def parts(step: int | None = None, rows: int = 0) -> list[list[tuple[int, int]]]:
        """Every layer at its level; layer `step`'s last `rows` rows one width lower."""
        out = [[(w.numel, widths[k])] for w, k in zip(layout, level)]
        if step is not None:
            row = _row(layout[step])
            out[step] = [(layout[step].numel - rows * row, widths[level[step]]), (rows * row, widths[level[step] + 1])]
        return out

    widest = fits(parts())
    if widest is not None or not fits([[(w.numel, widths[-1])] for w in layout]):
        return widest

    @functools.cache
    def error(l: int, k: int) -> float:
        """Layer l's relative squared error at widths[k], measured on `_sample`'s blocks of its
        pool run; computed when the greedy first asks, since near the dense size no layer goes
        down more than a few widths (half the plan's time on a 33M-weight encoder at a quarter of
        the bytes went to widths never reached)."""
        storage = _on_rows(widths[k], layout[l])
        run = _sample(operator, layout[l], read, storage.block)
        return float((storage.snap(run) - run).square_().sum()) / max(float(run.square().sum()), 1e-300)

    def cost(l: int) -> float:  # error added per element moved one width down
        return (error(l, level[l] + 1) - error(l, level[l])) / max(layout[l].numel, 1)

    steps = [(cost(l), l) for l in range(len(layout))]
    heapq.heapify(steps)
    while steps:
        _, l = heapq.heappop(steps)
        if not fits(parts(l, layout[l].shape[0])):
            level[l] += 1
            if level[l] + 1 < len(widths):
                heapq.heappush(steps, (cost(l), l))
            continue
        # this step tips it: move only as many of the layer's rows as the budget needs, so no byte idles
        few, many = 0, layout[l].shape[0]  # moving `many` rows fits, moving `few` does not
        while many - few > 1:
            middle = (few + many) // 2
            few, many = (few, middle) if fits(parts(l, middle)) else (middle, many)
        return fits(parts(l, many))
    raise AssertionError("every layer at the narrowest width fits, so some step tips the balance")


def _sample(operator: PoolOperator, weight: CompressedWeight, read: Reader, block: int) -> torch.Tensor:
    """The float64 pool values of a weight's run in a lossless RandomFold pool (each element times
    its sign over its scale: no other element shares its slot), whole blocks of it: all of it up
    to SAMPLE elements, else SAMPLE of them in SPANS runs of whole rows spread evenly over it.

    Blocks are rounded independently, so a sample of whole blocks measures each of them exactly,
    and a layer's error is estimated from SAMPLE / 32 blocks. Measured whole, a 7B model's widths
    had read 49 GB of weights in 1710 CPU seconds (3.6 passes over the model, each rounding with
    five clips) and were not done: more than the 30 minutes the whole conversion may take. On
    all-MiniLM-L6-v2 (its embedding of 11.7M elements sampled) and MobileNetV2 (no layer above
    SAMPLE) at 1/4 and 1/8 of the bytes the plan chose the same widths as measured whole.
    """
    if weight.numel <= SAMPLE:
        spans = [(0, weight.numel)]
    else:
        unit = -(-_row(weight) // block) * block  # a row, rounded up to whole blocks
        span = max(1, SAMPLE // SPANS // unit) * unit
        spans = [(lo, lo + span) for lo in sorted({i * (weight.numel // unit * unit - span) // (SPANS - 1) // unit * unit for i in range(SPANS)})]
    runs = [signed(operator, weight, read, lo, hi).mul_(weight.scale).div_(max(weight.scale**2, 1e-300)) for lo, hi in spans]
    return torch.cat(runs)  # divided as project_range divides: the same bits


def choose(
    candidates: Sequence[tuple[PoolStorage | MixedStorage, int, int]],
    mapping: Mapping,
    seed: int,
    read: Reader,
    layout_for: Callable[[int], list[CompressedWeight]],
    dtype: torch.dtype,
    on_stage: OnStage,
) -> tuple[Candidate, list[Candidate]]:
    """The candidate (storage, slots, file bytes) with the least weight error, and all of them scored.

    `layout_for(slots)` gives the weights' layout (their scales depend on whether the pool is
    lossless). Ties go to the earlier candidate. Each candidate is scored as it is projected
    (`stored_error`), so the plan holds no pool: the winner is encoded once more at the end.
    """
    scored = []
    for i, (storage, slots, file_bytes) in enumerate(candidates, 1):
        on_stage(f"scoring candidate {i} of {len(candidates)}: {storage}", 1)
        operator = PoolOperator(mapping, slots, seed)
        scored.append(Candidate(storage, slots, file_bytes, stored_error(storage, operator, layout_for(slots), read, dtype)))
    return min(scored, key=lambda c: c.error), scored
