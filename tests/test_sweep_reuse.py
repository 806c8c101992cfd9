"""A sweep does the point-independent work once: the model read, the inputs loaded, and the original
model's side of calibration; every file is still the one its point alone would give, bit for bit."""

import contextlib
import importlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from typer.testing import CliRunner

from rpsconvert import conversion, convert
from rpsconvert.cli import app, sweep
from rpsconvert.quality.calibration import reusing_reference

from models import tiny_bert

runner = CliRunner()
BUDGETS = ("6kB", "9kB", "12kB")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def count_forwards(model: nn.Module, monkeypatch=None) -> dict:
    """Counts the calls of `model` itself (deep copies carry the hook, so they are told apart); with
    `monkeypatch`, only those made while `convert` calibrates (discovery may run the model too)."""
    calls = {"n": 0, "calibrating": monkeypatch is None}
    if monkeypatch is not None:
        calibrate = conversion.calibrate

        def calibrating(*args, **kwargs):
            calls["calibrating"] = True
            try:
                return calibrate(*args, **kwargs)
            finally:
                calls["calibrating"] = False

        monkeypatch.setattr(conversion, "calibrate", calibrating)

    def hook(module, args, kwargs):
        calls["n"] += module is model and calls["calibrating"]

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def pools(model: nn.Module, batches: list, budgets=BUDGETS) -> list[torch.Tensor]:
    return [convert(model, budget=b, min_numel=1, calibration=batches, quiet=True).rps_pool.detach().clone() for b in budgets]


@pytest.mark.filterwarnings("ignore:neither torch.fx")  # a model neither tracer follows: the module scan finds its weights
@pytest.mark.parametrize("kind", ["mlp", "bert"])  # full forwards per layer; a chain of blocks
def test_calibrations_of_one_original_run_it_once_and_give_the_same_pools(kind, monkeypatch):
    torch.manual_seed(1)
    if kind == "mlp":
        model, batches, budgets = mlp(), [torch.randn(16, 32) for _ in range(3)], BUDGETS
    else:
        model, budgets = tiny_bert(), ("40kB", "60kB", "80kB")
        batches = [{"input_ids": torch.randint(0, 500, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(2)]
    calls = count_forwards(model, monkeypatch)
    alone = pools(model, batches, budgets[:1])
    once = calls["n"]
    assert once > 0
    calls["n"] = 0
    with reusing_reference() as cache:
        shared = pools(model, batches, budgets)
    assert calls["n"] == once and cache.keeping and cache.bytes > 0  # not three times
    alone += pools(model, batches, budgets[1:])
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))


def test_a_cache_too_small_or_an_original_changed_in_place_is_recomputed(monkeypatch):
    torch.manual_seed(1)
    model, batches = mlp(), [torch.randn(16, 32) for _ in range(3)]
    calls = count_forwards(model, monkeypatch)
    with reusing_reference(limit_bytes=0) as cache:
        assert all(torch.equal(a, b) for a, b in zip(pools(model, batches), pools(model, batches)))
    assert not cache.keeping and cache.bytes > 0
    with reusing_reference():
        pools(model, batches, BUDGETS[:1])
        with torch.no_grad():
            model[0].weight.mul_(0.5)  # its version counter moves: what was kept is stale
        calls["n"] = 0
        changed = pools(model, batches, BUDGETS[:1])
        assert calls["n"] > 0
    assert torch.equal(changed[0], pools(model, batches, BUDGETS[:1])[0])


def stored(path: Path) -> tuple[dict, dict]:
    """What a file holds: its metadata and every tensor's bytes. (Not the file's bytes: safetensors
    writes the metadata keys in an order that changes from one run to the next.)"""
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        return f.metadata(), {name: (t.dtype, t.shape, t.numpy().tobytes()) for name, t in tensors.items()}


def test_a_sweep_with_calibration_runs_the_original_once_for_it_and_writes_the_files_of_points_done_alone(tmp_path, monkeypatch):
    """The same sweep with nothing shared between points (as every point read, loaded and calibrated
    on its own before) writes the very same metadata and tensors, bit for bit. (A point converted by a separate command is not
    byte-comparable: its own command line, recorded in the provenance, takes other header bytes,
    and the budget then buys other pool slots.)"""
    torch.manual_seed(2)
    calibration = {"x": torch.randn(100, 32)}  # 80 to calibrate (3 batches of 32, 32, 16), 20 held out
    cli = importlib.import_module("rpsconvert.cli.app")
    read_model, counters = cli.read_model, []

    def counted(*args, **kwargs):
        source = read_model(*args, **kwargs)
        counters.append(count_forwards(source.model))
        return source

    monkeypatch.setattr(cli, "read_model", counted)
    written = {}
    for shared in (True, False):
        if not shared:  # every point on its own
            monkeypatch.setattr(sweep, "once", lambda key, make: make())
            monkeypatch.setattr(sweep, "reusing_reference", contextlib.nullcontext)
        folder = tmp_path / str(shared)
        folder.mkdir()
        monkeypatch.chdir(folder)
        torch.save(mlp(), "m.pt")
        safetensors.torch.save_file(calibration, "calib.safetensors")
        counters.clear()
        result = runner.invoke(app, ["m.pt", "--budget", ",".join(BUDGETS), "--min-numel", "1", "--calibrate", "calib.safetensors"])
        assert result.exit_code == 0, result.stderr
        written[shared] = [stored(folder / f"m.{budget}.rps.safetensors") for budget in BUDGETS]
        forwards = sum(c["n"] for c in counters)
        assert len(counters) == (1 if shared else 1 + len(BUDGETS))  # the model is read once (the sweep's own read names the files)
        if shared:
            swept = forwards
    assert written[True] == written[False]
    calibrating = 3 * 2 + 1  # 3 layers, a forward of the original per layer and batch solved on (2 of 3), and one on the held-out one
    assert forwards % 3 == 0 and swept == forwards - 2 * calibrating
