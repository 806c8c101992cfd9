"""benchmarks/peers.py's own arithmetic, without the peer libraries: the matrices they are given and
the grid recovery rounds onto (the libraries themselves are benchmark dependencies, not the tests')."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import peers  # noqa: E402


def test_a_weight_goes_to_a_matrix_and_back():
    linear, depthwise = torch.randn(8, 256), torch.randn(32, 1, 3, 3)
    assert peers.as_matrix(linear).shape == (8, 256)  # rows kept where their length is a multiple of ROW
    flat = peers.as_matrix(depthwise)
    assert flat.shape == (3, peers.ROW) and bool((flat.flatten()[288:] == 0).all())  # 288 elements, zero-padded
    for weight in (linear, depthwise):
        assert torch.equal(peers.from_matrix(peers.as_matrix(weight), weight), weight)


def test_on_grid_rounds_forward_and_passes_gradients_straight_through():
    grid = peers.Grid(scale=torch.full((4, 1), 0.5), zero=torch.full((4, 1), 1.0), low=0, high=3, group=32)
    weight = torch.linspace(-2, 2, 128).view(1, 128).requires_grad_()
    rounded = peers._OnGrid(grid)(weight)
    assert set(rounded.detach().unique().tolist()) == {-0.5, 0.0, 0.5, 1.0}  # (q - 1) * 0.5, q in 0..3
    rounded.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))
