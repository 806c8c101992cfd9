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


def test_layer_scales_are_each_layers_size_relative_to_the_rest():
    weights = [torch.full((10,), 8.0), torch.full((30,), 0.25), torch.zeros(5)]
    rms_all = ((64 * 10 + 0.0625 * 30) / 45) ** 0.5  # 3.78: layer 1 is 2.12x, layer 2 is 0.066x
    assert layer_scales(weights) == pytest.approx([8.0 / rms_all, 0.25 / rms_all, 1.0], rel=1e-12)
    assert layer_scales(weights, power_of_two=True) == [2.0, 0.0625, 1.0]
