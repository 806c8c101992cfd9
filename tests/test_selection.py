"""Naming the weights to compress: exact names, globs, re: expressions and module types."""

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rpsconvert import convert
from rpsconvert.cli import app


class WideLinear(nn.Linear):
    """A subclass: `Linear` names it through its MRO, as it names torch's own subclasses."""


def model() -> nn.Module:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), WideLinear(32, 32))
    return nn.Sequential(encoder, nn.Conv1d(32, 32, 1), nn.Flatten(), nn.Linear(32, 4))


def compressed(**selection) -> list[str]:
    return sorted(convert(model(), ratio=0.5, min_numel=1, **selection).rps.weights)


ALL = ["0.0.weight", "0.2.weight", "1.weight", "3.weight"]


@pytest.mark.parametrize(
    "include, expected",
    [
        ("1.weight", ["1.weight"]),  # an exact name
        ("0.*", ["0.0.weight", "0.2.weight"]),  # a glob
        ([r"re:0\.\d\.weight", "3.weight"], ["0.0.weight", "0.2.weight", "3.weight"]),  # a regex, with a name
        ("re:weight", []),  # a regex matches the whole name, as a glob does: nothing here
        ("Linear", ["0.0.weight", "0.2.weight", "3.weight"]),  # a type, subclasses included
        ("WideLinear", ["0.2.weight"]),  # the subclass alone
        ("Conv1d", ["1.weight"]),
    ],
)
def test_each_kind_of_include_pattern(include, expected):
    if not expected:
        with pytest.raises(ValueError, match="no weight"):
            compressed(include=include)
    else:
        assert compressed(include=include) == expected


@pytest.mark.parametrize("exclude", ["WideLinear", "0.2.weight", "0.[2]*", r"re:0\.2\..*"])
def test_each_kind_of_exclude_pattern(exclude):
    converted = convert(model(), ratio=0.5, min_numel=1, exclude=exclude)
    assert sorted(converted.rps.weights) == [n for n in ALL if n != "0.2.weight"]
    assert converted.rps.info["dense_reasons"]["0.2.weight"] == "excluded"


@pytest.mark.filterwarnings("ignore::rpsconvert.RPSWarning")  # it does not trace: the module scan finds its weights
def test_types_name_torch_subclasses_inside_attention():
    attention = nn.MultiheadAttention(16, 2)  # out_proj is a NonDynamicallyQuantizableLinear
    converted = convert(attention, ratio=0.5, min_numel=1, include="Linear")
    assert sorted(converted.rps.weights) == ["out_proj.weight"]


def test_a_bad_regex_is_named_before_any_work():
    with pytest.raises(ValueError, match=r"'re:\(' is not a regular expression"):
        convert(model(), ratio=0.5, include="re:(")


def test_cli_patterns_and_the_dry_run_plan_per_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(model(), "m.pt")
    args = ["m.pt", "--budget", "9kB", "--min-numel", "1", "--include", "Linear", "--exclude", "re:3\\..*", "--dry-run", "--trust-pickle"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    plan = {line.split()[0]: line for line in lines if line.strip().startswith(("0.", "1.", "3."))}
    assert "pool" in plan["0.0.weight"] and "pool" in plan["0.2.weight"]
    assert "dense: excluded" in plan["3.weight"] and "dense: not" in plan["1.weight"]  # not included: wrapped
    assert "budget 9kB = 9,000 bytes" in result.stdout
    assert max(map(len, lines)) <= 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
