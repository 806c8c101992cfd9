"""The fidelity report: how close a converted model is to its original, on held-out inputs."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from digits import batches, trained_mlp
from rpsconvert import convert
from rpsconvert.quality.fidelity import fidelity, layer_errors


class Scaled(nn.Module):
    """The wrapped model's output times a constant: a known relative error, a perfect cosine."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


@dataclass
class Output:  # shaped like a Hugging Face ModelOutput
    logits: torch.Tensor
    token_ids: torch.Tensor | None = None
    hidden: tuple | None = None


class Structured(nn.Module):
    def __init__(self, noise=0.0):
        super().__init__()
        self.net = trained_mlp()
        self.noise = noise

    def forward(self, x):
        logits = self.net(x)
        hidden = self.net[0](x)
        return Output(logits=logits + self.noise, token_ids=logits.argmax(-1), hidden=(hidden, None))


def test_a_model_agrees_perfectly_with_itself():
    model = trained_mlp()
    f = fidelity(model, copy.deepcopy(model), batches("heldout"))
    assert f.relative_error == 0 and f.cosine == pytest.approx(1) and f.top1_agreement == 1
    assert f.samples == 397


def test_relative_error_and_cosine_are_those_of_the_outputs():
    model = trained_mlp()
    f = fidelity(Scaled(model, 1.1), model, batches("heldout"))
    assert f.relative_error == pytest.approx(0.1)
    assert f.cosine == pytest.approx(1)
    assert f.top1_agreement == 1  # scaling logits keeps every argmax


def test_float_tensors_inside_dataclass_outputs_are_compared_and_the_rest_ignored():
    torch.manual_seed(0)
    f = fidelity(Structured(noise=0.0), Structured(noise=0.0), batches("heldout"))
    assert f.relative_error == 0 and f.top1_agreement == 1
    shifted = fidelity(Structured(noise=1.0), Structured(noise=0.0), batches("heldout"))
    assert shifted.relative_error > 0  # the logits differ; token_ids (integers) and None are skipped
    assert shifted.top1_agreement == 1  # a constant shift keeps every argmax


def test_outputs_that_do_not_line_up_are_refused():
    model = trained_mlp()
    with pytest.raises(ValueError, match="different outputs"):
        fidelity(model, nn.Sequential(model, nn.Linear(10, 3)), batches("heldout"))


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = trained_mlp()[:3]

    def forward(self, x):
        return {"embedding": self.net(x)}


def test_outputs_without_logits_have_no_top1_agreement():
    model = Embedder()
    f = fidelity(model, copy.deepcopy(model), batches("heldout"))
    assert f.top1_agreement is None
    assert "top-1" not in f.summary()


def test_layer_errors_are_zero_at_ratio_one_and_grow_with_compression():
    model = trained_mlp()
    lossless = layer_errors(convert(model, ratio=1.0), model, batches("heldout"))
    assert list(lossless) == ["0", "2", "4"]  # forward order
    assert max(lossless.values()) < 1e-6
    small = layer_errors(convert(model, ratio=1 / 8), model, batches("heldout"), isolated=True)
    assert all(0.5 < e < 1.1 for e in small.values())


def test_isolated_layer_error_is_the_weight_error_seen_through_the_inputs():
    model = trained_mlp()
    converted = convert(model, ratio=1 / 4)
    errors = layer_errors(converted, model, batches("heldout"), isolated=True)
    x = torch.cat(batches("heldout"))
    with torch.no_grad():
        expected = (converted[0](x) - model[0](x)).norm() / model[0](x).norm()
    assert errors["0"] == pytest.approx(float(expected), rel=1e-6)


def test_weight_errors_are_zero_at_ratio_one_and_the_total_weighs_every_weight():
    from rpsconvert.quality.fidelity import weight_errors

    model = trained_mlp()
    assert max(weight_errors(convert(model, ratio=1.0), model).values()) < 1e-6
    errors = weight_errors(convert(model, ratio=1 / 4), model)
    assert list(errors) == ["total", "0.weight", "2.weight", "4.weight"]
    assert min(errors.values()) > 0.5 and errors["total"] <= max(errors.values())
