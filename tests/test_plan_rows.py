"""The plan (engine/plan.py): which rows of a layer split between two widths keep the wider one,
which of a layer's elements its error at a width is measured on, and a candidate's error measured
as its pool is projected."""

import pytest
import torch
from torch import nn

from rpsconvert import convert
from rpsconvert.engine import plan
from rpsconvert.engine.mapping import RandomFold
from rpsconvert.engine.modules import find_pool
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.encoding import encode_pool
from rpsconvert.engine.projection import in_memory, layer_scales, project_range
from rpsconvert.engine.storage import PackedPool, PoolStorage


def test_the_layer_split_between_two_widths_keeps_its_first_rows_wider():
    # An embedding alone at 1/8 of its fp32 bytes (4 bits a weight, scales and header included):
    # int3 fits and int4 does not, so the plan stores some rows at int4 and the rest at int3.
    # Tokenizers number tokens by frequency (on docstring sentences 79 % of all-MiniLM-L6-v2's
    # tokens are among its first 5,000 of 30,522 ids), so the first rows must be the wider ones.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(2048, 64))
    original = model[0].weight.detach().clone()
    converted = convert(model, budget=original.numel() * 4 // 8, quiet=True)
    assert "int4" in str(find_pool(converted).storage) and "int3" in str(find_pool(converted).storage)
    with torch.no_grad():
        error = (converted[0].weight - original).square().sum(1) / original.square().sum(1)
    first, last = float(error[:256].mean()), float(error[-256:].mean())
    assert first < 0.02 < last, (first, last)  # int4 rounds about 4x more finely than int3


def _layer(rows: int, row: int, scale: float = 1.5) -> tuple[list[CompressedWeight], dict[str, torch.Tensor], PoolOperator]:
    """One weight of `rows` rows, the row norms ramped 100-fold (as an embedding's are by token
    frequency), at offset 0 of a lossless RandomFold pool."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, row, generator=g) * torch.logspace(0, 2, rows).unsqueeze(1)
    layout = [CompressedWeight("w", (rows, row), torch.float32, 0, scale)]
    return layout, {"w": weight}, PoolOperator(RandomFold(), rows * row, seed=7)


def test_a_layer_within_the_sample_is_measured_whole_on_the_same_run_as_the_projection():
    layout, tensors, operator = _layer(64, 96)
    run = plan._sample(operator, layout[0], in_memory(tensors), block=32)
    (first,) = plan._first_slots(operator, layout, "cpu")  # the run starts there and wraps past the end
    projected = [project_range(operator, layout, in_memory(tensors), *slots) for slots in ((first, 64 * 96), (0, first))]
    assert 0 < first and torch.equal(run, torch.cat(projected))  # bit for bit


def test_a_layer_above_the_sample_is_measured_on_spans_of_whole_rows_spread_over_it():
    rows, row = 4096, 384  # 1.57M elements
    layout, tensors, operator = _layer(rows, row)
    read_rows = []

    def read(weight, lo, hi):
        assert lo % row == 0 and hi % row == 0  # whole rows, so whole blocks of 32
        read_rows.append((lo // row, hi // row))
        return tensors["w"].reshape(-1)[lo:hi]

    storage = PoolStorage(torch.float16, bits=3, block=32)
    run = plan._sample(operator, layout[0], read, storage.block)
    assert len(read_rows) == plan.SPANS and len(run) == plan.SPANS * 170 * row  # 170 rows a span: 2**20 / 16 / 384
    assert read_rows[0][0] == 0 and read_rows[-1][1] == rows  # from the first row to the last
    whole = project_range(operator, layout, in_memory(tensors), 0, rows * row)
    sampled, measured = (float((storage.snap(v) - v).square().sum() / v.square().sum()) for v in (run, whole))
    # a sample of 32,640 of 49,152 blocks, each rounded as in the whole run: within 1 %
    assert abs(sampled / measured - 1) < 0.01, (sampled, measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.15])
@pytest.mark.parametrize("storage", [PoolStorage(torch.float32), PoolStorage(torch.float16), plan.QUANTIZED[4], plan.QUANTIZED[6]], ids=str)
def test_a_candidate_scored_as_it_is_projected_has_the_error_of_the_pool_it_would_store(storage, ratio, dtype, monkeypatch):
    monkeypatch.setattr(plan, "PIECE", 1 << 12)  # pieces of about 4096 landing elements, some 26 of them
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(n, generator=g) * s).to(dtype) for n, s in ((30000, 0.05), (4096, 1.0), (70001, 0.2), (999, 3.0))]
    scales = layer_scales(weights)
    offsets = [0, 30000, 34096, 104097]
    layout = [CompressedWeight(f"w{i}", tuple(w.shape), dtype, o, s) for i, (w, o, s) in enumerate(zip(weights, offsets, scales))]
    read = in_memory({f"w{i}": w for i, w in enumerate(weights)})
    operator = PoolOperator(RandomFold(), round(ratio * 105096), seed=3)
    stored = encode_pool(storage, operator, layout, read, dtype)
    expected = plan.weight_error(operator, layout, read, PackedPool(storage, stored, operator.slots, dtype))
    # the same squared error element by element, summed in another order: float64 sums of 1e5 terms
    assert plan.stored_error(storage, operator, layout, read, dtype) == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < 1.5


def test_a_mixed_pool_scored_as_it_is_projected_has_the_error_of_the_pool_it_would_store(monkeypatch):
    monkeypatch.setattr(plan, "PIECE", 1 << 12)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(rows, 96, generator=g) * s for rows, s in ((300, 0.05), (64, 1.0), (701, 0.2))]
    offsets = [0, 300 * 96, 364 * 96]
    layout = [CompressedWeight(f"w{i}", tuple(w.shape), w.dtype, o, s) for i, (w, o, s) in enumerate(zip(weights, offsets, layer_scales(weights)))]
    read = in_memory({f"w{i}": w for i, w in enumerate(weights)})
    operator = PoolOperator(RandomFold(), 1065 * 96, seed=5)
    # each layer at its own width, the last split between two (its first rows wider; int2 in base 3, blocks of 64)
    int8, int5, int3, int2_64 = (next(r for r in plan.LADDER if (r.bits, r.block) == key) for key in ((8, 32), (5, 32), (3, 32), (2, 64)))
    parts = [[(300 * 96, int5)], [(64 * 96, int8)], [(400 * 96, int3), (301 * 96, int2_64)]]
    storage = plan.aligned(operator.slots, layout, plan._first_slots(operator, layout, "cpu"), parts)
    stored = encode_pool(storage, operator, layout, read, torch.float32)
    expected = plan.weight_error(operator, layout, read, PackedPool(storage, stored, operator.slots, torch.float32))
    assert plan.stored_error(storage, operator, layout, read, torch.float32) == pytest.approx(expected, rel=1e-12)
    assert 0.01 < expected < 0.5
