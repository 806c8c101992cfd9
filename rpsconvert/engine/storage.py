"""How the pool's values are stored: a float dtype, or b-bit integer codes with a scale per block.

Bytes buy precision before they buy slots: with k weights per slot a matrix keeps about 1/k of its
energy, while int8 in blocks of 64 keeps a trained encoder at 0.9998 cosine for a quarter of the
bytes. So the pool can be stored as symmetric round-to-nearest integer codes, one scale per `block`
consecutive slots (at ratio 1.0 RandomFold lays every weight out contiguously, so a block is a run
of one weight: group-wise weight quantization).

In memory the pool is held as it is stored (PackedPool: `read` dequantizes a range of slots from
the bytes and scales that hold it, `gather` any slots), so a model runs in the bytes of its file.
While it trains it is a float latent pool in the weights' dtype, read through `snap` (values on the
stored grid, straight-through for gradients), so the model that runs is the model that is saved.
"""

from __future__ import annotations

import bisect
import itertools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 5, 6, 7, 8)  # every width from the coarsest useful one to a byte, packed as a bit stream
# How the codes are laid in bytes: a bit stream of b-bit fields, or (2-bit codes only) base 3, five
# codes a byte. Symmetric int2 has three codes, -1, 0 and 1, so its bit stream leaves a quarter of
# its fields unused: five of them in a byte (3**5 = 243 <= 256) are 1.6 bits a weight instead of 2,
# which at 1/16 of the fp32 bytes (2 bits a weight) is what lets every weight keep a slot of its own.
PACKINGS = ("bits", "base3")
SCALE_DTYPES = (torch.float16, torch.float32)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6)  # fractions of a block's peak tried as its top level


