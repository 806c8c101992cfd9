"""Misusing the command (run in-process; tests/test_cli.py runs a real process): every mistake is one line on stderr, a non-zero exit, no traceback, and
no file left behind (an interrupt or a failed write included)."""

import errno
import os
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import rpsconvert
from rpsconvert import load
from test_cli import model_file, small_model  # noqa: F401  (model_file is a fixture)
from test_cli import rpsconvert as rpsconvert_cli


def refused(result, *fragments: str, status: int = 1) -> str:
    """The one line a refused command printed on stderr, after checking it is only that."""
    assert isinstance(result.exception, SystemExit), f"not handled: {result.exception!r}"
    assert result.exit_code == status
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    return result.stderr


def test_a_missing_path_is_refused(model_file):
    refused(rpsconvert_cli("missing.pt", "--ratio", "0.1"), "missing.pt: no such file or directory")


def test_a_directory_without_a_model_is_refused(model_file):
    os.mkdir("empty")
    refused(rpsconvert_cli("empty", "--ratio", "0.1"), "empty is a directory without config.json")


@pytest.mark.parametrize(
    ("budget", "says"),
    [
        ("0", "the budget must be a positive number of bytes"),
        ("-1MB", "cannot read the budget '-1MB'"),
        ("abc", "cannot read the budget 'abc'"),
        ("1Mb", "bit"),  # megabits: a lowercase b is refused with a hint (issue 12, engine/budget.py)
    ],
)
def test_a_budget_that_is_not_a_positive_size_in_bytes_is_refused(model_file, budget, says):
    refused(rpsconvert_cli(model_file, "--budget", budget), says)
    assert sorted(os.listdir()) == ["mlp.pt"]


def test_a_budget_larger_than_the_model_converts_losslessly_with_a_note(model_file):
    result = rpsconvert_cli(model_file, "--budget", "1GB", "-q")
    assert result.exit_code == 0, result.stderr
    converted = load("mlp.rps.safetensors", model=small_model())
    assert converted.rps.size == 64 * 128 + 128 * 10  # ratio 1.0: one slot per weight element
    result = rpsconvert_cli(model_file, "--budget", "1GB", "--force")
    assert "warning: the budget 1.00 GB holds the whole model: converted at ratio 1.0 (lossless)" in result.stderr


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.5", "nan"])
def test_a_ratio_outside_zero_to_one_is_refused(model_file, ratio):
    refused(rpsconvert_cli(model_file, "--ratio", ratio), "ratio must be")


def test_a_model_without_a_compressible_layer_is_refused(model_file):
    torch.save(nn.Sequential(nn.LayerNorm(64), nn.ReLU()), "norm.pt")
    refused(rpsconvert_cli("norm.pt", "--ratio", "0.5"), "no weight of Sequential can be compressed")
    assert not Path("norm.rps.safetensors").exists()


def test_an_output_folder_that_is_not_writable_is_refused(model_file):
    # root writes through permissions: /proc is a folder in which no one may create a file
    folder = Path("/proc") if os.geteuid() == 0 else Path("readonly")
    folder.mkdir(mode=0o555, exist_ok=True)
    line = refused(rpsconvert_cli(model_file, "--ratio", "0.5", "-o", folder / "out.rps.safetensors"), "error: ")
    assert str(folder) in line
    assert not [name for name in os.listdir(folder) if "out.rps.safetensors" in name]  # no output, no temporary file


def test_a_write_that_fails_half_way_leaves_nothing_behind(model_file, monkeypatch):
    def disk_full(fd):  # the data is in the temporary file; syncing it runs out of space
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rpsconvert.format.files.os.fsync", disk_full)
    refused(rpsconvert_cli(model_file, "--ratio", "0.5"), "No space left on device")
    assert sorted(os.listdir()) == ["mlp.pt"]  # neither the output nor its temporary file


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt  # what Ctrl-C's SIGINT raises in the main thread


def test_ctrl_c_during_conversion_writes_nothing(model_file, monkeypatch):
    monkeypatch.setattr(rpsconvert, "convert", _interrupt)
    refused(rpsconvert_cli(model_file, "--ratio", "0.5"), "interrupted: nothing was written", status=130)
    assert sorted(os.listdir()) == ["mlp.pt"]


def test_ctrl_c_during_recovery_writes_nothing(model_file, monkeypatch):
    safetensors.torch.save_file({"x": torch.randn(40, 64)}, "calib.safetensors")
    monkeypatch.setattr(sys.modules["rpsconvert.cli.app"], "recover", _interrupt)  # the module, not the Typer app
    result = rpsconvert_cli(model_file, "--ratio", "0.5", "--calibrate", "calib.safetensors", "--recover-steps", "5", "-q")
    refused(result, "interrupted: nothing was written", status=130)
    assert sorted(os.listdir()) == ["calib.safetensors", "mlp.pt"]


def test_ctrl_c_while_the_file_is_written_leaves_no_partial_file(model_file, monkeypatch):
    monkeypatch.setattr("rpsconvert.format.files.os.fsync", _interrupt)
    refused(rpsconvert_cli(model_file, "--ratio", "0.5"), "interrupted: nothing was written", status=130)
    assert sorted(os.listdir()) == ["mlp.pt"]
