"""Quantized pools: codes and block scales on disk, the same values in memory, budgets kept."""

import json
from itertools import accumulate

import pytest
import safetensors
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rpsconvert import convert, decompress, load, report, save
from rpsconvert.engine import plan
from rpsconvert.engine import storage as storage_module
from rpsconvert.engine.mapping import chunks
from rpsconvert.engine.pool import _Cut
from rpsconvert.engine.storage import PoolStorage
from rpsconvert.format.manifest import MANIFEST_KEY

QUANTIZED = [PoolStorage(torch.float16, bits, block) for bits, block in ((8, 64), (4, 32), (2, 32), (4, 7))]


@pytest.mark.parametrize("storage", QUANTIZED, ids=str)
@pytest.mark.parametrize("slots", [1, 5, 63, 1000])
def test_codes_round_trip_to_exactly_the_snapped_values(storage, slots):
    values = torch.randn(slots, generator=torch.Generator().manual_seed(slots)) * 0.05
    stored = storage.encode(values)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in stored.items()} == {k: (d, s) for k, d, s in storage.tensors(slots)}
    assert sum(t.numel() * t.element_size() for t in stored.values()) == storage.bytes(slots)
    snapped = storage.snap(values)
    # codes times float16 scales are exact in float32: decode and snap agree bit for bit
    assert torch.equal(storage.decode(stored, slots), snapped)
    assert torch.equal(storage.snap(snapped), snapped)  # idempotent: a loaded pool stays on its grid


@pytest.mark.parametrize("storage", QUANTIZED, ids=str)
def test_each_block_errs_no_more_than_plain_round_to_nearest_of_its_peak(storage):
    values = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.rand(4096, generator=torch.Generator().manual_seed(1))
    blocks = torch.nn.functional.pad(values, (0, -len(values) % storage.block)).view(-1, storage.block)
    step = (blocks.abs().amax(dim=1) / storage.levels).to(torch.float16).float().unsqueeze(1)
    plain = (torch.round(blocks / step) * step - blocks).square().sum(dim=1)  # the unclipped scale
    snapped = torch.nn.functional.pad(storage.snap(values), (0, -len(values) % storage.block)).view(-1, storage.block)
    ours = (snapped - blocks).square().sum(dim=1)
    assert (ours <= plain * (1 + 1e-6)).all()  # a clipped scale is kept only where it errs less
    assert ours.sum() < plain.sum() or storage.bits == 8  # and at 4 and 2 bits it does somewhere


@pytest.mark.parametrize("storage", QUANTIZED, ids=str)
def test_rounding_in_pieces_that_fit_a_cache_gives_the_bits_of_rounding_at_once(storage, monkeypatch):
    values = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 0.05
    whole_codes, whole_scales = storage._codes_and_scales(values)
    whole = storage.snap(values)
    monkeypatch.setattr(storage_module, "_SEARCH_CHUNK", 100)  # pieces of 1-3 blocks, a partial block last
    codes, scales = storage._codes_and_scales(values)
    assert torch.equal(codes, whole_codes) and torch.equal(scales, whole_scales)
    assert torch.equal(storage.snap(values), whole)

def test_bad_storage_parameters_are_refused():
    for bad in (dict(bits=1), dict(bits=9), dict(bits=8, block=0), dict(bits=8, dtype=torch.bfloat16), dict(dtype=torch.int8),
                dict(bits=3, packing="base3"), dict(bits=2, packing="base4")):
        with pytest.raises(ValueError):
            PoolStorage(**{"dtype": torch.float16, **bad})


def _mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


@pytest.mark.parametrize("bits", [8, 7, 6, 5, 4, 3, 2])
def test_a_quantized_pool_saves_loads_and_decompresses_to_the_weights_that_ran(tmp_path, bits):
    converted = convert(_mlp(), ratio=0.5, bits=bits)
    path = save(converted, tmp_path / f"int{bits}.rps.safetensors")
    manifest = json.loads(safetensors.safe_open(str(path), "pt").metadata()[MANIFEST_KEY])
    # widths whose fields straddle bytes are version 4; version 3 readers keep reading 4 and 8;
    # int2 is written in base 3, five codes a byte, which only version 6 readers know
    assert manifest["format_version"] == {2: 6, 4: 3, 8: 3}.get(bits, 4) and manifest["pool"]["bits"] == bits
    assert manifest["pool"].get("packing", "bits") == ("base3" if bits == 2 else "bits")
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == header + report(converted).total_bytes  # the report counts the stored codes and scales
    loaded, dense = load(path, _mlp(1)), decompress(path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        for name in converted.rps.weights:
            assert torch.equal(loaded.rps.weight(name), converted.rps.weight(name))
            assert torch.equal(dense[name], converted.rps.weight(name))
        assert torch.equal(loaded(x), converted(x))


def test_recovery_keeps_a_quantized_pool_on_its_grid():
    converted = convert(_mlp(), ratio=0.5, bits=4).train()
    storage = converted.rps.storage
    optimizer = torch.optim.Adam(converted.parameters(), lr=1e-3)
    for _ in range(3):
        loss = converted(torch.randn(8, 64)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert converted.rps_pool.grad is not None and converted.rps_pool.grad.abs().sum() > 0  # straight-through
    with torch.no_grad():
        pool_values = converted.rps._pool_for_autograd()
        assert torch.equal(pool_values, storage.snap(converted.rps_pool))


def test_a_training_forward_rounds_the_pool_once_not_once_per_layer(monkeypatch):
    converted = convert(nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)]), ratio=1.0, bits=8).train()
    calls = []
    snap = PoolStorage.snap
    monkeypatch.setattr(PoolStorage, "snap", lambda self, values: calls.append(1) or snap(self, values))
    optimizer = torch.optim.SGD(converted.parameters(), lr=1e-3)
    for step in range(2):
        converted(torch.randn(4, 64)).square().mean().backward()
        optimizer.step()  # a new pool version: the next forward rounds it again, once
        assert len(calls) == step + 1


