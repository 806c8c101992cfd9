"""What a conversion did, per weight and in total, in bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from rpsconvert.engine.budget import format_bytes
from rpsconvert.engine.mapping import RandomFold
from rpsconvert.engine.modules import find_pool, is_converted
from rpsconvert.engine.operator import CompressedWeight, PoolOperator


@dataclass(frozen=True)
class WeightReport:
    name: str
    shape: tuple[int, ...]
    elements: int
    compressed: bool
    bytes_before: int
    bytes_after: int  # dense bytes, or 0 for a compressed weight (it lives in the pool)
    slots_used: int = 0  # distinct pool slots the weight reads
    reason: str = ""  # why a tensor was kept dense


@dataclass(frozen=True)
class ConversionReport:
    weights: list[WeightReport]
    mapping: str
    seed: int
    pool_slots: int
    pool_dtype: str
    pool_bytes: int
    dense_bytes: int
    original_bytes: int
    compressible_elements: int
    discovery: str = "fx"
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.pool_bytes + self.dense_bytes

    @property
    def ratio(self) -> float:
        """Fraction of the compressible weight elements kept as pool slots."""
        return self.pool_slots / max(self.compressible_elements, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(total_bytes=self.total_bytes, ratio=self.ratio)
        return out

    def summary(self) -> str:
        compressed = sum(w.compressed for w in self.weights)
        return (
            f"{compressed} weights compressed into {self.pool_slots:,} slots ({self.ratio:.4g} of their elements), "
            f"{len(self.weights) - compressed} tensors kept dense; "
            f"{format_bytes(self.original_bytes)} -> {format_bytes(self.total_bytes)} "
            f"({self.original_bytes / max(self.total_bytes, 1):.1f}x smaller)"
        )


def slots_used(operator: PoolOperator, weight: CompressedWeight) -> int:
    """The distinct pool slots `weight` reads. RandomFold: the union of its runs of slots (a weight
    of two folds or more holds a whole fold, so every slot), without a pool-sized count (54 GB of
    float64 for a 7B model at ratio 1); other mappings count every slot."""
    if not isinstance(operator.mapping, RandomFold):
        return int((operator.counts([weight]) > 0).sum())
    if weight.numel >= 2 * operator.slots:
        return operator.slots
    used, end = 0, 0
    for begin, stop in sorted((begin, begin + hi - lo) for lo, hi, begin in operator.fold_runs(weight)):
        used += max(0, stop - max(begin, end))
        end = max(end, stop)
    return used


def report(model: nn.Module) -> ConversionReport:
    """Per-weight and total sizes of a converted model (stored bytes, not the generated weights)."""
    pool = find_pool(model)
    rows = [
        WeightReport(
            name=weight.name,
            shape=weight.shape,
            elements=weight.numel,
            compressed=True,
            bytes_before=weight.numel * weight.dtype.itemsize,
            bytes_after=0,
            slots_used=slots_used(pool.operator, weight),
        )
        for weight in pool.weights.values()
    ]
    reasons = pool.info.get("dense_reasons", {})
    seen: set[int] = set()
    dense_bytes, held = 0, pool.tensors
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in held or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        dense_bytes += size
        rows.append(WeightReport(name, tuple(tensor.shape), tensor.numel(), False, size, size, 0, reasons.get(name, "kept dense")))
    compressible = sum(weight.numel for weight in pool.weights.values())
    return ConversionReport(
        weights=rows,
        mapping=pool.mapping.name,
        seed=pool.seed,
        pool_slots=pool.size,
        pool_dtype=str(pool.storage),
        pool_bytes=pool.storage.bytes(pool.size),
        dense_bytes=dense_bytes,
        original_bytes=sum(r.bytes_before for r in rows),
        compressible_elements=compressible,
        discovery=pool.info.get("discovery", "fx"),
        fallback_reason=pool.info.get("fallback_reason"),
        notes=list(pool.info.get("notes", [])),
    )


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the tensors `model` holds now, each storage counted once: its parameters and
    buffers, and what a converted model's pool keeps (`RPSPool.kept`). The memory a budget
    promises: a lean model holds its stored pool and dense tensors, and each weight exists only
    while its layer runs (generation's temporaries are not held, so they are not counted)."""
    tensors = [*model.parameters(), *model.buffers(), *(find_pool(model).kept() if is_converted(model) else [])]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())
