"""convert(): lossless at ratio 1.0, layers keep their identity, gradients reach the pool, memory."""


import pytest
import torch
import torchvision
from torch import nn

from models import FunctionalNet, LayerZoo, StdConv2d, TiedLM, Untraceable, tiny_bert
import safetensors.torch

from rpsconvert import RPSWarning, clear_cache, convert, materialize, report, save


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "name, size",
    [("resnet18", 64), ("resnet50", 64), ("mobilenet_v3_small", 64), ("vit_b_16", 224)],
)
def test_ratio_one_is_lossless_on_torchvision_models(name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    with torch.no_grad():  # vit_b_16's head starts at zero, which would make every output 0
        [p.normal_(0, 0.02) for p in model.parameters() if p.ndim > 1 and not p.any()]
    converted = convert(model, ratio=1.0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert _relative_error(converted(x), model(x)) < 1e-5
    assert report(converted).ratio == 1.0


def test_ratio_one_is_lossless_on_a_hugging_face_bert_found_by_export():
    model = tiny_bert()
    converted = convert(model, ratio=1.0)
    assert report(converted).discovery == "export"  # torch.fx cannot trace BERT; torch.export on its dummy inputs can
    tokens = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        assert _relative_error(converted(tokens).logits, model(tokens).logits) < 1e-5


def test_functional_weights_are_compressed_and_positional_embedding_kept():
    model = FunctionalNet()
    converted = convert(model, ratio=1.0, min_numel=1)
    assert sorted(converted.rps.weights) == ["w1", "w2"]
    assert "pos" in dict(converted.named_parameters())
    x = torch.randn(5, 4, 32)
    assert _relative_error(converted(x), model(x)) < 1e-5


def test_custom_conv_subclass_keeps_its_class_and_forward():
    model = nn.Sequential(StdConv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    converted = convert(model, ratio=0.5, min_numel=100)
    layer = converted[0]
    assert isinstance(layer, StdConv2d) and isinstance(layer, nn.Conv2d)
    assert layer.kernel_size == (3, 3) and layer.bias is not None
    assert "weight" not in dict(layer.named_parameters(recurse=False))
    assert converted(torch.randn(1, 3, 10, 10)).shape == (1, 8, 6, 6)


def test_tied_weights_stay_tied_and_are_counted_once():
    model = TiedLM()
    converted = convert(model, ratio=0.25, min_numel=100)
    assert torch.equal(converted.head.weight, converted.embed.weight)
    r = report(converted)
    assert r.compressible_elements == 300 * 48 + 48 * 48
    assert [w.name for w in r.weights if w.compressed] == ["embed.weight", "mix.weight"]
    converted(torch.randint(0, 300, (2, 7))).sum().backward()
    assert converted.rps_pool.grad.abs().sum() > 0


def test_untraceable_model_converts_through_the_fallback_and_says_so():
    model = Untraceable()
    with pytest.warns(RPSWarning, match="TraceError"):
        converted = convert(model, ratio=1.0, min_numel=1)
    assert report(converted).discovery == "module-scan"
    x = torch.rand(3, 40)
    assert _relative_error(converted(x), model(x)) < 1e-5


def test_gradients_reach_the_pool_and_an_optimizer_step_changes_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
    converted = convert(model, ratio=0.1, min_numel=100)
    params = dict(converted.named_parameters())
    assert set(params) == {"rps_pool", "0.bias", "2.bias"}
    before = converted[0].weight.detach().clone()
    optimizer = torch.optim.Adam(converted.parameters(), lr=1e-2)
    nn.functional.cross_entropy(converted(torch.randn(8, 20)), torch.randint(0, 3, (8,))).backward()
    assert converted.rps_pool.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(converted[0].weight, before)


def test_same_seed_gives_the_same_pool_and_another_seed_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 80), nn.Linear(80, 10))
    a, b = convert(model, ratio=0.3, min_numel=1), convert(model, ratio=0.3, min_numel=1)
    c = convert(model, ratio=0.3, min_numel=1, seed=1)
    assert torch.equal(a.rps_pool, b.rps_pool)
    assert not torch.equal(a.rps_pool, c.rps_pool)


def test_the_original_model_is_untouched_unless_inplace():
    model = nn.Sequential(nn.Linear(50, 80))
    weight = model[0].weight
    convert(model, ratio=0.5, min_numel=1)
    assert model[0].weight is weight and type(model[0]) is nn.Linear
    same = convert(model, ratio=0.5, min_numel=1, inplace=True)
    assert same is model and isinstance(model[0], nn.Linear) and type(model[0]) is not nn.Linear


def test_selection_by_patterns_and_min_numel():
    model = nn.Sequential(nn.Linear(50, 80), nn.Linear(80, 10), nn.Linear(10, 2))
    converted = convert(model, ratio=0.5, min_numel=100, exclude=["1.*"])
    assert list(converted.rps.weights) == ["0.weight"]
    reasons = {w.name: w.reason for w in report(converted).weights if not w.compressed}
    assert reasons["1.weight"] == "excluded"
    assert reasons["2.weight"] == "fewer than min_numel=100 elements"
    assert reasons["0.bias"] == "1-D"
    only = convert(model, ratio=0.5, min_numel=1, include="2.*")
    assert list(only.rps.weights) == ["2.weight"]


def test_half_precision_pool_is_stored_in_half_and_trains_in_the_weights_dtype(tmp_path):
    model = nn.Sequential(nn.Linear(50, 80))
    converted = convert(model, ratio=1.0, min_numel=1, dtype=torch.float16)
    assert converted.rps.packed and converted.rps_pool_packed.numel() == 4000  # held in half, as stored
    converted.rps.unpack()  # to train: float32 values, exact in float16
    assert converted.rps_pool.dtype == torch.float32
    assert torch.equal(converted.rps_pool.half().float(), converted.rps_pool)
    assert report(converted).pool_bytes == 2 * 4000
    x = torch.randn(2, 50)
    assert converted(x).dtype == torch.float32
    assert converted.half()(x.half()).dtype == torch.float16  # the weights follow the pool's dtype
    path = save(converted.float(), tmp_path / "m.rps.safetensors")
    assert safetensors.torch.load_file(path)["rps_pool"].dtype == torch.float16


def test_materialized_cache_gives_the_same_outputs_and_follows_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    converted = convert(model, ratio=0.2, min_numel=1)
    x = torch.randn(4, 30)
    with torch.no_grad():
        reference = converted(x)
        materialize(converted)
        assert torch.equal(converted(x), reference)
        assert converted[0].weight is converted[0].weight  # served from the cache
    with torch.no_grad():
        converted.rps_pool.add_(0.1)  # the pool changes: the cache must not be served
        changed = converted(x)
    clear_cache(converted)
    with torch.no_grad():
        assert torch.equal(converted(x), changed)
    assert not torch.equal(changed, reference)


def test_resnet50_at_one_percent_stores_no_per_element_integers():
    model = torchvision.models.resnet50()
    converted = convert(model, ratio=0.01)
    x = torch.randn(1, 3, 64, 64)
    converted(x).sum().backward()  # generating weights must not leave index tensors behind
    tensors = list(converted.state_dict().values()) + [p.grad for p in converted.parameters() if p.grad is not None]
    tensors += [v for v in vars(converted.rps).values() if isinstance(v, torch.Tensor)]
    assert all(t.numel() <= 1 for t in tensors if not t.dtype.is_floating_point)
    r = report(converted)
    compressible = 4 * r.compressible_elements
    held = sum(t.numel() * t.element_size() for t in converted.state_dict().values())
    assert compressible == pytest.approx(102.0e6, rel=0.01)
    assert held == pytest.approx(0.01 * compressible + r.dense_bytes, rel=1e-3)
    assert r.dense_bytes == pytest.approx(0.43e6, rel=0.05)


def test_ratio_one_is_lossless_on_every_layer_kind():
    torch.manual_seed(0)
    model = LayerZoo()
    converted = convert(model, ratio=1.0, min_numel=1)
    assert len(converted.rps.weights) == 8
    x = LayerZoo.inputs()
    assert _relative_error(converted(*x), model(*x)) < 1e-5


def test_ratio_one_reproduces_every_weight_bit_for_bit():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    converted = convert(model, ratio=1.0)
    for name in converted.rps.weights:
        module_name, _, attr = name.rpartition(".")
        original = getattr(model.get_submodule(module_name), attr)
        assert torch.equal(getattr(converted.get_submodule(module_name), attr), original), name
