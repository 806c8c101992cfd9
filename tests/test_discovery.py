"""Discovery: which parameters are weights, through modules, functional calls and the fallback."""

import torch
from torch import nn

from models import FunctionalNet, LayerZoo, StdConv2d, TiedLM, Untraceable, tiny_bert
from rpsconvert.engine.discovery import discover


def test_functional_weights_are_found_and_added_parameters_are_not():
    found = discover(FunctionalNet())
    assert found.method == "fx"
    assert found.weights == ["w1", "w2"]  # not b1 (bias slot), not pos (added)


def test_weight_of_a_custom_conv_subclass_is_found_through_its_own_forward():
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.ReLU())
    assert discover(model).weights == ["0.weight"]


def test_tied_weight_is_one_weight_with_two_names():
    found = discover(TiedLM())
    assert found.weights == ["embed.weight", "mix.weight"]
    assert found.aliases["embed.weight"] == ["embed.weight", "head.weight"]


def test_multihead_attention_projections_are_weights():
    model = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
    assert set(discover(model).weights) == {
        "self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight",
    }


def test_untraceable_model_falls_back_to_module_scan_and_names_the_reason():
    found = discover(Untraceable())
    assert found.method == "module-scan"
    assert "TraceError" in found.fallback_reason or "symbolically traced" in found.fallback_reason
    assert found.weights == ["a.weight", "b.weight"]


def test_hugging_face_bert_is_found_by_export_with_its_tied_decoder():
    model = tiny_bert()
    found = discover(model)
    assert found.method == "export"
    word = "bert.embeddings.word_embeddings.weight"
    assert word in found.weights
    assert "cls.predictions.decoder.weight" in found.aliases[word]
    assert len(found.weights) == 2 * 6 + 3 + 1  # 6 linears a layer, 3 embeddings, the head transform; decoder tied


def test_every_weight_bearing_layer_kind_is_found():
    found = discover(LayerZoo())
    assert set(found.weights) == {
        "bag.weight", "conv1.weight", "up.weight", "conv3.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "mix",
        "bilinear.weight",
    }


class CachingNet(torch.nn.Module):
    """Caches a tensor computed in forward, as timm's LeViT caches its attention biases."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(40, 40)
        self.cache = {}

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.proj.weight.sum(0)
        return self.proj(x) + self.cache["bias"]


def test_tracing_leaves_the_model_as_it_was():
    import copy

    model = CachingNet()
    assert discover(model).weights == ["proj.weight"]
    assert model.cache == {}  # the trace ran on a copy: no proxy was cached in the user's model
    copy.deepcopy(model)(torch.randn(2, 40))


class _WithTrainingOnlyHead(nn.Module):
    """A head that only a training forward calls, as GoogLeNet's auxiliary classifiers."""

    def __init__(self):
        super().__init__()
        self.body, self.aux = nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.attention = nn.MultiheadAttention(64, 2)  # called: its out_proj is inside a called layer

    def forward(self, x):
        h = self.body(x)
        h = self.attention(h, h, h)[0]
        return (h, self.aux(h)) if self.training else h


def test_layers_the_traced_forward_never_reaches_are_found_by_their_kind():
    found = discover(_WithTrainingOnlyHead().eval())
    assert found.method == "fx"
    assert {"aux.0.weight", "aux.2.weight", "body.weight", "attention.in_proj_weight", "attention.out_proj.weight"} <= set(found.weights)
