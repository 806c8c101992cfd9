"""Budget sweeps: a file per budget, each within it, and the quality-versus-bytes table and plot."""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from rpsconvert.cli import app
from rpsconvert.cli import sweep

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
    assert rows[0]["bytes"] < rows[1]["bytes"] < rows[2]["bytes"]  # the plot's x values, in budget order
    assert Path(out["plot"]).stat().st_size > 0 and out["plot"] == "m.sweep.png"
    table = Path("m.sweep.md").read_text()
    assert table.count("\n| ") == 3 and "| 9kB |" in table


def test_without_matplotlib_a_sweep_says_so_and_keeps_the_table(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    rows = [{"point": "1MB", "bytes": 10, "top1_agreement": None, "cosine": 1.0}]
    note = sweep.plot(rows, tmp_path / "m.sweep.png", "m")
    assert note.startswith("note: matplotlib is not installed") and not (tmp_path / "m.sweep.png").exists()


def test_sweep_points_and_their_file_names():
    assert sweep.points("1MB", None) == [] and sweep.points(None, "0.01, 0.05") == ["0.01", "0.05"]
    files, table, plot = sweep.outputs(Path("out/m.rps.safetensors"), ["0.01", "0.05"], "ratio")
    assert files == [Path("out/m.ratio0.01.rps.safetensors"), Path("out/m.ratio0.05.rps.safetensors")]
    assert (table, plot) == (Path("out/m.sweep.md"), Path("out/m.sweep.png"))
