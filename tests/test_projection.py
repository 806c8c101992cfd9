"""Projection: the weight-space least-squares pool is optimal."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpsconvert.engine.mapping import MAPPINGS, get_mapping
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.projection import layer_scales, project


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=4),
    m=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    mapping=st.sampled_from(sorted(MAPPINGS)),
    data_seed=st.integers(0, 1000),
)
def test_least_squares_gradient_is_zero_at_the_projected_pool(sizes, m, seed, mapping, data_seed):
    g = torch.Generator().manual_seed(data_seed)
    weights = [torch.randn(n, generator=g, dtype=torch.float64) * (i + 1) for i, n in enumerate(sizes)]
    scales = layer_scales(weights)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    layout = [CompressedWeight(f"w{i}", tuple(w.shape), w.dtype, o, s) for i, (w, o, s) in enumerate(zip(weights, offsets, scales))]
    operator = PoolOperator(get_mapping(mapping), m, seed)
    theta = project(operator, list(zip(layout, weights))).requires_grad_()
    loss = sum((w - operator.generate(theta, layer)).square().sum() for layer, w in zip(layout, weights))
    (grad,) = torch.autograd.grad(loss, theta)
    assert grad.abs().max().item() < 1e-9 * max(1.0, loss.item())


def test_layer_scales_are_each_layers_size_relative_to_the_median_layer():
    # the median of the nonzero layers' RMS (8, 0.25, 0.5) is the unit: the largest layer, by size
    # and by magnitude, does not set it (an embedding at std 1 among linear layers near 0.05)
    weights = [torch.full((1000,), 8.0), torch.full((30,), 0.25), torch.full((3,), -0.5), torch.zeros(5)]
    assert layer_scales(weights) == pytest.approx([16.0, 0.5, 1.0, 1.0], rel=1e-12)
    assert layer_scales([w * 1.5 for w in weights], power_of_two=True) == [16.0, 0.5, 1.0, 1.0]
