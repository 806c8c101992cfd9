"""Loading a checkpoint without a skeleton rebuilds the model with its parameters on the meta
device and puts the file's tensors in as they are: the compressed weights are never allocated or
initialized, tied parameters stay one Parameter, and a parameter the file lacks is an error, never
a silently random weight."""

import pytest
import torch
import torchvision

from rpsconvert import CheckpointError, convert, load, save
from rpsconvert.format import checkpoint
from rpsconvert.format.serialized import serialize

transformers = pytest.importorskip("transformers")


def test_a_rebuilt_skeleton_is_never_initialized_in_memory(tmp_path, monkeypatch):
    save(convert(torchvision.models.resnet18(num_classes=10), ratio=0.1, architecture={"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}), tmp_path / "r.rps.safetensors")
    devices = []
    real = torch.nn.init.kaiming_normal_
    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", lambda tensor, *a, **k: devices.append(tensor.device.type) or real(tensor, *a, **k))
    model = load(tmp_path / "r.rps.safetensors")
    assert len(devices) == 20 and set(devices) == {"meta"}  # every conv of resnet18, initialized on meta
    assert all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_parameters_the_model_ties_stay_one_parameter(tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config).eval()
    converted = convert(original, ratio=0.5, exclude="*embed_tokens*", architecture=None)
    save(converted, f"{tmp_path}/out/")
    model = load(tmp_path / "out").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, converted(tokens).logits)


def test_a_parameter_the_file_lacks_is_an_error_not_a_random_weight(tmp_path):
    architecture = {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}
    save(convert(torchvision.models.resnet18(num_classes=10), ratio=0.1, architecture=architecture), tmp_path / "r.rps.safetensors")
    ckpt = checkpoint.read(tmp_path / "r.rps.safetensors")
    tensors = {name: t for name, t in ckpt.tensors.items() if name != "fc.bias"}
    tensors.update({"rps_pool": ckpt.pool.tensors["rps_pool"].detach()})
    file = tmp_path / "lacks.rps.safetensors"
    checkpoint.write_atomic(file, serialize(tensors, checkpoint._metadata(ckpt.manifest, tensors)))
    with pytest.raises(CheckpointError, match="holds no value for fc.bias, which its architecture has"):
        load(file, strict=False)