@dataclass(frozen=True)
class PoolStorage:
    """A float `dtype` (bits None), or `bits`-bit codes with one `dtype` scale per `block` slots,
    laid in bytes as `packing` says (PACKINGS)."""

    dtype: torch.dtype = torch.float32
    bits: int | None = None
    block: int = 64
    packing: str = "bits"

    def __post_init__(self):
        if self.bits is None:
            if self.dtype not in FLOAT_DTYPES:
                raise ValueError(f"a float pool is stored as one of {', '.join(map(dtype_name, FLOAT_DTYPES))}, not {dtype_name(self.dtype)}")
            return
        if self.bits not in BITS:
            raise ValueError(f"a quantized pool has {', '.join(map(str, BITS))} bits per slot, not {self.bits!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"the quantization block must be a positive number of slots, got {self.block!r}")
        if self.dtype not in SCALE_DTYPES:
            raise ValueError(f"block scales are float16 or float32, not {dtype_name(self.dtype)}")
        if self.packing not in PACKINGS or (self.packing == "base3" and self.bits != 2):
            raise ValueError(f"codes are packed as a bit stream, or 2-bit codes in base 3, not {self.bits}-bit codes as {self.packing!r}")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def widths(self) -> set[int]:
        """The integer widths of the codes (none for a float pool)."""
        return {self.bits} if self.quantized else set()

    @property
    def levels(self) -> int:
        """The largest code: codes are integers in [-levels, levels] (symmetric, zero exact)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def group(self) -> tuple[int, int]:
        """(codes, bytes) of the smallest run of codes that fills whole bytes: 8 codes of b bits
        are b bytes, 5 codes in base 3 one byte. Pieces of a pool cut on such groups (and on
        blocks) pack independently."""
        return (5, 1) if self.packing == "base3" else (8, self.bits)

    def __str__(self) -> str:
        if not self.quantized:
            return dtype_name(self.dtype)
        packing = "5 codes a byte, " if self.packing == "base3" else ""
        return f"int{self.bits} ({packing}blocks of {self.block}, {dtype_name(self.dtype)} scales)"

    def bytes(self, slots: int) -> int:
        """The exact bytes the stored pool of `slots` slots takes in a checkpoint."""
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.tensors(slots))

    def tensors(self, slots: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name suffix, dtype, shape) of every tensor the stored pool is made of."""
        if not self.quantized:
            return [("", self.dtype, (slots,))]
        codes = math.ceil(slots / 5) if self.packing == "base3" else math.ceil(slots * self.bits / 8)
        return [("", torch.uint8, (codes,)), (".scales", self.dtype, (math.ceil(slots / self.block),))]

    def _rounded(self, values: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Round-to-nearest codes (as floats, one row per block) and the block scales, piece by
        piece: (first slot, codes, scales). Scales are rounded to the scale dtype first so that
        dequantizing with the stored scales gives exactly the values the codes were made for.

        Each block's scale is the one of CLIPS times its peak with the least squared error: with few
        levels, clipping a rare large value costs less than coarsening every other one (int4 on a
        pretrained MobileNetV2: docs/quality.md). The unclipped scale comes first, so values
        already on a grid (a loaded pool) keep it exactly: snap is idempotent.

        On a CPU the search runs over pieces of _SEARCH_CHUNK slots that stay in cache: a
        straight-through training step rounds the whole pool, and over the whole of a 22.7M-slot
        pool at once the search's passes were 4.5 times slower (same bits; issue 25).
        """
        v = values.detach()
        step = len(v) if v.device.type != "cpu" else max(1, _SEARCH_CHUNK // self.block) * self.block
        for first in range(0, len(v), max(step, 1)):
            piece = v[first : first + step].float()
            blocks = torch.nn.functional.pad(piece, (0, -len(piece) % self.block)).view(-1, self.block)
            peak = blocks.abs().amax(dim=1)
            best_scales = best_codes = best_error = None
            for clip in CLIPS:
                scales = torch.where(peak > 0, clip * peak / self.levels, torch.ones_like(peak)).to(self.dtype)
                step_size = scales.float().unsqueeze(1)
                codes = torch.round(blocks / step_size).clamp_(-self.levels, self.levels)
                error = (codes * step_size - blocks).square_().sum(dim=1)
                if best_error is None:
                    best_scales, best_codes, best_error = scales, codes, error
                    continue
                better = error < best_error
                best_scales = torch.where(better, scales, best_scales)
                best_codes = torch.where(better.unsqueeze(1), codes, best_codes)
                best_error = torch.minimum(error, best_error)
            yield first, best_codes, best_scales

    def _codes_and_scales(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes (int16) and block scales `_rounded` finds for `values`."""
        codes = torch.empty(len(values), dtype=torch.int16, device=values.device)
        scales = torch.empty(-(-len(values) // self.block), dtype=self.dtype, device=values.device)
        for first, piece, piece_scales in self._rounded(values):
            codes[first : first + piece.numel()] = piece.view(-1)[: len(values) - first]
            scales[first // self.block : first // self.block + len(piece_scales)] = piece_scales
        return codes, scales

    def snap(self, values: torch.Tensor) -> torch.Tensor:
        """`values` as they will be stored and read back (idempotent), in their own dtype."""
        if not self.quantized:
            return values.to(self.dtype).to(values.dtype)
        return self._snap_into(values, torch.empty_like(values))

    def _snap_into(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`snap` written into `out` (a mixed pool's run of its whole rounding), piece by piece."""
        for first, codes, scales in self._rounded(values):
            out[first : first + codes.numel()] = (codes * scales.float().unsqueeze(1)).view(-1)[: len(values) - first]
        return out

    def resnap(self, values: torch.Tensor, snapped: torch.Tensor, slots: torch.Tensor) -> list[tuple[int, int]]:
        """Bring `snapped` (the snap of values before they changed at `slots`) up to date, in
        place, and return the ranges rewritten: one run, so the whole of it."""
        snapped.copy_(self.snap(values))
        return [(0, len(values))]

    def grid(self, values: torch.Tensor, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step (block scale, float32) and largest code of the slots [lo, hi) of the pool
        `values`, as `snap` would round them: the grid that data-aware rounding
        (quality/rounding.py) rounds onto. Only the blocks holding those slots are read."""
        hi = len(values) if hi is None else hi
        first = lo // self.block * self.block
        _, scales = self._codes_and_scales(values[first : -(-hi // self.block) * self.block])
        steps = scales.float().repeat_interleave(self.block)[lo - first : hi - first]
        return steps, torch.full_like(steps, float(self.levels))

    def encode(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors to store, by name suffix (see `tensors`)."""
        if not self.quantized:
            return {"": values.detach().to(self.dtype)}
        codes, scales = self._codes_and_scales(values)
        if self.packing == "base3":
            return {"": _pack_base3((codes + 1).to(torch.uint8)), ".scales": scales}
        offset = (codes + 2 ** (self.bits - 1)).to(torch.uint8)  # [1, 2**bits - 1]: never negative
        return {"": _pack(offset, self.bits), ".scales": scales}

    def decode(self, stored: dict[str, torch.Tensor], slots: int) -> torch.Tensor:
        """The pool values `encode` stored, float32 when quantized (a bad file raises ValueError)."""
        validate(self, stored, slots)
        return self.read(stored, 0, slots)

    def read(self, stored: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        """The values of slots [lo, hi) of a stored pool, exactly as `decode` gives them, read from
        the bytes and scales that hold them only: generation dequantizes the runs it reads this way,
        so no float copy of the pool is ever made (a float pool: a slice in its own dtype)."""
        if not self.quantized:
            return stored[""][lo:hi]
        if hi <= lo:
            return torch.zeros(0, device=stored[""].device)
        pieces = []
        size, size_bytes = self.group
        for start in range(lo, hi, _CHUNK):  # bounded temporaries for any range
            stop = min(start + _CHUNK, hi)
            first = start // self.block * self.block  # whole blocks, so each multiplies by one scale
            blocks = -(-(stop - first) // self.block)
            group = first // size  # whole groups of codes, which are whole bytes
            end = -(-(first + blocks * self.block) // size)
            packed = stored[""][group * size_bytes : end * size_bytes]
            codes = _base3_codes(packed, end - group) if self.packing == "base3" else _codes(packed, self.bits, end - group)
            codes = codes[first - size * group : first - size * group + blocks * self.block].view(blocks, self.block)
            scales = stored[".scales"][first // self.block : first // self.block + blocks].float()
            pieces.append((codes * scales.unsqueeze(1)).view(-1)[start - first : stop - first])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def gather(self, stored: dict[str, torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        """The values of the pool at `slots` (any int64 indices), exactly as `decode` gives them:
        each code is read from the one or two bytes that hold its bits (mappings other than
        RandomFold read one slot per element)."""
        if not self.quantized:
            return stored[""][slots]
        if self.packing == "base3":
            return _gather_base3(stored[""], slots) * stored[".scales"][slots // self.block].float()
        return _stream_codes(stored[""], slots * self.bits, self.bits) * stored[".scales"][slots // self.block].float()

    def packs(self, dtype: torch.dtype) -> bool:
        """Whether a pool computing in `dtype` is held in memory as stored rather than as `dtype`
        values: integer codes, or a narrower float (RPSPool.pack)."""
        return self.quantized or (self.dtype != dtype and self.dtype.itemsize < dtype.itemsize)

    def to_json(self) -> dict:
        if not self.quantized:
            return {"dtype": dtype_name(self.dtype)}
        packing = {"packing": self.packing} if self.packing != "bits" else {}
        return {"dtype": "uint8", "bits": self.bits, "block": self.block, "scale_dtype": dtype_name(self.dtype), **packing}


@dataclass(frozen=True)
class MixedStorage:
    """Consecutive runs of the pool, each quantized its own way: (slots, storage) in slot order.

    At ratio 1.0 RandomFold gives every weight one contiguous run of the pool, so runs are layers,
    and bytes go where a layer's error costs most: mixed precision per layer. The runs' codes and
    scales are stored back to back in the same two tensors as a uniform quantized pool.
    """

    runs: tuple[tuple[int, PoolStorage], ...]

    def __post_init__(self):
        if not self.runs or any(n < 1 or not part.quantized or part.dtype != self.runs[0][1].dtype for n, part in self.runs):
            raise ValueError("a mixed pool is runs of at least one slot, all quantized, all with the same scale dtype")
        # where each run starts (made here, not on first use: torch.compile may be tracing then)
        starts = [(0, 0, 0)]  # (first slot, first code byte, first scale) of every run, and one past the last
        for n, part in self.runs:
            size = {suffix: shape[0] for suffix, _, shape in part.tensors(n)}
            slot, byte, scale = starts[-1]
            starts.append((slot + n, byte + size[""], scale + size[".scales"]))
        object.__setattr__(self, "_starts", starts)
        # (runs, 6) int64: each run's first slot, first code byte, first scale, bits, block, and 1 if base 3
        rows = [(*start, part.bits, part.block, int(part.packing == "base3")) for start, (_, part) in zip(starts, self.runs)]
        object.__setattr__(self, "_table", torch.tensor(rows, dtype=torch.int64))

    quantized = True

    @property
    def dtype(self) -> torch.dtype:
        return self.runs[0][1].dtype

    @property
    def widths(self) -> set[int]:
        return {part.bits for _, part in self.runs}

    def __str__(self) -> str:
        if len(self.widths) == 1:
            return f"int{self.runs[0][1].bits} (blocks per layer row, {dtype_name(self.dtype)} scales)"
        slots = sum(n for n, _ in self.runs)
        shares = {}
        for n, part in self.runs:
            shares[part.bits] = shares.get(part.bits, 0) + n
        return "mixed " + " + ".join(f"int{bits} {_share(n / slots)}" for bits, n in sorted(shares.items(), reverse=True))

    def _check(self, slots: int) -> None:
        if sum(n for n, _ in self.runs) != slots:
            raise ValueError(f"the mixed pool's runs cover {sum(n for n, _ in self.runs)} slots, the pool has {slots}")

    def tensors(self, slots: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """As PoolStorage.tensors; the shapes are the runs' own (`slots` is theirs by construction)."""
        sizes = [{suffix: shape[0] for suffix, _, shape in part.tensors(n)} for n, part in self.runs]
        return [("", torch.uint8, (sum(s[""] for s in sizes),)), (".scales", self.dtype, (sum(s[".scales"] for s in sizes),))]

    def bytes(self, slots: int) -> int:
        """The stored bytes: fixed by the runs, whatever `slots` (kept for PoolStorage's signature)."""
        return sum(part.bytes(n) for n, part in self.runs)

    @classmethod
    def from_bits(cls, bits: torch.Tensor, parts: dict[int, PoolStorage]) -> MixedStorage:
        """The runs of a per-slot bit width: each maximal run of equal widths is one part."""
        change = torch.nonzero(bits[1:] != bits[:-1]).flatten() + 1
        edges = [0, *change.tolist(), len(bits)]
        return cls(tuple((b - a, parts[int(bits[a])]) for a, b in zip(edges, edges[1:])))

    def _parts(self, values: torch.Tensor):
        return zip(values.split([n for n, _ in self.runs]), (part for _, part in self.runs))

    def snap(self, values: torch.Tensor) -> torch.Tensor:
        self._check(len(values))
        snapped = torch.empty_like(values)
        for (v, part), out in zip(self._parts(values), snapped.split([n for n, _ in self.runs])):
            part._snap_into(v, out)
        return snapped

    def resnap(self, values: torch.Tensor, snapped: torch.Tensor, slots: torch.Tensor) -> list[tuple[int, int]]:
        """As PoolStorage.resnap, re-rounding only the runs that hold `slots`: at ratio 1.0 a
        layer's own runs, so calibration's refresh after a solve costs the layer, not the pool."""
        self._check(len(values))
        edges = torch.tensor([0, *itertools.accumulate(n for n, _ in self.runs)], device=slots.device)
        ranges = []
        for run in torch.unique(torch.bucketize(slots, edges, right=True) - 1).tolist():
            lo, hi = int(edges[run]), int(edges[run + 1])
            self.runs[run][1]._snap_into(values[lo:hi], snapped[lo:hi])
            ranges.append((lo, hi))
        return ranges

    def grid(self, values: torch.Tensor, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(len(values))
        hi = len(values) if hi is None else hi
        pieces, start = [], 0
        for v, part in self._parts(values):
            if start < hi and lo < start + len(v):
                pieces.append(part.grid(v, max(lo - start, 0), min(hi - start, len(v))))
            start += len(v)
        steps, levels = zip(*pieces)
        return torch.cat(steps), torch.cat(levels)

    def encode(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(len(values))
        encoded = [part.encode(v) for v, part in self._parts(values)]
        return {suffix: torch.cat([e[suffix] for e in encoded]) for suffix in ("", ".scales")}

    def decode(self, stored: dict[str, torch.Tensor], slots: int) -> torch.Tensor:
        validate(self, stored, slots)
        return self.read(stored, 0, slots)

    def run_tensors(self, stored: dict[str, torch.Tensor], run: int) -> dict[str, torch.Tensor]:
        """The stored tensors of run `run` alone (views)."""
        (_, byte, scale), (_, byte_end, scale_end) = self._starts[run], self._starts[run + 1]
        return {"": stored[""][byte:byte_end], ".scales": stored[".scales"][scale:scale_end]}

    def read(self, stored: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        """As PoolStorage.read, each run read by its own part."""
        first = min(bisect.bisect_right(self._starts, lo, key=lambda start: start[0]), len(self.runs)) - 1
        pieces = []
        for run in range(first, len(self.runs)):
            begin, end = self._starts[run][0], self._starts[run + 1][0]
            if begin >= hi:
                break
            pieces.append(self.runs[run][1].read(self.run_tensors(stored, run), max(lo, begin) - begin, min(hi, end) - begin))
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def gather(self, stored: dict[str, torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        """As PoolStorage.gather, each slot read with its run's width, block and offsets: one
        expression for all runs (which torch.compile and torch.export trace)."""
        table = self._table.to(slots.device)
        run = torch.bucketize(slots, table[:, 0].contiguous(), right=True) - 1
        first, byte, scale, bits, block, base3 = table[run].unbind(1)
        local = slots - first
        stream = stored[""]
        codes = _stream_codes(stream, (byte * 8 + local * bits).clamp(max=8 * len(stream) - 1), bits)
        if any(part.packing == "base3" for _, part in self.runs):  # a bit stream's reading of a base-3 run is replaced
            codes = torch.where(base3 == 1, _gather_base3(stream, byte * 5 + local), codes)
        return codes * stored[".scales"][scale + local // block].float()

    def packs(self, dtype: torch.dtype) -> bool:
        return True

    def to_json(self) -> dict:
        runs = [[n, part.bits, part.block] + ([part.packing] if part.packing != "bits" else []) for n, part in self.runs]
        return {"dtype": "uint8", "scale_dtype": dtype_name(self.dtype), "runs": runs}


# Codes are packed a chunk at a time: 8 codes of b bits are exactly b bytes, so chunks of a multiple
# of 8 codes pack independently, and the bit-per-byte temporaries stay a few MB for any pool.
_CHUNK = 1 << 20
_SEARCH_CHUNK = 1 << 16  # slots rounded at once on a CPU (measured best of 2**14-2**18: _rounded)


def _pack(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit fields as a little-endian bit stream: field j's bit k is stream bit
    j*bits + k, and stream bit n is bit n % 8 of byte n // 8 (for 2, 4 and 8 bits: 8 / bits fields
    to a byte, the earliest in the lowest bits)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    out = []
    for chunk in fields.split(_CHUNK):
        stream = ((chunk.unsqueeze(1) >> shifts[:bits]) & 1).reshape(-1)
        stream = torch.nn.functional.pad(stream, (0, -len(stream) % 8)).view(-1, 8)
        out.append((stream << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def _unpack_groups(packed: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """The 8 * `groups` fields of `_pack`'s bit stream `packed` (`groups` * `bits` bytes), as
    uint8. Eight fields of b bits are b bytes: widths that divide 8 shift each byte; the others read
    each group's bytes as one 64-bit word and shift that. Each field position is one whole-tensor
    operation: a broadcast shift over all of them costs twice as much."""
    mask = 2**bits - 1
    if bits == 8:
        return packed
    if 8 % bits == 0:
        out = torch.empty(len(packed), 8 // bits, dtype=torch.uint8, device=packed.device)
        for k in range(8 // bits):
            torch.bitwise_and(packed >> (k * bits), mask, out=out[:, k])
        return out.view(-1)
    octets = torch.zeros(groups, 8, dtype=torch.uint8, device=packed.device)
    octets[:, :bits] = packed.view(groups, bits)
    if sys.byteorder == "little":  # the stream's byte order: a group's 8 bytes read as one integer
        word = octets.view(torch.int64).view(-1)
    else:
        word = sum(octets[:, k].long() << (8 * k) for k in range(bits))
    out = torch.empty(groups, 8, dtype=torch.uint8, device=packed.device)
    for k in range(8):
        out[:, k] = (word >> (k * bits)) & mask
    return out.view(-1)


def _stream_codes(stream: torch.Tensor, bit: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """The codes (float32) whose fields start at stream bit `bit`, `bits` wide (one width, or one
    per code), clamped as decode clamps them: each field spans at most two bytes, read as one
    16-bit word."""
    byte = bit >> 3
    word = stream[byte].int() | (stream[(byte + 1).clamp(max=len(stream) - 1)].int() << 8)
    half = 2 ** (bits - 1)  # the offset of the stored fields; codes run from 1 - half to half - 1
    return (((word >> (bit & 7)) & (2 * half - 1)) - half).clamp(min=1 - half).float()


def _pack_base3(digits: torch.Tensor) -> torch.Tensor:
    """Digits 0, 1, 2 five to a byte, the earliest the lowest: byte = sum of digit[5n + k] * 3**k
    (at most 242); the last byte is padded with zero digits."""
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    out = []
    for chunk in digits.split(_CHUNK - _CHUNK % 5):  # a multiple of 5: chunks pack independently
        grouped = torch.nn.functional.pad(chunk.int(), (0, -len(chunk) % 5)).view(-1, 5)
        out.append((grouped * powers).sum(dim=1, dtype=torch.int32).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def _base3_table() -> torch.Tensor:
    """(256, 5) float32: the codes (digit - 1) a base-3 byte holds, the earliest first. Bytes above
    242 are in no valid file; their top digit is clamped to 2, as a bit stream's field 0 is."""
    digits = torch.arange(256).unsqueeze(1) // torch.tensor([1, 3, 9, 27, 81])
    digits[:, :4] %= 3
    return (digits.clamp(max=2) - 1).float()


_BASE3 = _base3_table()


def _base3_codes(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """The 5 * `groups` codes of the base-3 bytes that start at `packed[0]` (bytes past its end read as 0)."""
    packed = torch.nn.functional.pad(packed, (0, groups - len(packed)))
    return _BASE3.to(packed.device).index_select(0, packed.int()).view(-1)


def _gather_base3(stream: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The codes at positions `index` of a base-3 stream (code j is digit j % 5 of byte j // 5)."""
    byte = (index // 5).clamp(max=len(stream) - 1)
    return _BASE3.to(stream.device).view(-1)[stream[byte].long() * 5 + index % 5]


def _codes(packed: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """The 8 * `groups` codes of the bit stream that starts at `packed[0]`, as float32, clamped to [-levels, levels] as decode
    clamps them (field 0, below -levels, is in no valid file). Where several codes share a byte,
    a table gives a byte's codes in one lookup: fewer passes than shifting, masking and converting."""
    packed = torch.nn.functional.pad(packed, (0, groups * bits - len(packed)))  # bytes past the stream's end read as 0
    if bits in _BYTE_CODES:
        return _BYTE_CODES[bits].to(packed.device).index_select(0, packed.int()).view(-1)
    fields = _unpack_groups(packed, bits, groups).clamp(min=1)  # not in place: 8-bit fields are the stored bytes
    return fields.float().sub_(2 ** (bits - 1))


def _byte_codes(bits: int) -> torch.Tensor:
    """(256, 8 // bits) float32: the codes a byte holds, the earliest in the lowest bits."""
    fields = (torch.arange(256).unsqueeze(1) >> torch.arange(0, 8, bits)) & (2**bits - 1)
    return (fields.clamp(min=1) - 2 ** (bits - 1)).float()


_BYTE_CODES = {bits: _byte_codes(bits) for bits in (2, 4)}  # 8 bits: one code a byte, converting is faster


def _share(fraction: float) -> str:
    return "<1%" if fraction < 0.005 else f"{fraction:.0%}"


def straight_through(storage: PoolStorage | MixedStorage, pool: torch.Tensor) -> torch.Tensor:
    """The pool on the stored grid, with the straight-through gradient of the latent values."""
    return pool + (storage.snap(pool.detach()) - pool).detach()


def check_stored(storage: PoolStorage | MixedStorage, stored: dict[str, torch.Tensor], slots: int) -> None:
    """Raise ValueError unless `stored` holds exactly the tensors `storage.tensors(slots)` names."""
    for suffix, dtype, shape in storage.tensors(slots):
        tensor = stored[suffix]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"the pool tensor{suffix} must be {dtype_name(dtype)} of shape {shape}, got {dtype_name(tensor.dtype)} {tuple(tensor.shape)}")


def validate(storage: PoolStorage | MixedStorage, stored: dict[str, torch.Tensor], slots: int) -> None:
    """Raise ValueError unless `stored` is a well-formed stored pool of `slots` slots: the tensors
    `storage.tensors` names, and finite block scales (a loaded pool is read as it is stored, so it is
    checked once, when it is read from the file)."""
    check_stored(storage, stored, slots)
    scales = stored.get(".scales", torch.empty(0)).reshape(-1)
    # a piece at a time: isfinite of a float16 tensor makes float32 and bool copies of it, half the
    # codes' bytes again at load time for a large pool
    if not all(torch.isfinite(scales[lo : lo + _CHECKED]).all() for lo in range(0, len(scales), _CHECKED)):
        raise ValueError("a block scale of the pool is not finite")


_CHECKED = 1 << 20  # scales checked at once


def storage_from_json(entry: dict) -> PoolStorage | MixedStorage:
    """The storage a manifest's pool entry describes (see `to_json`)."""
    if "runs" in entry:
        scale = parse_dtype(entry["scale_dtype"])

        def run(n, bits, block, packing="bits"):
            return int(n), PoolStorage(scale, int(bits), int(block), str(packing))

        return MixedStorage(tuple(run(*r) for r in entry["runs"]))
    if "bits" not in entry:
        return PoolStorage(parse_dtype(entry["dtype"]))
    return PoolStorage(parse_dtype(entry["scale_dtype"]), int(entry["bits"]), int(entry["block"]), str(entry.get("packing", "bits")))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class PackedPool:
    """A pool read where it is stored: what generation indexes in place of a float tensor (a slice
    for each RandomFold run, an index tensor for the other mappings), dequantizing just the slots
    it reads into `dtype` values, so that no float copy of the pool is made."""

    storage: PoolStorage | MixedStorage
    stored: dict[str, torch.Tensor]  # the tensors `storage.tensors` names, as the file holds them
    slots: int
    dtype: torch.dtype  # the values read, the weights' dtype

    requires_grad = False  # read only: training unpacks the pool into a float Parameter first

    @property
    def device(self) -> torch.device:
        return self.stored[""].device

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice):
            lo, hi, _ = index.indices(self.slots)
            return self.storage.read(self.stored, lo, hi).to(self.dtype)
        return self.storage.gather(self.stored, index).to(self.dtype)
