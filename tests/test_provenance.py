"""Every file says what made it, and saying so never breaks a budget nor the file's bytes: the same
input converted the same way gives the same file wherever it is written."""

import hashlib
import json
import struct
import subprocess

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rpsconvert import convert
from rpsconvert.cli import app
from rpsconvert.format import provenance
from rpsconvert.format.checkpoint import encode
from test_cli import RPSCONVERT

runner = CliRunner()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def test_no_figure_is_longer_than_the_placeholder():
    widest = len(json.dumps(provenance.PLACEHOLDER))
    for exponent in range(-330, 330):  # past both ends of float64, down to subnormals
        for mantissa in ("1", "1.234567891", "9.999996", "9.99999949", "-1.234567891", "-9.99999949"):
            x = float(f"{mantissa}e{exponent}")
            assert len(json.dumps(provenance.figure(x))) <= widest, x
    assert provenance.figure(float("nan")) is None and provenance.figure(float("inf")) is None
    assert provenance.figure(0.99998412) == 0.999984  # a cosine keeps its informative digits


@pytest.mark.parametrize("budget", [4_700, 9_999, 10_000, 13_000])
def test_the_longest_figures_recorded_later_still_fit_the_budget(budget):
    converted = convert(mlp(), budget=budget, min_numel=1, provenance={"command": ["rpsconvert", "x"], **dict.fromkeys(provenance.LATER)})
    made_by = converted.rps.info["provenance"]
    assert len(made_by["plan"]) > 1 and made_by["layers"]["compressed"] == ["0.weight", "2.weight"]
    worst = -9.999994e15  # rounds to the placeholder's own width
    provenance.fill(made_by, "fidelity", provenance.fidelity("recovered", dict.fromkeys(provenance.FIDELITY_FIGURES, worst)))
    provenance.fill(made_by, "gate", provenance.gate(False, worst, worst))
    provenance.fill(made_by, "weight_error", provenance.figure(worst))
    assert len(encode(converted)) <= budget


def test_only_reserved_figures_are_recorded():
    converted = convert(mlp(), budget="8kB", min_numel=1)
    with pytest.raises(ValueError, match="not reserved"):
        provenance.fill(converted.rps.info["provenance"], "fidelity", provenance.fidelity("file", {"cosine": 1.0}))
    with pytest.raises(ValueError, match="pass it as None"):
        convert(mlp(), budget="8kB", min_numel=1, provenance={"gate": {"passed": True}})
    with pytest.raises(ValueError, match="recorded by convert itself"):
        convert(mlp(), ratio=0.5, min_numel=1, provenance={"call": "mine"})


def test_the_api_call_reads_back_from_info_json(tmp_path):
    path = tmp_path / "m.rps.safetensors"
    converted = convert(mlp(), budget="12kB", min_numel=100, exclude="re:2\\..*", seed=3)
    path.write_bytes(encode(converted))
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    made_by = json.loads(result.stdout)["manifest"]["provenance"]
    assert made_by["torch"] == torch.__version__ and made_by["seed"] == 3 and "command" not in made_by
    assert made_by["call"]["budget"] == "12kB" and made_by["call"]["exclude"] == ["re:2\\..*"]
    assert made_by["layers"] == {"compressed": ["0.weight"], "1-D": ["0.bias", "2.bias"], "excluded": ["2.weight"]}
    assert made_by["plan"] == converted.rps.info["provenance"]["plan"] and len(made_by["plan"]) > 1


def test_the_minimum_budget_an_error_names_fits_however_the_budget_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(mlp(), "m.pt")
    refused = runner.invoke(app, ["m.pt", "--budget", "1kB", "--verify", "--max-drop", "0.5", "--json"])
    assert refused.exit_code == 1
    minimum = refused.stderr.split("minimum budget is ")[1].split()[0]
    result = runner.invoke(app, ["m.pt", "--budget", minimum, "--verify", "--max-drop", "0.5", "--json"])
    assert result.exit_code in (0, 2), result.stderr  # written: the gate may pass or not at one slot
    assert json.loads(result.stdout)["file_bytes"] <= int(minimum)


