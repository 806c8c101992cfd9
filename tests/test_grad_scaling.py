"""STABLE-RPS gradient scaling: training does not depend on the pool's init scale.

ROAST's failure: with W = lambda * g * theta and lambda = (wanted weight std) / (pool init std), a
plain gradient step moves the weights by lr * lambda^2 * (elements per slot) times their gradient,
so the same network trains, stalls or diverges depending on an arbitrary init constant. Dividing the
pool's gradient by (sum of lambdas per slot)^2 / count makes every step the same in weight space.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from digits import digits_data, mlp
from rpsconvert import convert
from rpsconvert.engine.modules import find_pool
from rpsconvert.engine.pool import slot_grad_scale

STDS = (1e-3, 1e-1, 10.0)


def model_with_pool_std(std: float, grad_scaling: bool):
    """The same network (identical generated weights) from a pool initialized at `std`."""
    torch.manual_seed(0)
    model = convert(mlp(), ratio=1 / 4)
    pool = find_pool(model)
    z = torch.randn(pool.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pool.pool.copy_(z * std)
    pool.weights = {name: dataclasses.replace(w, scale=w.scale * 0.1 / std) for name, w in pool.weights.items()}
    pool.grad_scaling = grad_scaling
    return model


def training_curve(model, optimizer_class, steps=25, **options) -> list[float]:
    """A plain user training loop: cross-entropy on digits, no rpsconvert code involved."""
    x, y = digits_data()["train"]
    optimizer = optimizer_class(model.parameters(), **options)
    curve = []
    for step in range(steps):
        i = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def test_the_generated_weights_do_not_depend_on_the_pool_std():
    weights = [model_with_pool_std(std, True)[0].weight for std in STDS]
    for w in weights[1:]:
        torch.testing.assert_close(w, weights[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "optimizer_class, options",
    [(torch.optim.SGD, {"lr": 0.5}), (torch.optim.SGD, {"lr": 0.2, "momentum": 0.9})],
    ids=["sgd", "sgd-momentum"],
)
def test_with_scaling_training_curves_coincide_whatever_the_pool_init_std(optimizer_class, options):
    curves = [training_curve(model_with_pool_std(std, True), optimizer_class, **options) for std in STDS]
    assert curves[0][-1] < 0.7 * curves[0][0]  # it does learn
    for curve in curves[1:]:
        assert curve == pytest.approx(curves[0], rel=1e-3)


def test_without_scaling_the_pool_init_std_decides_between_divergence_and_stalling():
    curves = {std: training_curve(model_with_pool_std(std, False), torch.optim.SGD, lr=0.5) for std in STDS}
    reference = training_curve(model_with_pool_std(0.1, True), torch.optim.SGD, lr=0.5)
    tiny, large = curves[1e-3], curves[10.0]
    assert not all(v < 1e3 for v in tiny)  # lambda = 100 x the weight std: it blows up (nan) at once
    assert large[-1] > 0.9 * large[0]  # lambda = 0.01 x: it barely moves (0.95 x; the scaled run: 0.63 x)
    assert reference[-1] < 0.7 * reference[0]


def test_the_hook_divides_the_pool_gradient_by_the_slot_scale():
    x, y = digits_data()["train"]
    grads = {}
    for scaling in (False, True):
        model = model_with_pool_std(0.1, scaling)
        F.cross_entropy(model(x[:64]), y[:64]).backward()
        grads[scaling] = find_pool(model).pool.grad.clone()
    scale = slot_grad_scale(find_pool(model))
    torch.testing.assert_close(grads[True], grads[False] / scale)
    # (sum of lambdas in a slot)^2 / count = count * mean(lambda)^2: about 4 x lambda^2 at ratio 1/4
    assert 2.0 < float((scale / (0.1 / 0.1) ** 2).median()) < 6.0
