"""The model card (README.md) of a model directory: the Hub's metadata (base model, relation,
library) and how the file was made, from the checkpoint's own provenance."""

import json
import os

import pytest
import torch
from torch import nn

from rpsconvert import convert, save
from rpsconvert.format.model_card import model_card

MANIFEST = {
    "format_version": 4, "mapping": "randomfold", "seed": 0, "original_bytes": 449_792,
    "pool": {"tensor": "rps_pool", "slots": 112_128, "dtype": "uint8", "scale_dtype": "float16", "runs": [[1, 3, 32], [2, 4, 32]]},
    "provenance": {
        "rpsconvert": "0.1.0", "torch": "2.14.1", "call": {"budget": "60kB", "ratio": None},
        "command": ["rpsconvert", "convert", "tiny-llama", "--budget", "60kB", "--calibrate", "lines.txt"],
        "inputs": {"model": {"name": "tiny-llama"}},
        "plan": [{"storage": "float16", "slots": 25_818, "weight_error": 0.77}, {"storage": "mixed int4 16% + int3 84%", "slots": 112_128, "weight_error": 0.0266}],
        "weight_error": 0.18,
        "fidelity": {"on": "converted", "top1_agreement": 0.875, "cosine": 0.99, "relative_error": 0.12, "max_abs_error": None},
    },
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "_name_or_path": "meta-llama/Llama-3.2-1B"}


def front_matter(card: str) -> dict:
    head = card.split("---\n")[1]
    return {key: json.loads(value) for key, value in (line.split(": ", 1) for line in head.strip().splitlines())}


def test_the_card_links_the_base_model_as_quantized_and_says_how_it_was_made():
    card = model_card(MANIFEST, 59_259, CONFIG)
    meta = front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert "transformers.AutoModelForCausalLM.from_pretrained" in card and "import rpsconvert" in card
    assert "- budget: 60kB; the file takes 59,259 bytes" in card
    assert "kept mixed int4 16% + int3 84% (112,128 slots, weight error 0.0266)" in card  # the plan's choice
    assert "top1 agreement 0.875, cosine 0.99, relative error 0.12" in card
    assert "`rpsconvert convert tiny-llama --budget 60kB --calibrate lines.txt`" in card


def test_a_local_source_is_named_by_its_input_and_no_data_means_no_fidelity_claimed():
    made = {**MANIFEST["provenance"], "fidelity": None}
    card = model_card({**MANIFEST, "provenance": made}, 59_259, {**CONFIG, "_name_or_path": "/home/me/tiny-llama"})
    assert front_matter(card)["base_model"] == "tiny-llama"  # never a path
    assert "measured fidelity: none (converted without data)" in card


def test_a_directory_of_a_plain_model_gets_a_card_too(tmp_path):
    torch.manual_seed(0)
    written = save(convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)), ratio=0.5), f"{tmp_path}/mlp/")
    assert sorted(os.listdir(written)) == ["README.md", "model.rps.safetensors"]
    card = (written / "README.md").read_text()
    assert front_matter(card)["library_name"] == "rpsconvert" and "base_model" not in front_matter(card)  # none recorded
    assert "rpsconvert.convert(model, ratio=0.5" in card
