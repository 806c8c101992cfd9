"""Conformance: models of the big libraries convert losslessly at ratio 1.0, fit a budget, save and
load to identical outputs, and decompress to a plain state dict (the checks are `zoo.conform`).

CI runs one small member of each family (`zoo.CI_SAMPLE`); `make zoo` (RPSCONVERT_ZOO=all) runs
every model, and benchmarks/coverage.py writes the table of docs/coverage.md from the same checks.
"""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")

from zoo import CI_SAMPLE, HUGGING_FACE, RUN_ALL, conform, zoo  # noqa: E402

from rpsconvert import RPSWarning, convert, report  # noqa: E402
from rpsconvert.engine.kinds import weight_names  # noqa: E402

ZOO = zoo()
OUTSIDE_SAMPLE = pytest.mark.skipif(not RUN_ALL, reason="outside the CI sample: make zoo (RPSCONVERT_ZOO=all) runs it")


@pytest.mark.parametrize(
    "entry", [pytest.param(m, id=m.name, marks=() if m.name in CI_SAMPLE else OUTSIDE_SAMPLE) for m in ZOO]
)
def test_model_converts_losslessly_fits_its_budget_and_round_trips(entry):
    result = conform(entry)
    assert result["compressed_share"] > 0.9  # every zoo model holds over 90% of its bytes in weights


def test_the_ci_sample_names_only_zoo_models_and_covers_each_library():
    names = {m.name for m in ZOO}
    assert CI_SAMPLE <= names
    assert {name.split(":")[0] for name in CI_SAMPLE} == {"torchvision", "timm", "transformers"}


def test_the_zoo_holds_every_torchvision_classifier_and_25_timm_models():
    import torchvision

    assert sum(m.name.startswith("torchvision:") for m in ZOO) == len(torchvision.models.list_models(module=torchvision.models))
    assert sum(m.name.startswith("timm:") for m in ZOO) >= 25


def test_gpt2_conv1d_weights_are_compressed_through_export():
    gpt2 = next(m for m in HUGGING_FACE if m.name.endswith("GPT2LMHeadModel")).build()
    rep = report(convert(gpt2, ratio=0.1))  # torch.fx cannot trace GPT-2: torch.export on its dummy inputs can
    compressed = {w.name for w in rep.weights if w.compressed}
    assert rep.discovery == "export"
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"} <= compressed
    assert rep.original_bytes / rep.total_bytes > 7  # 544.77 kB -> 60.93 kB: only biases and norms stay dense


def test_a_model_whose_matrices_are_mostly_not_weights_gets_a_warning_naming_them_and_their_share():
    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(64, 64))  # added to the input: no weight
            self.proj = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.proj(x + self.table)

    with pytest.warns(RPSWarning, match=r"66% of the bytes of Positional .* stay dense: table;"):
        convert(Positional(), ratio=0.5)


def test_the_package_imports_and_converts_without_transformers_or_timm():
    blocked = "import sys; sys.modules.update(transformers=None, timm=None)"  # None makes `import` fail
    script = f"{blocked}; import torch, rpsconvert; rpsconvert.convert(torch.nn.Linear(64, 64), ratio=0.5); print('ok')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout == "ok\n", done.stderr


@pytest.mark.parametrize(
    "layer",
    [
        lambda: __import__("transformers").pytorch_utils.Conv1D(32, 16),
        lambda: __import__("torchvision").ops.DeformConv2d(4, 8, 3),
        lambda: __import__("timm").layers.CondConv2d(4, 8, 3, num_experts=2),
    ],
    ids=["hf-Conv1D", "torchvision-DeformConv2d", "timm-CondConv2d"],
)
def test_layers_of_optional_libraries_are_known_by_name_to_the_module_scan(layer):
    assert weight_names(layer(), "layer") == ["layer.weight"]
