"""Data-aware projection: fit the pool to each layer's outputs on calibration data, not its weights.

The weight-space projection spends the pool's few values equally on every weight. A layer only
needs to be right on the inputs it actually sees, so for each compressed Linear or Conv layer l, in
forward order, this minimizes its relative output error

    E_l(theta) = ||X W_l(theta)^T - Y||^2 / ||Y||^2,    Y = X_orig W_orig^T,

where X are the layer's inputs in the *converted* model (so a layer corrects what earlier layers
got wrong) and Y the original layer's outputs on the original activations. For a conv layer, X
holds the input patches (im2col) and each group is its own block.

Shared slots. A slot of the pool also carries elements of other layers, so "solving layer l" cannot
mean fitting l alone: that would undo the layers solved before it and wreck those still to come.
Layer l's step is therefore, over the whole pool,

    min_delta  E_l(theta + delta)
               + proximal * sum_{k solvable, k != l} ||W_k(delta)||^2 / ||W_k,orig||^2
               + sum_{k never solved} ||W_k(theta + delta) - W_k,orig||^2 / ||W_k,orig||^2
               + damping * (mean eigenvalue of l's data term) * ||W_l(delta)||^2.

Layers with a data term of their own (solvable) are kept near their current values, weakly: a
later solve may move them, and the layers after them correct for it. Layers that will never be
solved (embeddings, tied or functional weights) are anchored to their original weights at full
weight, so they cannot drift a little with every solve. The damping keeps directions that the
calibration data never excites where they were. Each W_k touches each slot through one element,
so every penalty has a diagonal Hessian: a few vectors of the pool's size in all.

`proximal=0.01` is measured, not derived. Charging other layers' relative weight change like an
output error (proximal=1) freezes the slots: a digits CNN stays at chance at ratio 1/8. A layer's
inputs span few directions, so most weight changes cost it little output error, and the layers
solved later correct what a solve did to the layers before them. From 1 down to 1e-4, the CNN's
held-out accuracy at ratio 1/8 went 10 %, 91 %, 97 %, 98 %, 98 %; at ratio 1/32, where sharing is
heavier, 0.01 was best (88 %, against 81 % at 3e-3 and 65 % at 1e-4). Anchoring the never-solved
layers took a small BERT's held-out output error at ratio 1/4 from 0.94 (worse than the 0.77 of
weight-space projection: its embeddings drifted) to 0.37. Variants tried and dropped: anchoring
the solvable layers too (to their solved values: the CNN at 1/32 fell to 30-40 %), protecting
solved layers more than those still to solve, and targets computed from the converted model's
own activations (no compensation of upstream errors).

Memory is bounded whatever the amount of calibration data: batches are streamed, and a layer keeps
only its statistics H = X^T X (d x d per group, d = in_features or in_channels * kernel size) and
B = Y^T X (the weight's shape), so each conjugate-gradient step costs one weight-sized matmul,
independent of the number of samples. Forward passes stop at the layer being solved.

Layers solved this way: Linear, Conv1d and Conv2d weights that are not tied to another tensor.
Every other compressed weight (embeddings, tied weights, weights used through functional calls)
keeps the weight-space solution, protected by the proximal term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from rpsconvert.quality.batches import Batch, device_of, eval_mode, run, to_device
from rpsconvert.engine.kinds import grouped, kind_of
from rpsconvert.engine.modules import find_pool, is_converted
from rpsconvert.engine.operator import CompressedWeight
from rpsconvert.engine.pool import RPSPool

ROWS = 1 << 22  # patch matrix elements processed at once (16 MB in float32)


@dataclass(frozen=True)
class LayerFit:
    """Relative output error of one layer on the calibration data, before and after its solve."""

    name: str
    before: float
    after: float
    iterations: int


class _Stop(Exception):
    """Raised by a hook once the layer being solved has seen its input: the rest is not needed."""


def calibrate(
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[Batch],
    *,
    inputs: Callable[[Batch], Batch] | None = None,
    proximal: float = 0.01,
    damping: float = 0.01,
    iterations: int = 50,
    tolerance: float = 1e-4,
    quiet: bool = False,
) -> list[LayerFit]:
    """Refit the pool of the converted `model` so each layer reproduces `reference` (the original).

    `batches` are example inputs (a list: it is iterated once per layer); `inputs` picks the model's
    input out of a batch that also holds labels. Returns one LayerFit per layer solved, in forward
    order. The pool is updated in place.
    """
    if is_converted(reference):
        raise ValueError("the reference must be the original model (convert without inplace=True to calibrate)")
    pool = find_pool(model)
    batches = [inputs(b) if inputs else b for b in batches]
    if not batches:
        raise ValueError("calibration needs at least one batch of example inputs")
    device = device_of(model)
    batches = [to_device(b, device) for b in batches]
    originals = dict(reference.named_parameters(remove_duplicate=False))
    layers = _forward_order(model, pool, batches[0])
    solvable = {name for name, _ in layers}
    norms = {name: _squared_norm(originals[name]) for name in pool.weights}
    shared = {name: proximal / norms[name] for name in solvable}
    fixed = {name: 1.0 / norms[name] for name in pool.weights.keys() - solvable}
    operator = pool.operator
    proximal_diagonal = _penalty_diagonal(pool, shared)
    anchor_diagonal = _penalty_diagonal(pool, fixed)
    anchor_linear = torch.zeros_like(anchor_diagonal)
    for n in fixed:
        operator.adjoint(pool.weights[n], fixed[n] * originals[n].detach().double(), out=anchor_linear)
    fits = []
    progress = Progress(
        TextColumn("[bold]calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[layer]}"), disable=quiet, console=Console(stderr=True),
    )
    with eval_mode(model, reference), torch.no_grad(), progress:
        task = progress.add_task("calibrate", total=len(layers), layer="")
        for name, calls in layers:
            weight = pool.weights[name]
            progress.update(task, layer=name)
            stats = _statistics(model, reference, name, calls, batches, originals[name])
            others = proximal_diagonal - shared[name] * operator.diagonal([weight], device)  # kept near where they are now
            theta = pool.pool.detach().double()
            fits.append(
                _solve(
                    pool, weight, stats, anchor_diagonal + others, anchor_linear + others * theta, damping, iterations, tolerance
                )
            )
            progress.advance(task)
    return fits


def _module_name(weight_name: str) -> str:
    return weight_name.rpartition(".")[0]


def _solvable(model: nn.Module, weight: CompressedWeight) -> bool:
    """A weight calibration can solve from its layer's inputs: the `weight` of a registered layer
    kind with a `patches` function, not tied to another tensor."""
    module_name, _, attr = weight.name.rpartition(".")
    if weight.aliases or not module_name or attr != "weight":
        return False
    kind = kind_of(model.get_submodule(module_name))
    return kind is not None and kind.patches is not None


def _forward_order(model: nn.Module, pool: RPSPool, batch: Batch) -> list[tuple[str, int]]:
    """(weight name, calls per forward) of the solvable layers, in the order a forward first calls them."""
    solvable = {_module_name(w.name): w.name for w in pool.weights.values() if _solvable(model, w)}
    calls: dict[str, int] = {}

    def count(module_name):
        def hook(module, args):
            calls[module_name] = calls.get(module_name, 0) + 1

        return hook

    handles = [model.get_submodule(m).register_forward_pre_hook(count(m)) for m in solvable]
    try:
        with eval_mode(model), torch.no_grad():
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return [(solvable[m], n) for m, n in calls.items()]  # dicts keep insertion (first call) order


def _capture(model: nn.Module, module_name: str, calls: int, batch: Batch) -> list[torch.Tensor]:
    """The inputs of one module during a forward of `batch`, stopping the forward after its last call."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0])
        if len(seen) == calls:
            raise _Stop

    handle = model.get_submodule(module_name).register_forward_pre_hook(hook)
    try:
        run(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


@dataclass
class _Stats:
    H: torch.Tensor  # (G, d, d): sum of X^T X
    B: torch.Tensor  # (G, o, d): sum of Y^T X
    yy: float  # ||Y||^2


def _statistics(model, reference, name, calls, batches, original) -> _Stats:
    module_name = _module_name(name)
    module = model.get_submodule(module_name)
    groups = getattr(module, "groups", 1)
    patches = kind_of(module).patches
    target = grouped(original.detach(), groups).double()
    per_sample = math.prod(getattr(module, "kernel_size", (1,)))  # patch elements per input element, at most
    H = B = None
    yy = 0.0
    for batch in batches:
        ours = _capture(model, module_name, calls, batch)
        theirs = _capture(reference, module_name, calls, batch)
        for x, x_ref in zip(ours, theirs):
            step = max(1, ROWS // max(x[0].numel() * per_sample, 1))
            for xs, xr in zip(x.split(step), x_ref.split(step)):
                p, p_ref = patches(module, xs).double(), patches(module, xr).double()
                y = torch.einsum("ngd,god->ngo", p_ref, target)
                h, b = torch.einsum("ngd,nge->gde", p, p), torch.einsum("ngo,ngd->god", y, p)
                H, B = (h, b) if H is None else (H + h, B + b)
                yy += float(y.square().sum())
    if H is None:
        raise ValueError(f"layer {module_name} was not called on the calibration data")
    return _Stats(H, B, yy)


def _squared_norm(t: torch.Tensor) -> float:
    return max(float(t.detach().double().square().sum()), 1e-30)


def _penalty_diagonal(pool: RPSPool, factors: dict[str, float]) -> torch.Tensor:
    """sum_k factors[k] * diag(W_k^T W_k): the Hessian of the penalties, one vector of the pool's size."""
    weights = [pool.weights[name] for name in factors]
    return pool.operator.counts(weights, pool.pool.device, lambda weight: factors[weight.name] * weight.scale**2)


def _solve(pool, weight, stats, anchor_diagonal, anchor_linear, damping, iterations, tolerance) -> LayerFit:
    """Preconditioned conjugate gradients on layer l's problem (see the module docstring).

    The other layers' anchors enter as their diagonal Hessian and linear term, without layer l's own.
    """
    theta = pool.pool.detach()
    dtype = torch.float32
    groups = stats.H.shape[0]
    H = (stats.H / stats.yy).to(dtype)
    B = (stats.B / stats.yy).to(dtype)
    ridge = damping * float(torch.diagonal(H, dim1=1, dim2=2).mean())
    ones = torch.ones(pool.size, dtype=dtype, device=theta.device)
    A = pool.operator
    signs = A.generate(ones, weight)  # scale * sign of every element: A^T (signs * c) sums scale^2 * c per slot
    anchor_diagonal = anchor_diagonal.clamp(min=0)
    diagonal = (anchor_diagonal + ridge * A.diagonal([weight], theta.device)).to(dtype)

    def by_group(w):
        return grouped(w, groups)

    def data_term(w):  # gradient of the data term / 2, as a weight
        return torch.bmm(by_group(w), H).reshape(weight.shape)

    def normal(v):  # the normal operator of layer l's problem
        return A.adjoint(weight, data_term(A.generate(v, weight))) + diagonal * v

    def error(w):  # relative output error on the calibration data
        g = by_group(w)
        value = float((torch.bmm(g, H) * g).sum() - 2 * (g * B).sum()) + 1.0
        return max(value, 0.0) ** 0.5

    w0 = A.generate(theta.to(dtype), weight)
    before = error(w0)
    rhs = A.adjoint(weight, B.reshape(weight.shape) - data_term(w0)) + (anchor_linear - anchor_diagonal * theta).to(dtype)
    h_diag = torch.diagonal(H, dim1=1, dim2=2)  # (G, d): the data term's diagonal, per weight element
    precondition = A.adjoint(weight, signs * h_diag.unsqueeze(1).expand(by_group(w0).shape).reshape(weight.shape))
    precondition = 1.0 / (precondition + diagonal).clamp(min=1e-30)

    delta = torch.zeros_like(theta, dtype=dtype)
    r = rhs
    z = precondition * r
    p = z.clone()
    rz = float(r @ z)
    # Converged when the residual is small against the whole problem's right-hand side (the one of
    # an empty pool), not against the start: at ratio 1.0 the start is already exact, and rounding
    # noise must not be "solved".
    whole = A.adjoint(weight, B.reshape(weight.shape))
    scale = float(whole @ (precondition * whole))
    done = 0
    for done in range(1, iterations + 1):
        if rz <= tolerance**2 * scale:
            done -= 1
            break
        q = normal(p)
        alpha = rz / float(p @ q)
        delta += alpha * p
        r -= alpha * q
        z = precondition * r
        rz, previous = float(r @ z), rz
        p = z + (rz / previous) * p
    theta.add_(delta.to(theta.dtype))
    return LayerFit(weight.name, before, error(A.generate(theta.to(dtype), weight)), done)
