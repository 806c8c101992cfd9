"""Tables fit an 80-column terminal: long tensor names are shortened in the middle, never wrapped."""

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from rpsconvert import convert, save
from rpsconvert.cli import app
from rpsconvert.cli.tables import shorten

RPSCONVERT = Path(sys.executable).parent / "rpsconvert"  # the installed console script


def test_shorten_keeps_both_ends():
    assert shorten("encoder.layers.11.attention.weight", 40) == "encoder.layers.11.attention.weight"
    assert shorten("encoder.layers.11.attention.weight", 15) == "encoder….weight"
    assert [len(shorten("x" * 50, width)) for width in (1, 2, 16, 49)] == [1, 2, 16, 49]


def test_info_fits_80_columns_and_json_keeps_the_full_names(tmp_path):
    torch.manual_seed(0)
    deep = "encoder_block_with_a_rather_long_name_as_transformers_have"
    inner = nn.Sequential(OrderedDict(self_attention_output_projection_of_the_block=nn.Linear(64, 64)))
    model = nn.Sequential(OrderedDict([(deep, inner), ("head", nn.Linear(64, 10))]))
    path = save(convert(model, ratio=0.5, min_numel=1), tmp_path / "m.rps.safetensors")
    env = {**os.environ, "COLUMNS": "80"}
    text = subprocess.run([RPSCONVERT, "info", path], capture_output=True, text=True, env=env, check=True).stdout
    assert max(map(len, text.splitlines())) <= 80
    long_names = [name for name in model.state_dict() if name.startswith(deep)]
    rows = [line for line in text.splitlines() if line.strip().startswith(deep[:10])]
    assert len(rows) == len(long_names) and all("…" in row for row in rows)  # one line each
    shown = json.loads(CliRunner().invoke(app, ["info", str(path), "--json"]).stdout)
    assert set(shown["dense"]) | {w["name"] for w in shown["manifest"]["weights"]} == set(model.state_dict())