@pytest.mark.parametrize("budget", ["9000", "12kB"])
def test_a_verified_cli_file_records_its_fidelity_and_missed_gate_within_budget(tmp_path, monkeypatch, budget):
    monkeypatch.chdir(tmp_path)
    torch.save(mlp(), "m.pt")
    result = runner.invoke(app, ["m.pt", "--budget", budget, "--atol", "0", "--json"])
    assert result.exit_code == 2, result.stderr  # atol 0 is missed by any compression
    out = json.loads(result.stdout)
    assert (tmp_path / "m.rps.safetensors").stat().st_size == out["file_bytes"] <= out["budget_bytes"]
    made_by = json.loads(runner.invoke(app, ["info", "m.rps.safetensors", "--json"]).stdout)["manifest"]["provenance"]
    assert made_by["command"] == ["rpsconvert", "convert", "m.pt", "--budget", budget, "--atol", "0.0"]  # --json is not what made it
    assert made_by["gate"] == {"passed": False, "max_drop": None, "atol": 0.0}
    assert made_by["fidelity"]["on"] == "file"
    # the recorded figures are the verification's, to the 6 digits a figure keeps
    assert made_by["fidelity"]["max_abs_error"] == pytest.approx(out["verification"]["max_abs_error"], rel=1e-5)
    text = runner.invoke(app, ["info", "m.rps.safetensors"], env={"COLUMNS": "80"}).stdout
    assert "MISSED (--atol 0)" in text and "rpsconvert convert m.pt --budget" in text


def header(path) -> str:
    """A safetensors file's JSON header (the manifest, the provenance in it), as it is stored."""
    data = path.read_bytes()
    return data[8 : 8 + struct.unpack("<Q", data[:8])[0]].decode()


def test_the_same_conversion_gives_the_same_bytes_in_any_directory_under_any_name(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    torch.save(mlp(), here / "m.pt")
    torch.save(torch.randn(50, 32), here / "inputs.pt")
    options = ["--budget", "12kB", "--min-numel", "1", "--verify", "-q"]
    relative = subprocess.run([RPSCONVERT, "m.pt", "--calibrate", "inputs.pt", *options, "-o", "first.rps.safetensors"],
                              cwd=here, capture_output=True, text=True, timeout=300)
    absolute = subprocess.run([RPSCONVERT, here / "m.pt", "--calibrate", here / "inputs.pt", *options, "-o", there / "out" / "second.rps.safetensors"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert relative.returncode == absolute.returncode == 0, relative.stderr + absolute.stderr
    first, second = here / "first.rps.safetensors", there / "out" / "second.rps.safetensors"
    assert first.read_bytes() == second.read_bytes()
    assert str(tmp_path) not in header(second) and "second" not in header(second)
    made_by = json.loads(runner.invoke(app, ["info", str(second), "--json"]).stdout)["manifest"]["provenance"]
    assert made_by["command"] == ["rpsconvert", "convert", "m.pt", "--budget", "12kB", "--min-numel", "1", "--calibrate", "inputs.pt", "--verify"]
    digests = {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in ("m.pt", "inputs.pt")}
    assert made_by["inputs"] == {"model": {"name": "m.pt", "sha256": digests["m.pt"]}, "calibrate": {"name": "inputs.pt", "sha256": digests["inputs.pt"]}}
    text = runner.invoke(app, ["info", str(second)], env={"COLUMNS": "200"}).stdout
    assert "rpsconvert convert m.pt --budget 12kB --min-numel 1 --calibrate inputs.pt --verify" in text
    assert f"sha256 {digests['m.pt']}" in text and f"sha256 {digests['inputs.pt']}" in text


def test_a_model_directory_is_named_by_its_files_digests(tmp_path):
    (tmp_path / "bert" / ".cache").mkdir(parents=True)
    (tmp_path / "bert" / "config.json").write_text("{}")
    (tmp_path / "bert" / ".cache" / "download.lock").write_text("changes on every download")
    assert provenance.made_from(tmp_path / "bert") == {"name": "bert", "files": {"config.json": hashlib.sha256(b"{}").hexdigest()}}
    assert provenance.made_from("torchvision:resnet18") == {"name": "torchvision:resnet18"}