def test_every_layer_reads_one_straight_through_pool_per_step_and_gradients_accumulate_through_it():
    converted = convert(nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)]), ratio=1.0, bits=8).train()
    pool, x = converted.rps, torch.randn(4, 64)
    converted(x).square().mean().backward()
    through, once = pool._reads[1], converted.rps_pool.grad.clone()
    assert through.whole.grad_fn is not None  # the grid values, differentiable in the latent pool
    converted(x).square().mean().backward()  # a second micro-batch before the step: the same pool
    assert pool._reads[1] is through
    assert torch.equal(converted.rps_pool.grad, 2 * once)  # both backwards reached the pool, exactly
    torch.optim.SGD(converted.parameters(), lr=1e-3).step()
    converted(x)
    assert pool._reads[1] is not through  # a new pool version: made again, once


@pytest.mark.parametrize("bits", [4, None])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.15])
def test_layers_read_pieces_of_one_split_of_the_pool_being_trained_with_the_same_gradient(ratio, bits, monkeypatch):
    x = torch.randn(4, 64)
    grads = []
    for cut in (True, False):
        torch.manual_seed(0)
        converted = convert(nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)]), ratio=ratio, bits=bits).train()
        if not cut:
            monkeypatch.setattr(type(converted.rps), "_run_cuts", lambda self: None)
        # at ratio 1 RandomFold's runs tile the pool; below it they overlap, and a run spans pieces
        assert isinstance(converted.rps._pool_for_autograd(), _Cut) == cut
        assert converted.rps._pool_for_autograd() is converted.rps._pool_for_autograd()  # once per pool version, not per layer
        converted(x).square().mean().backward()
        grads.append(converted.rps_pool.grad)
    # the same sums: each slot adds its runs' gradients in the same order, whether sliced or cut
    assert torch.equal(grads[0], grads[1])


def test_the_plan_spends_a_third_of_the_bytes_on_int8_at_ratio_one(tmp_path):
    model = _mlp()
    dense_bytes = save(convert(model, ratio=1.0), tmp_path / "full.rps.safetensors").stat().st_size
    converted = convert(model, budget=int(0.3 * dense_bytes))
    rep = report(converted)
    assert converted.rps.storage.widths == {8} and rep.ratio == 1.0
    assert save(converted, tmp_path / "plan.rps.safetensors").stat().st_size <= int(0.3 * dense_bytes)
    scored = converted.rps.info["plan"]
    # float32 and float16 at the slots they buy, and int8: the widest integer width that holds every
    # element (int7 to int2 at the same slots would only round more coarsely, so they are not scored)
    assert [c["storage"].split(" ")[0] for c in scored] == ["float32", "float16", "int8"]
    assert min(c["weight_error"] for c in scored) < 1e-4  # int8 rounding: ~1e-5


def test_a_block_never_holds_parts_of_two_rows():
    for row in range(1, 600):
        block = plan.row_block(row)
        assert 16 <= block <= 64  # near 32 slots: the scales' cost stays near half a bit a slot
        aligned = [b for b in range(16, 65) if row % b == 0 or b % row == 0]
        assert (row % block == 0 or block % row == 0) if aligned else block == 32
    assert [plan.row_block(row) for row in (9, 64, 96, 144, 1152, 599)] == [36, 32, 32, 36, 32, 32]


