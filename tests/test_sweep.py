"""Budget sweeps: a file per budget, each within it, and the quality-versus-bytes table and plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from rpsconvert.cli import app
from rpsconvert.cli import sweep
from test_cli import RPSCONVERT

runner = CliRunner()


def test_a_budget_sweep_writes_a_file_per_budget_and_the_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), "m.pt")
    result = runner.invoke(app, ["m.pt", "--budget", "5kB,7kB,9kB", "--min-numel", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    rows = out["sweep"]
    assert [r["file"] for r in rows] == ["m.5kB.rps.safetensors", "m.7kB.rps.safetensors", "m.9kB.rps.safetensors"]
    for r, budget in zip(rows, (5_000, 7_000, 9_000)):
        assert r["bytes"] == Path(r["file"]).stat().st_size <= budget
        assert 0 <= r["top1_agreement"] <= 1  # measured on the file reloaded (random inputs)
        assert 0 < r["weight_error"] < 1  # what the table and plot show without data
    assert rows[0]["bytes"] < rows[1]["bytes"] < rows[2]["bytes"]  # the plot's x values, in budget order
    assert Path(out["plot"]).stat().st_size > 0 and out["plot"] == "m.sweep.png"
    table = Path("m.sweep.md").read_text()
    assert table.startswith(sweep.WEIGHT_SPACE) and table.count("\n| ") == 4 and "| 9kB |" in table


def test_a_sweep_point_is_the_file_its_command_alone_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), "m.pt")
    assert runner.invoke(app, ["m.pt", "--budget", "5kB,7kB", "--min-numel", "1", "-q"]).exit_code == 0
    assert runner.invoke(app, ["m.pt", "--budget", "7kB", "--min-numel", "1", "--verify", "-q", "-o", "alone.rps.safetensors"]).exit_code == 0
    assert Path("m.7kB.rps.safetensors").read_bytes() == Path("alone.rps.safetensors").read_bytes()


def test_the_table_shows_fidelity_with_data_and_the_weight_error_without():
    rows = [{"point": "9kB", "bytes": 8654, "ratio": 1.0, "weight_error": 0.123456, "top1_agreement": 0.9102, "cosine": 0.995879, "relative_error": 0.08599},
            {"point": "6kB", "bytes": 5572, "ratio": 0.8336, "weight_error": 0.5, "top1_agreement": None, "cosine": 0.459588, "relative_error": 0.8938}]
    assert sweep.markdown(rows, measured=True) == (
        "| point | file bytes | ratio | top-1 agreement | output cosine | relative error |\n|---|---:|---:|---:|---:|---:|\n"
        "| 6kB | 5,572 (5.57 kB) | 0.8336 | n/a | 0.459588 | 0.8938 |\n| 9kB | 8,654 (8.65 kB) | 1 | 91.02% | 0.995879 | 0.08599 |\n")
    assert sweep.markdown(rows, measured=False) == (
        f"{sweep.WEIGHT_SPACE}\n\n| point | file bytes | ratio | weight error |\n|---|---:|---:|---:|\n"
        "| 6kB | 5,572 (5.57 kB) | 0.8336 | 0.5 |\n| 9kB | 8,654 (8.65 kB) | 1 | 0.1235 |\n")


@pytest.mark.parametrize("make, budgets, inputs", [
    (lambda: torchvision.models.resnet18(), "500kB,1MB", "27 random inputs of shape 3x224x224 (the input torchvision:resnet18 states)"),
    (lambda: timm.create_model("resnet10t"), "500kB,1MB", "45 random inputs of shape 3x176x176 (the input timm:resnet10t states)"),
], ids=["torchvision", "timm"])
def test_a_sweep_of_a_pickled_image_classifier_runs_without_data(tmp_path, make, budgets, inputs):
    torch.manual_seed(0)
    torch.save(make(), tmp_path / "m.pt")
    result = subprocess.run([RPSCONVERT, "m.pt", "--budget", budgets, "-o", "sweep/"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(sweep.WEIGHT_SPACE) and "| point | file bytes | ratio | weight error |" in result.stdout
    assert result.stderr.startswith(f"note: no example inputs, so {inputs}: they check that the file reproduces the model")
    for budget, limit in zip(budgets.split(","), (500_000, 1_000_000)):
        assert (tmp_path / "sweep" / f"m.{budget}.rps.safetensors").stat().st_size <= limit
        assert f"| {budget} |" in result.stdout
    assert (tmp_path / "sweep" / "m.sweep.png").stat().st_size > 0


def test_without_matplotlib_a_sweep_says_so_and_keeps_the_table(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    rows = [{"point": "1MB", "bytes": 10, "top1_agreement": None, "cosine": 1.0}]
    note = sweep.plot(rows, tmp_path / "m.sweep.png", "m", measured=True)
    assert note.startswith("note: matplotlib is not installed") and not (tmp_path / "m.sweep.png").exists()


def test_sweep_points_and_their_file_names():
    assert sweep.points("1MB", None) == [] and sweep.points(None, "0.01, 0.05") == ["0.01", "0.05"]
    files, table, plot = sweep.outputs(Path("out/m.rps.safetensors"), ["0.01", "0.05"], "ratio")
    assert files == [Path("out/m.ratio0.01.rps.safetensors"), Path("out/m.ratio0.05.rps.safetensors")]
    assert (table, plot) == (Path("out/m.sweep.md"), Path("out/m.sweep.png"))
