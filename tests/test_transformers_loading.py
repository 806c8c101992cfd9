"""transformers' own from_pretrained loads a converted directory once rpsconvert is imported (its
registered `rps` quantizer), in lean mode, and refuses it in one clear line otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rpsconvert
from rpsconvert import convert, from_pretrained, is_converted, save

transformers = pytest.importorskip("transformers")
RPSCONVERT = Path(sys.executable).parent / "rpsconvert"
TOKENS = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
SMALL = {"vocab_size": 300}


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **SMALL)).eval()
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64, **SMALL)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, **SMALL)
    return transformers.BertModel(config).eval()


AUTO = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "bert": "AutoModel"}


def first_output(model):
    with torch.no_grad():
        out = model(TOKENS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", AUTO)
def test_the_auto_class_returns_the_converted_model_in_lean_mode(tmp_path, kind):
    directory = save(convert(tiny(kind), ratio=0.5), f"{tmp_path}/out/")
    loaded = getattr(transformers, AUTO[kind]).from_pretrained(directory)
    assert type(loaded).__name__ == type(tiny(kind)).__name__ and is_converted(loaded)
    assert loaded.rps.mode == "lean" and not loaded.training
    assert loaded.config.quantization_config.quant_method == "rps"
    assert torch.equal(first_output(loaded), first_output(from_pretrained(directory)))  # the same pool, the same bits


def test_generation_is_identical_to_rpsconverts_own_loader(tmp_path):
    directory = save(convert(tiny("gpt2"), budget="40kB", quiet=True), f"{tmp_path}/out/")
    ids = torch.tensor([[1, 5, 7, 9]])
    ours = from_pretrained(directory).generate(ids, max_new_tokens=10, do_sample=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs) and ours.shape == (1, 14)


def test_a_pipeline_loads_the_directory_by_its_path(tmp_path):
    source = tmp_path / "bert"
    tiny("bert").save_pretrained(source)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]
    (source / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(source / "vocab.txt")).save_pretrained(source)
    directory = save(convert(transformers.BertModel.from_pretrained(source), ratio=0.5), f"{tmp_path}/out/", tokenizer_from=source)
    features = transformers.pipeline("feature-extraction", model=str(directory))("the cat sat", return_tensors=True)
    assert features.shape == (1, 5, 32)  # [CLS] the cat sat [SEP]
    with torch.no_grad():
        expected = from_pretrained(directory)(torch.tensor([[2, 5, 6, 7, 3]])).last_hidden_state
    assert torch.equal(features, expected)


def test_without_import_rpsconvert_loading_fails_and_says_to_import_it(tmp_path):
    directory = save(convert(tiny("llama"), ratio=0.5), f"{tmp_path}/out/")
    script = f"import sys, transformers\ntransformers.AutoModelForCausalLM.from_pretrained({str(directory)!r})\nprint('loaded')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "loaded" not in result.stdout  # never a model with random weights
    assert "run `import rpsconvert`" in result.stderr.splitlines()[-1]


def test_save_pretrained_writes_the_same_directory(tmp_path):
    converted = convert(tiny("llama"), ratio=0.5)
    first = save(converted, f"{tmp_path}/first/")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(first)
    loaded.save_pretrained(tmp_path / "again")
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(first)) == ["README.md", "config.json", "model.rps.safetensors"]
    converted.save_pretrained(tmp_path / "direct")  # a model convert returned, too
    assert (tmp_path / "direct" / "model.rps.safetensors").read_bytes() == (first / "model.rps.safetensors").read_bytes()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(first_output(again), first_output(converted))


def test_a_plain_models_save_pretrained_is_transformers_own(tmp_path):
    tiny("gpt2").save_pretrained(tmp_path / "plain")
    assert "model.safetensors" in os.listdir(tmp_path / "plain")


def test_a_newcomer_converts_with_the_command_and_loads_with_transformers(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "llama")
    result = subprocess.run([RPSCONVERT, "llama", "--budget", "60kB", "-o", "out/", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    script = (
        "import rpsconvert, torch, transformers, sys\n"
        "ids = torch.tensor([[1, 5, 7, 9]])\n"
        "hf = transformers.AutoModelForCausalLM.from_pretrained('out').generate(ids, max_new_tokens=12, do_sample=False)\n"
        "ours = rpsconvert.from_pretrained('out').generate(ids, max_new_tokens=12, do_sample=False)\n"
        "print(torch.equal(hf, ours), hf.shape[1])\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["True", "16"]


def test_import_rpsconvert_does_not_import_transformers():
    script = "import sys, rpsconvert\nprint('transformers' in sys.modules, 'onnx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.stdout.split() == ["False", "False"]
