"""ONNX of the compact model: the graph generates the weights from the stored pool, so the .onnx
file is about the .rps file's size, and onnxruntime gives PyTorch's outputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rpsconvert import OutputExistsError, check_onnx, convert, export_onnx, save

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
torchvision = pytest.importorskip("torchvision")
RPSCONVERT = Path(sys.executable).parent / "rpsconvert"
# The weights are the same bits in both (integer hashing, exact scaling); only the kernels' order of
# summation differs, a few float32 ulps of the outputs' magnitude
TOLERANCE = 1e-5
GRAPH_BYTES = 80_000  # the generation's nodes: one expression per span of weights (ResNet-18's is 76 kB)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10),
    ).eval()


@pytest.mark.parametrize(
    "options", [{"budget": "30kB"}, {"ratio": 0.25, "bits": 4}, {"ratio": 0.3, "bits": 2}, {"ratio": 0.3}], ids=["budget plan", "int4", "int2 in base 3", "float32"]
)
def test_the_onnx_graph_is_the_checkpoints_size_and_matches_pytorch(tmp_path, options):
    small = convert(small_cnn(), quiet=True, **options).eval()
    checkpoint = save(small, tmp_path / "m.rps.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = export_onnx(small, tmp_path / "m.onnx", (x,))
    onnx.checker.check_model(str(path))
    dense = sum(p.numel() * 4 for p in small_cnn().parameters())
    # the stored pool and dense tensors, and a graph of some hundred nodes whatever the model's size
    assert checkpoint.stat().st_size < path.stat().st_size < checkpoint.stat().st_size + GRAPH_BYTES < dense
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert not {name.removeprefix("plain.") for name in names} & set(small.rps.weights)  # no compressed weight is stored dense
    with torch.no_grad():
        scale = small(x).abs().max().item()
    assert check_onnx(path, small, (x,)) <= TOLERANCE * max(scale, 1.0)


def test_an_existing_onnx_file_is_not_replaced_without_overwrite(tmp_path):
    small = convert(small_cnn(), ratio=0.5)
    (tmp_path / "m.onnx").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_onnx(small, tmp_path / "m.onnx", (torch.randn(1, 3, 16, 16),))
    assert (tmp_path / "m.onnx").read_bytes() == b"mine"


def test_the_command_exports_a_recorded_architecture_and_reports_the_sizes(tmp_path):
    torch.manual_seed(0)
    model = convert(torchvision.models.mobilenet_v3_small(num_classes=10).eval(), ratio=0.2, bits=8,
                    architecture={"source": "torchvision", "name": "mobilenet_v3_small", "kwargs": {"num_classes": 10}})
    save(model, tmp_path / "m.rps.safetensors")
    result = subprocess.run([RPSCONVERT, "export", "m.rps.safetensors"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "wrote m.onnx" in result.stdout and "onnxruntime's outputs within" in result.stdout
    onnx_bytes, rps_bytes = (tmp_path / "m.onnx").stat().st_size, (tmp_path / "m.rps.safetensors").stat().st_size
    assert rps_bytes < onnx_bytes < rps_bytes + 2 * GRAPH_BYTES  # the model's own graph too: 52 layers and their blocks
    again = subprocess.run([RPSCONVERT, "export", "m.rps.safetensors"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "m.onnx already exists" in again.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.rps.safetensors"]
