"""Model inputs: pickles are read safely, names and state dicts build the right model, and the
architecture is recorded whenever it can be."""

import os

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from models import TiedLM, tiny_bert
from rpsconvert import convert, load, save
from rpsconvert.format.architectures import transformers_architecture
from rpsconvert.cli.inputs import InputError, load_pickle, read_model


class Evil:
    """A pickle payload: unpickling it calls os.system, which creates a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_pickled_torchvision_model_loads_safely_and_records_its_architecture(tmp_path):
    torch.save(torchvision.models.resnet18(), tmp_path / "r18.pt")
    source = read_model(str(tmp_path / "r18.pt"))
    assert type(source.model).__name__ == "ResNet"
    assert source.architecture == "torchvision:resnet18"  # resnet34 has the same class, not the same shapes
    assert source.output == tmp_path / "r18.rps.safetensors"


def test_a_fine_tuned_head_is_recorded_as_a_builder_option(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=7), tmp_path / "m.pt")
    source = read_model(str(tmp_path / "m.pt"))
    assert source.architecture == {"source": "torchvision", "name": "mobilenet_v3_small", "kwargs": {"num_classes": 7}}


def test_a_pickled_timm_model_loads_safely_and_records_its_architecture(tmp_path):
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("resnet18", num_classes=5), tmp_path / "t.pt")
    source = read_model(str(tmp_path / "t.pt"))
    assert source.architecture == {"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 5}}


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    target = tmp_path / "pwned"
    torch.save({"model": Evil(target)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"needs posix.system to unpickle.*can run any code.*pass trust_pickle=True") as refused:
        read_model(str(tmp_path / "evil.pt"))
    assert not target.exists()
    # the command line says the same with its own flags
    assert "pass --trust-pickle, or save a state dict and pass its --arch SOURCE:NAME" in refused.value.for_cli()


def test_a_plain_pickle_is_refused_because_it_cannot_be_inspected(tmp_path):
    import pickle

    target = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(target)))
    with pytest.raises(InputError, match="cannot check .* for unsafe content.*trust_pickle=True"):
        load_pickle(tmp_path / "evil.pkl")
    assert not target.exists()


def test_a_custom_class_needs_trust_pickle(tmp_path):
    torch.save(TiedLM(), tmp_path / "lm.pt")
    with pytest.raises(InputError, match=r"needs models.TiedLM to unpickle"):
        read_model(str(tmp_path / "lm.pt"))
    source = read_model(str(tmp_path / "lm.pt"), trust_pickle=True)
    assert isinstance(source.model, TiedLM) and source.architecture is None


def test_a_state_dict_needs_arch_and_then_builds_that_model(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.resnet18()
    torch.save(original.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InputError, match="is a state dict, not a model: pass its architecture, for example arch='torchvision:resnet50'"):
        read_model(str(tmp_path / "sd.pt"))
    source = read_model(str(tmp_path / "sd.pt"), arch="torchvision:resnet18")
    assert source.architecture == {"source": "torchvision", "name": "resnet18", "kwargs": {}}
    assert torch.equal(source.model.fc.weight, original.fc.weight)


def test_a_state_dict_may_store_tied_weights_once(tmp_path):
    bert = tiny_bert()
    safetensors.torch.save_model(bert, tmp_path / "bert.safetensors")  # one name per tied tensor
    assert len(safetensors.torch.load_file(tmp_path / "bert.safetensors")) < len(bert.state_dict())
    source = read_model(str(tmp_path / "bert.safetensors"), arch=transformers_architecture(bert))
    tokens = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(source.model.eval()(tokens).logits, bert(tokens).logits)


def test_a_state_dict_that_does_not_fit_arch_is_a_clear_error(tmp_path):
    safetensors.torch.save_file(torchvision.models.resnet18().state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(InputError, match=r"does not fit arch='torchvision:resnet34' \(missing: layer1.2"):
        read_model(str(tmp_path / "r18.safetensors"), arch="torchvision:resnet34")
    with pytest.raises(InputError, match=r"does not fit arch='torchvision:resnet50' \(size mismatch for layer1.0.conv1.weight"):
        read_model(str(tmp_path / "r18.safetensors"), arch="torchvision:resnet50")


def test_a_torchvision_name_loads_the_pretrained_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    weights = torchvision.models.resnet18().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(weights, cache / "resnet18-f37072fd.pth")  # where torchvision caches its download
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = read_model("torchvision:resnet18")
    assert torch.equal(source.model.conv1.weight, weights["conv1.weight"])
    assert source.architecture == "torchvision:resnet18" and str(source.output) == "resnet18.rps.safetensors"


def test_a_hugging_face_directory_records_its_config_and_loads_back_without_a_skeleton(tmp_path):
    bert = tiny_bert()
    bert.save_pretrained(tmp_path / "tiny-bert")
    source = read_model(str(tmp_path / "tiny-bert"))
    assert source.architecture["source"] == "transformers" and source.architecture["name"] == "BertForMaskedLM"
    assert source.output == tmp_path / "tiny-bert.rps.safetensors"
    converted = convert(source.model, 0.5, architecture=source.architecture)
    loaded = load(save(converted, source.output))
    tokens = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens).logits, converted.eval()(tokens).logits)


def test_a_checkpoint_is_not_accepted_as_a_model(tmp_path):
    path = save(convert(nn.Sequential(nn.Linear(40, 40)), 0.5), tmp_path / "m.rps.safetensors")
    with pytest.raises(InputError, match="already an rpsconvert checkpoint: convert the original model"):
        read_model(str(path))


def test_a_missing_path_that_is_no_model_name_is_a_clear_error():
    with pytest.raises(InputError, match="no such file or directory, nor a model name such as torchvision:resnet50"):
        read_model("missing.pt")
