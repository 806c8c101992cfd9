"""Training a converted model with Adam at the dense model's learning rate.

Adam moves every pool slot by about lr per step, so a generated weight moves by about its layer's
scale times lr, where a dense weight moves by lr: the scales convert() chooses are the speed of
training (engine/projection.layer_scales puts the median layer's at 1). The model here has the
magnitudes of a transformer LM: an nn.Embedding at PyTorch's std 1 and nn.Linear layers near 0.1,
the case where a unit taken from all the weights (the embedding's) made the linear layers learn
five times more slowly than in the dense model.
"""

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rpsconvert import convert
from rpsconvert.engine.modules import find_pool
from test_grad_scaling import model_with_pool_std, training_curve

LINEARS = ("up.weight", "down.weight", "head.weight")


class TinyLM(nn.Module):
    """Token embedding (std 1), a residual GELU MLP and an output layer (Linear init, std 0.07-0.1)."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(64, 32)
        self.up, self.down, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        return self.head(h + self.down(F.gelu(self.up(h))))


def fresh(ratio: float | None) -> nn.Module:
    """The model right after construction, converted at `ratio` (dense with None)."""
    torch.manual_seed(0)
    return TinyLM() if ratio is None else convert(TinyLM(), ratio=ratio)


def lookup_loss(model: nn.Module, steps: int, lr: float) -> float:
    """Adam on a token -> token lookup (a fixed random permutation); the mean loss of the last 10 steps."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randperm(64, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = torch.randint(64, (128,), generator=gen)
        loss = F.cross_entropy(model(x), target[x])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def test_one_adam_step_moves_the_linear_layers_as_far_as_in_the_dense_model():
    lr, x = 1e-3, torch.arange(64)
    moves = {}
    for ratio in (None, 1 / 4):
        model = fresh(ratio)
        weight = model.get_parameter if ratio is None else find_pool(model).weight
        before = {name: weight(name).detach().clone() for name in LINEARS}
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        F.cross_entropy(model(x), x).backward()
        optimizer.step()
        moves[ratio] = {name: float((weight(name) - before[name]).detach().abs().mean()) / lr for name in LINEARS}
    # Adam's first step is lr * sign(gradient): every dense weight moves by lr, every generated one
    # by its scale times lr; the scales are 1 (up, head: the median RMS) and 0.7 (down: fan-in 64).
    assert moves[None] == pytest.approx(dict.fromkeys(LINEARS, 1.0), rel=1e-3)
    assert moves[1 / 4] == pytest.approx({"up.weight": 1.0, "down.weight": 0.71, "head.weight": 1.0}, rel=0.03)


def test_from_scratch_it_learns_at_the_dense_learning_rate():
    dense = lookup_loss(fresh(None), steps=100, lr=3e-3)
    half = lookup_loss(fresh(1 / 2), steps=100, lr=3e-3)
    # from ln 64 = 4.16, both learn the lookup (measured 0.012 and 0.007); with the scales of
    # the RMS of all weights (the embedding's), the linear ones were 0.14-0.20 and RPS stopped at 2.2
    assert dense < 0.1
    assert half < 0.1


def adam(model: nn.Module, pool_lr: float) -> tuple[nn.Module, Callable]:
    """`model` and an Adam maker for training_curve: the pool at `pool_lr`, the biases at 1e-3."""
    pool = find_pool(model).pool
    rest = [p for p in model.parameters() if p is not pool]
    return model, lambda _: torch.optim.Adam([{"params": [pool], "lr": pool_lr}, {"params": rest}], lr=1e-3)


def test_under_adam_the_pool_init_std_matters_only_through_scale_times_lr():
    """The same network from pools at std 0.01, 0.1 and 1 (scales 10, 1 and 0.1 times convert's):
    Adam moves a weight by scale * lr, so with lr times the std the curves coincide, and the
    STABLE-RPS gradient scaling (a fixed factor per slot, which Adam divides out) changes nothing.
    convert() fixes that product: the median layer's scale is 1, so lr means what it means dense."""
    curves = [training_curve(*adam(model_with_pool_std(std, True), pool_lr=1e-2 * std)) for std in (0.01, 0.1, 1.0)]
    unscaled = training_curve(*adam(model_with_pool_std(0.1, False), pool_lr=1e-3))
    assert curves[1][-1] < 0.8 * curves[1][0]  # it does learn (2.40 to 1.80 in 25 steps)
    for curve in (*curves, unscaled):
        assert curve == pytest.approx(curves[1], rel=1e-3)
