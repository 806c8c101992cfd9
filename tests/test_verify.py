"""`rpsconvert verify`, `convert --verify` and the quality gates, and budgets' units as the command
reads them."""

import json
import subprocess

import pytest
import timm
import torch
import torchvision
from torch import nn

from rpsconvert import convert, load, save
from rpsconvert.format.architectures import input_shape
from rpsconvert.quality.verification import random_inputs, verify
from test_cli import RPSCONVERT, model_file, rpsconvert, small_model  # noqa: F401  (model_file is a fixture)


def test_a_lossless_file_verifies_with_zero_error(tmp_path):
    model = small_model()
    path = save(convert(model, ratio=1.0), tmp_path / "m.rps.safetensors")
    result = verify(load(path, small_model()), model, random_inputs(model))
    # ratio 1.0 regenerates every weight bit for bit (docs/format.md), so the outputs are equal
    assert result.max_abs_error == 0 and result.top1_drop == 0 and result.failures(max_drop=0, atol=0) == []


def test_a_lossy_file_misses_tight_gates_and_says_which():
    model = small_model()
    result = verify(convert(model, ratio=0.1), model, random_inputs(model))
    assert 0 < result.mean_abs_error <= result.max_abs_error
    assert [f.split()[0] for f in result.failures(max_drop=0.0, atol=1e-6)] == ["top-1", "max"]
    assert result.failures(max_drop=1.0, atol=result.max_abs_error) == []  # gates are inclusive


def test_random_inputs_follow_the_first_layer_or_ask_for_data():
    assert random_inputs(nn.Sequential(nn.Linear(5, 3)), samples=10)[0].shape == (10, 5)
    tokens = random_inputs(nn.Sequential(nn.Embedding(7, 4)), samples=3)[0]
    assert tokens.shape == (3, 16) and tokens.max() < 7
    images = random_inputs(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)))
    assert [b.shape for b in images] == [(64, 1, 224, 224), (19, 1, 224, 224)]  # 2**22 values: 83 images at 224x224
    with pytest.raises(ValueError, match=r"its first layer is Conv3d\): pass example inputs"):
        random_inputs(nn.Sequential(nn.Conv3d(1, 4, 3)))


def test_a_stated_shape_wins_and_a_shape_the_model_refuses_asks_for_data():
    stated = random_inputs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), samples=5, shape=(3, 8, 8))
    assert [b.shape for b in stated] == [(5, 3, 8, 8)]
    digits = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))  # takes 28x28 only
    with pytest.raises(ValueError, match=r"^cannot tell the input shape of Sequential \(random inputs of shape 1x224x224 fail in it: mat1 and mat2"):
        random_inputs(digits)


@pytest.mark.parametrize("architecture, shape", [
    ("timm:resnet10t", (3, 176, 176)),  # its pretrained_cfg
    ("torchvision:resnet18", (3, 224, 224)),  # its default weights' crop
    ("torchvision:inception_v3", (3, 299, 299)),
    ("torchvision:fasterrcnn_resnet50_fpn", None),  # detection transforms name no image size
    ({"source": "transformers", "name": "ViTModel", "config": {"image_size": 32, "num_channels": 3}}, (3, 32, 32)),
    ({"source": "transformers", "name": "BertModel", "config": {"vocab_size": 99}}, None),  # token ids
])
def test_libraries_state_their_models_input_shape(architecture, shape):
    assert input_shape(architecture) == shape


def run_cli(*args, cwd):
    return subprocess.run([RPSCONVERT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("make, name, inputs", [
    (lambda: torchvision.models.resnet18(), "torchvision:resnet18", "27 random inputs of shape 3x224x224"),
    (lambda: timm.create_model("resnet10t"), "timm:resnet10t", "45 random inputs of shape 3x176x176"),
], ids=["torchvision", "timm"])
def test_a_pickled_image_classifier_verifies_without_data(tmp_path, make, name, inputs):
    torch.manual_seed(0)
    torch.save(make(), tmp_path / "m.pt")
    assert run_cli("m.pt", "--ratio", "1.0", "-q", cwd=tmp_path).returncode == 0
    result = run_cli("verify", "m.rps.safetensors", "--against", "m.pt", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"note: no example inputs, so {inputs} (the input {name} states): they check that the file "
                             "reproduces the model, not its quality on real data\n")
    out = json.loads(result.stdout)
    # ratio 1.0 regenerates every weight bit for bit (docs/format.md), so the outputs are equal
    assert out["inputs"] == inputs and out["max_abs_error"] == 0 and out["top1_drop"] == 0


def test_the_verify_command_prints_every_figure_and_gates_the_exit_status(model_file):
    assert rpsconvert("mlp.pt", "--ratio", "0.25", "-q").exit_code == 0
    result = rpsconvert("verify", "mlp.rps.safetensors", "--against", "mlp.pt")
    assert result.exit_code == 0, result.stderr
    for cell in ("on 256 random inputs", "absolute error", "relative error", "output cosine", "top-1 agreement", "bytes"):
        assert cell in result.stdout
    figures = json.loads(rpsconvert("verify", "mlp.rps.safetensors", "--against", "mlp.pt", "--json").stdout)
    failed = rpsconvert("verify", "mlp.rps.safetensors", "--against", "mlp.pt", "--atol", figures["max_abs_error"] / 2)
    assert failed.exit_code == 2 and failed.stderr.splitlines()[-1].startswith("error: quality gate missed: max absolute error")


def test_verify_uses_the_given_inputs(model_file):
    torch.save(torch.rand(40, 64), "inputs.pt")
    assert rpsconvert("mlp.pt", "--ratio", "1.0", "-q").exit_code == 0
    out = json.loads(rpsconvert("verify", "mlp.rps.safetensors", "--against", "mlp.pt", "--data", "inputs.pt", "--json").stdout)
    assert out["inputs"] == "40 held-out inputs" and out["max_abs_error"] == 0 and out["failures"] == []


def test_a_missed_gate_keeps_the_file_and_exits_2(model_file):
    result = rpsconvert("mlp.pt", "--ratio", "0.1", "--max-drop", "0", "--json")
    assert result.exit_code == 2
    assert "mlp.rps.safetensors is written all the same" in result.stderr
    verification = json.loads(result.stdout)["verification"]
    assert verification["top1_drop"] > 0
    assert load("mlp.rps.safetensors", small_model()) is not None  # the best attempt, kept


def test_convert_verify_passes_a_lossless_conversion(model_file):
    result = rpsconvert("mlp.pt", "--ratio", "1.0", "--verify", "--atol", "0")
    assert result.exit_code == 0, result.stderr
    assert "random inputs" in result.stdout and "100.00%" in result.stdout


def test_budgets_echo_their_bytes_and_bits_are_refused(model_file):
    result = rpsconvert("mlp.pt", "--budget", "20KiB")
    assert result.exit_code == 0, result.stderr
    assert "budget 20KiB = 20,480 bytes" in result.stdout
    refused = rpsconvert("mlp.pt", "--budget", "1Mb")
    assert refused.exit_code == 1
    assert refused.stderr == ("error: the budget '1Mb' is in bits (lowercase b): write 1MB for 1,000,000 bytes, "
                              "or 125000 for the 125,000 bytes that 1Mb holds\n")
