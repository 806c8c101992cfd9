"""`--calibrate FILE` and `--recover-steps N`: the command recovers quality and reports it honestly."""

import json

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from digits import digits_data, trained_mlp
from rpsconvert.cli import app

runner = CliRunner()


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(trained_mlp(), "mlp.pt")
    safetensors.torch.save_file({"x": digits_data()["calib"][0]}, "calib.safetensors")
    return tmp_path


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_calibration_and_recovery_improve_fidelity_on_held_out_inputs(files):
    result = _run("mlp.pt", "--ratio", "0.125", "--calibrate", "calib.safetensors", "--recover-steps", "150", "--json")
    assert result.exit_code == 0, result.output
    quality = json.loads(result.stdout)["quality"]
    converted, recovered = quality["converted"], quality["after recovery"]
    assert converted["samples"] == 80  # a fifth of the 400 calibration inputs, never trained on
    assert recovered["relative_error"] < converted["relative_error"]
    assert recovered["top1_agreement"] >= 0.9


def test_the_table_shows_fidelity_before_and_after_recovery(files):
    result = _run("mlp.pt", "--ratio", "0.25", "--calibrate", "calib.safetensors", "--recover-steps", "20")
    assert result.exit_code == 0, result.output
    assert "fidelity to mlp.pt on 80 held-out inputs" in result.stdout
    assert "after recovery" in result.stdout and "top-1 agreement" in result.stdout
    assert "recovery: 20 steps, peak learning rate" in result.stdout and "(chosen by short trials)" in result.stdout


def test_recover_lr_sets_the_rate_and_a_bad_one_is_refused_before_any_work(files):
    result = _run("mlp.pt", "--ratio", "0.25", "--calibrate", "calib.safetensors", "--recover-steps", "10", "--recover-lr", "2e-3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["quality"]["recovery lr"] == pytest.approx(2e-3)
    for bad in ("fast", "0", "-1e-3", "inf"):
        result = _run("mlp.pt", "--ratio", "0.25", "--calibrate", "calib.safetensors", "--recover-steps", "10", "--recover-lr", bad, "-o", "bad.rps.safetensors")
        assert result.exit_code == 1, bad
        assert "--recover-lr takes a positive learning rate (such as 1e-4) or auto" in result.stderr
        assert not (files / "bad.rps.safetensors").exists()


def test_without_calibration_the_command_warns_and_gives_the_weight_space_error_only(files):
    result = _run("mlp.pt", "--ratio", "0.25")
    assert result.exit_code == 0
    assert "quality below ratio 1.0 is neither recovered nor measured" in result.stderr
    assert "weight-space relative error" in result.stderr
    assert "fidelity" not in result.stdout


def test_recover_steps_without_calibration_is_refused_before_any_work(files):
    result = _run("mlp.pt", "--ratio", "0.25", "--recover-steps", "10")
    assert result.exit_code == 1
    assert "--recover-steps needs --calibrate FILE" in result.stderr
    assert not (files / "mlp.rps.safetensors").exists()


def test_quiet_prints_nothing_even_while_calibrating_and_recovering(files):
    result = _run("mlp.pt", "--ratio", "0.25", "--calibrate", "calib.safetensors", "--recover-steps", "5", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""
    assert (files / "mlp.rps.safetensors").exists()