def test_at_ratio_one_each_layer_is_a_run_whose_blocks_start_at_its_rows():
    model = nn.Sequential(nn.Linear(72, 40), nn.ReLU(), nn.Linear(40, 144), nn.ReLU(), nn.Linear(144, 10))
    budget = int(0.3 * sum(p.numel() * 4 for p in model.parameters()))
    converted = convert(model, budget=budget)
    storage, pool = converted.rps.storage, converted.rps
    run_at = dict(zip(accumulate([0] + [n for n, _ in storage.runs]), (part for _, part in storage.runs)))
    assert sum(n for n, _ in storage.runs) == pool.size == sum(w.numel for w in pool.weights.values())
    for spec in pool.weights.values():
        first = int(next(chunks(pool.mapping, spec.offset, 1, pool.size, pool.seed))[2][0])
        # a run, so a new block, starts at the layer's first element, with blocks of whole rows or parts of one
        assert run_at[first].block == plan.row_block(spec.shape[1])
    assert sorted(plan.row_block(w.shape[1]) for w in pool.weights.values()) == [36, 36, 40]


def test_the_plan_keeps_float32_and_losslessness_when_the_budget_holds_the_model(tmp_path):
    model = _mlp()
    with pytest.warns(UserWarning, match="lossless"):
        converted = convert(model, budget="10MB")
    assert not converted.rps.storage.quantized and report(converted).ratio == 1.0
    for name, weight in model.named_parameters():
        if name in converted.rps.weights:
            assert torch.equal(converted.rps.weight(name), weight)


@settings(max_examples=12, deadline=None)
@given(width=st.integers(8, 96), fraction=st.floats(0.02, 0.6), bits=st.sampled_from([None, 2, 3, 4, 5, 8, 16]))
def test_a_budget_is_never_exceeded_whatever_the_storage(tmp_path_factory, width, fraction, bits):
    torch.manual_seed(width)
    model = nn.Sequential(nn.Linear(width, 3 * width), nn.ReLU(), nn.Linear(3 * width, width))
    full = sum(p.numel() * 4 for p in model.parameters())
    budget = max(int(fraction * full), 3000)
    try:
        converted = convert(model, budget=budget, bits=bits, min_numel=1)
    except ValueError as exc:  # too small for the header and the dense tensors: said, not exceeded
        assert "too small" in str(exc)
        return
    path = save(converted, tmp_path_factory.mktemp("b") / "m.rps.safetensors")
    assert path.stat().st_size <= budget


def test_the_command_line_takes_bits_and_info_shows_the_storage(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rpsconvert.cli import app

    monkeypatch.chdir(tmp_path)
    torch.save(_mlp(), "mlp.pt")
    runner = CliRunner()
    result = runner.invoke(app, ["mlp.pt", "--ratio", "0.5", "--bits", "4"])
    assert result.exit_code == 0, result.output
    assert load("mlp.rps.safetensors", _mlp(1)).rps.storage == PoolStorage(torch.float16, 4, 32)
    shown = runner.invoke(app, ["info", "mlp.rps.safetensors"]).stdout
    assert "int4 (blocks of 32, float16 scales)" in " ".join(shown.split())
    refused = runner.invoke(app, ["mlp.pt", "--ratio", "0.5", "--bits", "9", "-o", "x.rps.safetensors"])
    assert refused.exit_code != 0 and not (tmp_path / "x.rps.safetensors").exists()


def test_between_two_widths_the_plan_gives_each_layer_its_width_and_the_file_fits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    # 6.4 bits a weight, biases included: int6 (6.5 bits with its scales) cannot hold every weight, int5 (5.5) can
    budget = int(0.2 * sum(p.numel() * 4 for p in model.parameters()))
    converted = convert(model, budget=budget)
    storage = converted.rps.storage
    assert str(storage).startswith("mixed") and {5, 6} <= storage.widths and report(converted).ratio == 1.0
    rows = {row["storage"]: row["weight_error"] for row in converted.rps.info["plan"]}
    assert rows[str(storage)] == min(rows.values())  # it won on weight error
    assert rows[str(storage)] < 0.5 * min(error for name, error in rows.items() if name != str(storage))
    path = save(converted, tmp_path / "mixed.rps.safetensors")
    assert path.stat().st_size <= budget
    loaded = load(path, nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)))
    assert loaded.rps.storage == storage
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_a_change_at_some_slots_re_rounds_only_the_runs_that_hold_them(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    converted = convert(model, budget=int(0.2 * sum(p.numel() * 4 for p in model.parameters())))
    pool = converted.rps
    pool.unpack()  # the float latent pool calibration solves on
    with torch.no_grad():
        converted(torch.randn(2, 64))  # rounds the pool once and keeps it
        slots = torch.tensor([3, 70_000])  # in the first layer's run and in the second's
        pool.pool[slots] += 0.37
    snapped = []
    snap = PoolStorage.snap
    monkeypatch.setattr(PoolStorage, "snap", lambda self, values: snapped.append(len(values)) or snap(self, values))
    pool.resnap(slots)
    assert sum(snapped) < 0.9 * pool.size  # the runs of two layers of three, not the pool
    calls = len(snapped)
    with torch.no_grad():
        kept = pool._pool_for_autograd()
    assert len(snapped) == calls  # the next forward rounds nothing again
    assert torch.equal(kept, pool.storage.snap(pool.pool.detach()))  # the values of a full re-rounding
