"""Which rows of the layer the plan splits between two widths keep the wider one (plan.mixed)."""

import torch
from torch import nn

from rpsconvert import convert
from rpsconvert.engine.modules import find_pool


def test_the_layer_split_between_two_widths_keeps_its_first_rows_wider():
    # An embedding alone at 1/8 of its fp32 bytes (4 bits a weight, scales and header included):
    # int3 fits and int4 does not, so the plan stores some rows at int4 and the rest at int3.
    # Tokenizers number tokens by frequency (on docstring sentences 79 % of all-MiniLM-L6-v2's
    # tokens are among its first 5,000 of 30,522 ids), so the first rows must be the wider ones.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(2048, 64))
    original = model[0].weight.detach().clone()
    converted = convert(model, budget=original.numel() * 4 // 8, quiet=True)
    assert "int4" in str(find_pool(converted).storage) and "int3" in str(find_pool(converted).storage)
    with torch.no_grad():
        error = (converted[0].weight - original).square().sum(1) / original.square().sum(1)
    first, last = float(error[:256].mean()), float(error[-256:].mean())
    assert first < 0.02 < last, (first, last)  # int4 rounds about 4x more finely than int3
