"""Discovery by torch.export: models torch.fx cannot trace (Hugging Face's, Python control flow on
shapes) are captured on example inputs, and functional weights the module scan misses are found."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import Untraceable
from rpsconvert import convert, report
from rpsconvert.engine.discovery import discover
from rpsconvert.engine.kinds import weight_names

transformers = pytest.importorskip("transformers")


def tiny_bert_model():
    config = transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32
    )
    torch.manual_seed(0)
    return transformers.BertModel(config)


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)  # Conv1D layers used through torch.addmm, lm_head tied to wte


class ShapeBranch(nn.Module):
    """A branch on the input's shape (torch.fx cannot trace it, torch.export specializes it) and a
    weight used only through F.linear (the module scan cannot see it)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Parameter(torch.randn(16, 32) * 0.1)

    def forward(self, x):
        if x.shape[0] > 1:
            x = torch.relu(self.proj(x))
        return F.linear(x, self.head)


@pytest.mark.parametrize("build", [tiny_bert_model, tiny_gpt2], ids=["BertModel", "GPT2LMHeadModel"])
def test_hugging_face_models_are_captured_by_export_and_find_at_least_what_the_scan_finds(build):
    model = build()
    found = discover(model)
    assert found.method == "export" and found.fallback_reason is None
    every_name = {name for names in found.aliases.values() for name in names}
    assert set(weight_names(model, "")) <= every_name


def test_gpt2_tied_head_is_one_weight():
    found = discover(tiny_gpt2())
    assert found.aliases["transformer.wte.weight"] == ["transformer.wte.weight", "lm_head.weight"]
    assert "transformer.h.0.attn.c_attn.weight" in found.weights  # Conv1D: a weight of torch.addmm


def test_a_functional_weight_is_found_by_export_and_missed_by_the_module_scan():
    x = torch.randn(4, 32)
    scanned, exported = discover(ShapeBranch()), discover(ShapeBranch(), x)
    assert scanned.method == "module-scan" and scanned.weights == ["proj.weight"]
    assert exported.method == "export" and exported.weights == ["head", "proj.weight"]


def test_example_inputs_may_be_a_tuple_or_a_dict_of_arguments():
    x = torch.randn(4, 32)
    assert discover(ShapeBranch(), (x,)).weights == discover(ShapeBranch(), {"x": x}).weights == ["head", "proj.weight"]


def test_convert_captures_the_model_on_its_first_calibration_batch():
    model = ShapeBranch()
    calibration = [torch.randn(8, 32) for _ in range(3)]
    converted = convert(model, ratio=1.0, min_numel=100, calibration=calibration, quiet=True)
    assert report(converted).discovery == "export"
    assert sorted(converted.rps.weights) == ["head", "proj.weight"]
    with torch.no_grad():
        assert torch.allclose(converted(calibration[0]), model(calibration[0]), atol=1e-6)


def test_when_export_fails_too_the_module_scan_runs_and_both_reasons_are_kept():
    found = discover(Untraceable(), torch.randn(2, 40))  # branches on a tensor's value: export cannot follow it either
    assert found.method == "module-scan"
    assert found.weights == ["a.weight", "b.weight"]
    assert "; torch.export: " in found.fallback_reason


def test_export_leaves_the_model_as_it_was():
    model = tiny_gpt2()
    before = {name: (type(m), sorted(vars(m))) for name, m in model.named_modules()}
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    assert discover(model).method == "export"
    assert {name: (type(m), sorted(vars(m))) for name, m in model.named_modules()} == before
    assert all(t is tensors[name] for name, t in model.state_dict(keep_vars=True).items())


def test_export_of_a_model_in_training_mode_leaves_its_running_statistics_alone():
    model = nn.Sequential(nn.BatchNorm1d(32), ShapeBranch()).train()
    stats = [t.clone() for t in model[0].buffers()]
    assert discover(model, torch.randn(4, 32) + 5).method == "export"
    assert all(torch.equal(a, b) for a, b in zip(stats, model[0].buffers()))
