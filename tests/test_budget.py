"""Budgets and ratios: parsing, validation, and the pool size a budget buys."""

import pytest
import torch
from torch import nn

from rpsconvert import BudgetError, RPSWarning, convert, parse_bytes, report
from rpsconvert.engine.budget import check_ratio
from rpsconvert.engine.mapping import HashedNet


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1MB", 1_000_000),
        ("1mb", 1_000_000),
        ("1.5 MiB", 1_572_864),
        ("500kB", 500_000),
        ("500KiB", 512_000),
        ("123456", 123_456),
        ("2 GB", 2_000_000_000),
        ("1gib", 2**30),
        ("10 B", 10),
        (".5MB", 500_000),
        (4096, 4096),
    ],
)
def test_budget_strings_are_read_in_si_and_iec_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "1 XB", "one MB", "-1MB", "1e6", "0", "1 M B"])
def test_nonsense_budgets_are_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="budget"):
        parse_bytes(text)


def test_ratio_above_one_suggests_the_inverse():
    with pytest.raises(ValueError, match=r"ratio=0\.01"):
        check_ratio(100)


@pytest.mark.parametrize("ratio", [0, -0.5, float("nan")])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_ratio(ratio)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 50), nn.LayerNorm(50))


def test_infeasible_budget_names_the_minimum_and_the_largest_dense_tensors():
    with pytest.raises(BudgetError) as err:
        convert(_model(), budget="1kB")
    message = str(err.value)
    assert "minimum budget is" in message
    assert "0.bias" in message
    minimum = int(message.split("minimum budget is ")[1].split()[0])
    converted = convert(_model(), budget=minimum)
    assert converted.rps.size == 1


def test_budget_above_the_model_size_converts_losslessly_with_a_warning():
    model = _model()
    with pytest.warns(RPSWarning, match="ratio 1.0"):
        converted = convert(model, budget="10MB")
    assert report(converted).ratio == 1.0
    x = torch.randn(3, 100)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)


def test_budget_pays_for_dense_tensors_and_header_before_the_pool():
    converted = convert(_model(), budget="50kB")
    r = report(converted)
    assert r.dense_bytes == 4 * (200 + 50 + 50 + 50)
    assert 50_000 - 4 * r.pool_slots - r.dense_bytes < 3000  # the header bound is not wasteful
    assert r.total_bytes < 50_000


def test_exactly_one_of_ratio_and_budget():
    with pytest.raises(ValueError, match="exactly one"):
        convert(_model())
    with pytest.raises(ValueError, match="exactly one"):
        convert(_model(), 0.5, budget="1MB")


def test_a_budget_buying_more_slots_than_the_mapping_holds_gets_the_most_it_holds(monkeypatch):
    """A 7B model at 2 bits a weight would buy 5.4e9 int2 slots; a hashednet pool holds 2**32 - 1
    (here the limit is lowered to 3001 slots to show it on a small model)."""
    monkeypatch.setattr(HashedNet, "max_slots", 3001)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100))
    converted = convert(model, budget="8kB", bits=2, mapping="hashednet")  # 8 kB of int2 is ~25,000 slots
    assert report(converted).pool_slots == 3000
    with pytest.raises(ValueError, match="exceeds the hashednet mapping's limit of 3,001: use a ratio below 0.15 or mapping='randomfold'"):
        convert(model, ratio=0.5, mapping="hashednet")

