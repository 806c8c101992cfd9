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

Cost linear in depth. Re-running the model's prefix for every layer costs depth^2 block forwards
(a 6-layer pretrained BERT took minutes). Forwards run on a dense copy of the converted model whose
weights are refreshed from the pool only when a solve changed it, and a model built as a chain of
blocks (the children of the ModuleList holding the most solvable layers, each called once with its
predecessor's output and otherwise the same arguments; see `_find_blocks`) is calibrated the way
GPTQ's sequential mode does it: the arguments entering the first block are captured once per batch
for both models, each layer of the current block is fed from them, and once the block is solved
they are pushed through it. Each block then runs (layers in it + 1) times per batch and model.
The price is memory: the arguments entering the current block, for every batch and both models
(for a transformer, 2 x samples x tokens x width floats, plus the masks), and the dense copy (the
original model's size). What the cache does not see is the small drift that a later solve gives
the blocks already passed; the full-forward path sees it. On the tests' models the outputs came
out the same to 0.3 % of the error (docs/recovery.md).
Layers before and after the chain, and models without one, still get a full forward per layer.

Several conversions of one model on the same batches (a sweep of budgets) share the original's
side: its trace and every layer's outputs Y depend on neither the pool nor the converted model, so
inside `reusing_reference()` they are computed by the first conversion and read by the others (see
`ReferenceCache`; the pools are bit for bit the same).

Where a layer's slots are its own (a lossless RandomFold pool, the plan's choice down to about
1/16 of the fp32 bytes), no penalty reaches them, and its problem is one linear solve: W = (B + W_0
D)(H + D)^-1 with D the damping, taken through the factor GPTQ's rounding needs anyway
(quality/rounding.py `solve_alone`). Fifty conjugate-gradient steps had stopped short of it: at
1/16 of all-MiniLM-L6-v2's bytes the held-out embedding cosine is 0.68 with the exact minimum and
was 0.50. A quantized pool is then rounded onto its grid: a layer with slots of its own right after
its solve, with GPTQ's error feedback on the same H, so the layers after it see, and correct for,
its rounded weights; shared slots are rounded to nearest. Calibration from a model's files
(quality/streaming_calibration.py) solves every layer so, a block at a time.

Layers solved this way: Linear, Conv1d and Conv2d weights that are not tied to another tensor.
Every other compressed weight (embeddings, tied weights, weights used through functional calls)
keeps the weight-space solution, protected by the proximal term.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from rpsconvert.quality.batches import Batch, device_of, eval_mode, run, to_device
from rpsconvert.engine.kinds import grouped, kind_of
from rpsconvert.engine.modules import densify, find_pool, is_converted
from rpsconvert.engine.operator import CompressedWeight
from rpsconvert.engine.pool import RPSPool
from rpsconvert.quality.blocks import repeated_blocks
from rpsconvert.quality.recovery import distillation_loss
from rpsconvert.engine.mapping import chunks
from rpsconvert.quality.rounding import feedback_factor, output_error, round_layer, sole_slots, solve_alone

ROWS = 1 << 22  # patch matrix elements processed at once (16 MB in float32)
# The pool-sized state of a calibration, in bytes a slot: the pool in float32 and the copy the
# held-out check may restore (8), the three penalty vectors in float64 (24), the solver's buffers
# (three float32, one float64: 20) and which slots are one element's (1).
SLOT_BYTES = 53


@dataclass(frozen=True)
class LayerFit:
    """Relative output error of one layer on the calibration data, before and after its solve."""

    name: str
    before: float
    after: float
    iterations: int
    kept: bool = True  # whether the model keeps this solve: False where the held-out check undid its block's


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
    holdout: float = 0.2,
    quiet: bool = False,
) -> list[LayerFit]:
    """Refit the pool of the converted `model` so each layer reproduces `reference` (the original).

    `batches` are example inputs (a list: it is iterated once per layer); `inputs` picks the model's
    input out of a batch that also holds labels. Returns one LayerFit per layer solved, in forward
    order. The pool is updated in place: solved as float values, then packed back into its stored
    form. Inside `reusing_reference()`, calibrations of the same reference on the same batches run
    the reference once (see `ReferenceCache`).

    Calibration never leaves the model worse than it came: the last `holdout` of the batches (one
    at least, from two batches on) is not solved on but held out, and the calibration is kept only
    if it lowers the relative error of the outputs against `reference`'s on them; otherwise the pool goes back,
    exactly, to the values it came with. At 1/16 of a pretrained all-MiniLM-L6-v2's bytes,
    calibrating on 16 batches had taken its held-out embedding cosine from 0.085 to -0.023 (issue
    25). Whole, not block by block: a block's solve can raise the loss until the blocks after it
    are solved from its outcome (measured on a random residual stack: judging each block as it
    was solved undid half of them and ended with a held-out loss 25 % above keeping every solve).
    `LayerFit.kept` and `report(model).notes` say what was kept, with both losses.
    """
    if is_converted(reference):
        raise ValueError("the reference must be the original model (convert without inplace=True to calibrate)")
    pool = find_pool(model)
    pool.unpack()
    batches = [inputs(b) if inputs else b for b in batches]
    if not batches:
        raise ValueError("calibration needs at least one batch of example inputs")
    device = device_of(model)
    batches = [to_device(b, device) for b in batches]
    cache = _ACTIVE.get()
    if cache is not None:
        cache.bind(reference, batches)
    held = min(max(round(holdout * len(batches)), 1), len(batches) - 1) if holdout > 0 else 0
    batches, checks = batches[: len(batches) - held], batches[len(batches) - held :]
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
    sole = sole_slots(pool)  # slots whose value, and rounding, is one layer's alone
    fits = []
    progress = Progress(
        TextColumn("[bold]calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[layer]}"), disable=quiet, console=Console(stderr=True),
    )
    with eval_mode(model, reference), torch.no_grad(), progress:
        # a slot that only unsolved layers use sees their anchors alone, whose minimum is one
        # division: taken once here; a slot they share with solved layers is pulled back toward
        # it by every solve that does not touch it (`_Penalties.linked`); every other slot moves
        # only when its own layer is solved, so a solve costs its layer's size, not the pool's
        theta = pool.pool.detach()
        held_out = _HeldOut(model, reference, checks, cache) if checks else None
        received, before = (theta.clone(), held_out.loss()) if held_out else (None, None)
        linked = ((proximal_diagonal > 0) & (anchor_diagonal > 0)).nonzero().squeeze(1)
        penalties = _Penalties(anchor_diagonal, anchor_linear, proximal_diagonal, linked)
        alone = ((proximal_diagonal == 0) & (anchor_diagonal > 0)).nonzero().squeeze(1)
        theta.index_add_(0, alone, penalties.minimum_step(alone, theta).to(theta.dtype))
        work = _Workspace(pool.size, device)
        task = progress.add_task("calibrate", total=len(layers), layer="")
        for name, stats in _layer_statistics(model, reference, pool, layers, batches, originals, cache):
            weight = pool.weights[name]
            progress.update(task, layer=name)
            pieces = list(chunks(pool.mapping, weight.offset, weight.numel, pool.size, pool.seed, device))
            slots = torch.cat([piece[2] for piece in pieces])
            if bool(sole[slots].all()):  # no other weight shares its slots: the exact minimum, then GPTQ's rounding
                signs = torch.cat([piece[3] for piece in pieces]).double()
                fit = _solve_alone(pool, weight, stats, damping, sole, slots, signs)
                changed = slots
            else:
                fit, changed = _solve(pool, weight, stats, penalties, shared[name], work, damping, iterations, tolerance)
            pool.resnap(changed)
            fits.append(fit)
            progress.advance(task)
        if held_out is not None:
            after = held_out.loss()
            if after >= before:  # the calibration is undone: the pool goes back to the values it came with
                theta.copy_(received)
                fits = [dataclasses.replace(fit, kept=False) for fit in fits]
            pool.info.setdefault("notes", []).append(
                f"calibration {'kept' if after < before else 'undone'}: held-out relative output error {before:.4g} without it, {after:.4g} with it"
            )
    pool.pack()
    return fits


class _HeldOut:
    """The relative squared error of the converted model's outputs against the original's on
    held-out batches, which a calibration must lower to be kept: what calibration itself lowers
    layer by layer, and faithful for any output. (Not recovery's "auto" loss: it reads an unnamed
    (batch, features) output as logits, and the KL of a sentence embedding's near-uniform
    softmax fell 18x while calibration took all-MiniLM-L6-v2's embedding cosine at 1/8 from 0.941
    to 0.929.) The original's outputs are computed once (by the first calibration of a sweep,
    through its `cache`)."""

    def __init__(self, model: nn.Module, reference: nn.Module, batches: list[Batch], cache: ReferenceCache | None):
        self.model, self.batches = model, batches
        key = ("held-out outputs", len(batches))
        if cache is not None and cache.holds([key]):
            self.targets = cache.targets(key)
        else:
            computed = (run(reference, batch) for batch in batches)
            self.targets = list(cache.keep(key, computed, len(batches)) if cache else computed)

    def loss(self) -> float:
        return sum(float(distillation_loss(run(self.model, b), t, "mse")) for b, t in zip(self.batches, self.targets)) / len(self.batches)


class ReferenceCache:
    """The original model's side of calibration, kept for more conversions of it on the same batches.

    What `calibrate` needs of the original depends on neither the pool nor the converted model:
    where a forward calls each layer (the chain of blocks, if any), and every solved layer's outputs
    Y on every batch, computed from the original's own activations. A sweep converts one model at
    several budgets on the same batches: inside `reusing_reference()` the first conversion keeps
    them here and the others read them instead of running the original again. They are the tensors
    the original would compute again, so every pool comes out bit for bit as without the cache.

    The outputs are kept while they fit in `limit_bytes` (float32, one value per sample, position
    and output of every solved layer); past it, what was kept is dropped and each conversion
    computes its own, as without the cache.
    """

    def __init__(self, limit_bytes: int = 1 << 30):
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self.keeping = True
        self._owner: tuple = (None, [], [])  # the original, the tensors it and the batches hold, their versions
        self._traces: dict[tuple, Any] = {}
        self._targets: dict[tuple, list[Targets]] = {}

    def bind(self, reference: nn.Module, batches: list[Batch]) -> None:
        """Serve `reference` on `batches`. What was kept for another original, other batches, or
        ones changed in place since (a tensor's version counter moved) is dropped."""
        tensors = [*reference.parameters(), *reference.buffers(), *_tensors(batches)]
        versions = [t._version for t in tensors]
        known, known_tensors, known_versions = self._owner
        if reference is known and len(tensors) == len(known_tensors) and all(a is b for a, b in zip(tensors, known_tensors)) and versions == known_versions:
            return
        self._owner = reference, tensors, versions
        self._traces, self._targets, self.bytes, self.keeping = {}, {}, 0, True

    def holds(self, keys: list[tuple]) -> bool:
        """Whether the outputs of every layer named in `keys` are kept."""
        return all(key in self._targets for key in keys)

    def targets(self, key: tuple) -> list[Targets]:
        return self._targets[key]

    def remember(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """A small value of the original (its trace through the blocks), computed once."""
        if key not in self._traces:
            self._traces[key] = compute()
        return self._traces[key]

    def keep(self, key: tuple, computed: Iterator[Targets], count: int) -> Iterator[Targets]:
        """`computed` passed through, each item kept; the layer's entry exists once all `count`
        batches are in, so a pass cut short leaves nothing half kept."""
        if key in self._targets or not self.keeping:
            yield from computed
            return
        kept: list[Targets] = []
        for item in computed:
            if self.keeping:
                kept.append(item)
                self.bytes += sum(y.numel() * y.element_size() for y in _tensors(item))
                if self.bytes > self.limit_bytes:  # too large to keep: every conversion computes its own
                    self._targets, self.keeping, kept = {}, False, []
                elif len(kept) == count:
                    self._targets[key] = kept
            yield item


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a batch (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _tensors(item)] if isinstance(value, (tuple, list)) else []


_ACTIVE: ContextVar[ReferenceCache | None] = ContextVar("rpsconvert_reference_cache", default=None)


@contextmanager
def reusing_reference(limit_bytes: int = 1 << 30) -> Iterator[ReferenceCache]:
    """Within it, calibrations of one original on the same batches (`calibrate`, or `convert` with
    `calibration=`) compute the original's side once: for a sweep of budgets or ratios.

    The pools are the same as without it. The original and the batches must stay as they are
    inside (a change in place is noticed through the tensors' version counters, and recomputed).
    """
    token = _ACTIVE.set(ReferenceCache(limit_bytes))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


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


Call = tuple[tuple, dict]  # the positional and keyword arguments of one call of a module
Feed = Callable[[], Any]  # runs a forward (of a whole model, or of one block on cached arguments)


def _capture(model: nn.Module, module_name: str, calls: int, feed: Feed) -> list[Call]:
    """The arguments of one module's first `calls` calls during `feed()`, which stops there."""
    seen: list[Call] = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))
        if len(seen) == calls:
            raise _Stop

    handle = model.get_submodule(module_name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        feed()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


@dataclass(frozen=True)
class _Blocks:
    """The solvable layers split around a chain of repeated blocks (the children of a ModuleList)."""

    names: list[str]  # the blocks' module names, in call order
    before: list[tuple[str, int]]  # layers called before the first block
    inside: list[list[tuple[str, int]]]  # each block's layers
    after: list[tuple[str, int]]  # layers called after the last block


def _find_blocks(
    ours: nn.Module, reference: nn.Module, layers: list[tuple[str, int]], batch: Batch, cache: ReferenceCache | None
) -> _Blocks | None:
    """The model's chain of blocks, if calibration may move through it block by block.

    Candidates are the `repeated_blocks` holding the most solvable layers (a transformer's layers,
    a CNN's stages such as MobileNetV2's features). One forward
    of each model on `batch` must show a chain: every block called once, in order; block i+1 called
    with block i's output (the very tensor, or the first of a tuple) and otherwise with the very
    arguments of block 0, all tensors or plain values (an object such as a key-value cache may
    change when a block runs again); every layer called only before the first block, inside one
    block, or after the last. Otherwise (None) every layer gets full forwards. The reference's trace
    is taken from `cache` when it holds it.
    """
    names = repeated_blocks(ours, [name for name, _ in layers])
    if not names:
        return None
    segment = _block_trace(ours, names, layers, batch)
    if segment is None:
        return None
    trace = partial(_block_trace, reference, names, layers, batch)
    if segment != (cache.remember(("trace", tuple(names), tuple(layers)), trace) if cache else trace()):
        return None
    return _Blocks(
        names,
        [layer for layer in layers if segment[layer[0]] == -1],
        [[layer for layer in layers if segment[layer[0]] == i] for i in range(len(names))],
        [layer for layer in layers if segment[layer[0]] == len(names)],
    )


def _block_trace(model: nn.Module, names: list[str], layers: list[tuple[str, int]], batch: Batch) -> dict[str, int] | None:
    """layer -> where one forward calls it (-1 before the first block, i inside block i, len(names)
    after the last), or None if the blocks do not form a chain (see `_find_blocks`)."""
    calls: list[Call] = []
    outputs: list[Any] = []
    entered: list[int] = []
    seen: dict[str, set[int]] = {name: set() for name, _ in layers}
    active: list[int] = []  # the block running now, if any

    def enter(i):
        def hook(module, args, kwargs):
            calls.append((args, kwargs))
            entered.append(i)
            active.append(i)

        return hook

    def leave(module, args, output):
        outputs.append(output)
        active.pop()

    def called(name):
        return lambda module, args: seen[name].add(active[-1] if active else (len(names) if calls else -1))

    handles = []
    for i, name in enumerate(names):
        handles += [
            model.get_submodule(name).register_forward_pre_hook(enter(i), with_kwargs=True),
            model.get_submodule(name).register_forward_hook(leave),
        ]
    handles += [model.get_submodule(_module_name(name)).register_forward_pre_hook(called(name)) for name, _ in layers]
    try:
        run(model, batch)
    finally:
        for h in handles:
            h.remove()
    if entered != list(range(len(names))) or any(len(where) != 1 for where in seen.values()):
        return None
    rest, kwargs = calls[0][0][1:], calls[0][1]
    for (args, keywords), previous in zip(calls[1:], outputs):
        if args[0] is not _carried(previous) or len(args) != len(calls[0][0]) or keywords.keys() != kwargs.keys():
            return None
        if not all(_same(a, b) for a, b in zip([*args[1:], *keywords.values()], [*rest, *(kwargs[k] for k in keywords)])):
            return None
    return {name: where.pop() for name, where in seen.items()}


def _carried(output: Any) -> Any:
    """What a block passes on to the next: its output, or the first element of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


def _same(a: Any, b: Any) -> bool:
    """Whether two arguments of different blocks are one value that running a block cannot change."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(map(_same, a, b))
    return a is b if isinstance(a, torch.Tensor) else (a is None or isinstance(a, (bool, int, float, str))) and a == b


def _layer_statistics(model, reference, pool, layers, batches, originals, cache: ReferenceCache | None) -> Iterator[tuple[str, _Stats]]:
    """(name, statistics) of every solvable layer, in forward order, each computed after the caller
    solved the layers before it.

    The forwards run on a dense copy of the converted model whose weights are refreshed from the
    pool before each layer's statistics (only the current block's, inside a block), so no weight is
    regenerated per batch. In a chain of blocks, the arguments entering the current block are
    cached for every batch and both models, and pushed through the block once it is solved: each
    block runs a bounded number of times per batch, so the cost is linear in depth. Layers outside
    the chain, or of models without one, get full forwards. When `cache` holds the original's
    outputs of every layer on these batches, the original does not run at all.
    """
    ours = densify(copy.deepcopy(model))  # plain Parameters, refreshed in place from the pool
    blocks = _find_blocks(ours, reference, layers, batches[0], cache)
    parts = [("", layers)] if blocks is None else [("", blocks.before), *zip(blocks.names, blocks.inside), ("", blocks.after)]
    replay = cache is not None and cache.holds([(where, name, calls) for where, group in parts for name, calls in group])

    def refresh(names):
        for name in names:
            ours.get_parameter(name).copy_(pool.weight(name))

    def targets(where, name, calls, theirs: list[Feed] | None) -> Iterator[Targets]:
        """The original's outputs of one layer, batch after batch: kept ones, or computed (and kept)."""
        key = (where, name, calls)
        if replay:
            return iter(cache.targets(key))
        computed = _targets(reference, name, calls, theirs, originals[name])
        return cache.keep(key, computed, len(batches)) if cache else computed

    def whole(group):
        feeds = [partial(run, ours, b) for b in batches]
        theirs = None if replay else [partial(run, reference, b) for b in batches]
        for name, calls in group:
            refresh(pool.weights)
            yield name, _statistics(ours, name, calls, feeds, targets("", name, calls, theirs))

    if blocks is None:
        yield from whole(layers)
        return
    yield from whole(blocks.before)
    refresh(pool.weights)
    first = blocks.names[0]
    entering = [_capture(ours, first, 1, partial(run, ours, b))[0] for b in batches]
    entering_theirs = None if replay else [_capture(reference, first, 1, partial(run, reference, b))[0] for b in batches]
    for block, inside in zip(blocks.names, blocks.inside):
        mine = [name for name in pool.weights if name.startswith(f"{block}.")]
        module, theirs = ours.get_submodule(block), reference.get_submodule(block)
        for name, calls in inside:
            refresh(mine)
            feeds = [partial(_call, module, call) for call in entering]
            their_feeds = None if replay else [partial(_call, theirs, call) for call in entering_theirs]
            yield name, _statistics(ours, name, calls, feeds, targets(block, name, calls, their_feeds))
        refresh(mine)
        entering = [_advance(module, call) for call in entering]
        entering_theirs = None if replay else [_advance(theirs, call) for call in entering_theirs]
    yield from whole(blocks.after)


def _call(module: nn.Module, call: Call) -> Any:
    args, kwargs = call
    return module(*args, **kwargs)


def _advance(block: nn.Module, call: Call) -> Call:
    """The arguments of the next block: this block's output in place of its first argument."""
    args, kwargs = call
    return (_carried(_call(block, call)), *args[1:]), kwargs


@dataclass
class _Stats:
    H: torch.Tensor  # (G, d, d): sum of X^T X
    B: torch.Tensor  # (G, o, d): sum of Y^T X
    yy: float  # ||Y||^2


Targets = list[list[torch.Tensor]]  # a layer's original outputs Y on one batch: per call, per chunk of rows


def _chunk(module: nn.Module, x: torch.Tensor) -> int:
    """Rows of a layer's input turned into patches at once, so a patch matrix stays near ROWS elements."""
    per_sample = math.prod(getattr(module, "kernel_size", (1,)))  # patch elements per input element, at most
    return max(1, ROWS // max(x[0].numel() * per_sample, 1))


def _targets(reference: nn.Module, name: str, calls: int, feeds: list[Feed], original: torch.Tensor) -> Iterator[Targets]:
    """The original layer's outputs Y = X_orig W_orig^T on each batch (one per feed of the
    reference), computed on the original's own activations: they depend on nothing converted.

    Y and the products below are float32 matmuls summed into float64 across chunks and batches:
    half the time of float64 products (the largest part of calibrating a 33M-weight encoder), and
    the same held-out cosine on it (0.9975 against 0.9974); GPTQ keeps its X^T X in float32 too."""
    module_name = _module_name(name)
    module = reference.get_submodule(module_name)
    patches = kind_of(module).patches
    target = grouped(original.detach(), getattr(module, "groups", 1)).float()
    for feed in feeds:
        yield [
            [torch.einsum("ngd,god->ngo", patches(module, rows).float(), target) for rows in x.split(_chunk(module, x))]
            for (x, *_), _ in _capture(reference, module_name, calls, feed)  # each call's first argument
        ]


def _statistics(model: nn.Module, name: str, calls: int, feeds: list[Feed], targets: Iterator[Targets]) -> _Stats:
    """H, B and ||Y||^2 of one layer, from the forwards of the converted model in `feeds` and the
    original's outputs on the same batches, `targets` (one per feed, taken in turn)."""
    module_name = _module_name(name)
    module = model.get_submodule(module_name)
    patches = kind_of(module).patches
    H = B = None
    yy = 0.0
    for feed in feeds:
        ours = _capture(model, module_name, calls, feed)
        for ((x, *_), _), pieces in zip(ours, next(targets)):  # each call's first argument
            for rows, y in zip(x.split(_chunk(module, x)), pieces):
                p = patches(module, rows).float()
                h, b = torch.einsum("ngd,nge->gde", p, p).double(), torch.einsum("ngo,ngd->god", y, p).double()
                if H is None:
                    H, B = h, b
                else:  # in place: a d x d float64 per batch is the largest write of a layer's statistics
                    H.add_(h)
                    B.add_(b)
                yy += float(y.double().square().sum())
    if H is None:
        raise ValueError(f"layer {module_name} was not called on the calibration data")
    return _Stats(H, B, yy)


def _solve_alone(
    pool: RPSPool, weight: CompressedWeight, stats: _Stats, damping: float, sole: torch.Tensor, slots: torch.Tensor, signs: torch.Tensor
) -> LayerFit:
    """Layer l's problem where its `slots` are its own (a lossless RandomFold pool: the plan's
    per-layer widths; `signs` are its elements' g(i)): no other layer's penalty reaches them, so
    its minimum is one linear solve (`solve_alone`), and a quantized pool is then rounded with
    GPTQ's feedback on the same factor. At 1/16 of all-MiniLM-L6-v2's bytes, 50 conjugate-gradient
    steps had left the held-out embedding cosine at 0.50 where the exact minimum gives 0.68
    (benchmarks/calibration_from_files.py)."""
    theta = pool.pool.detach()
    groups = stats.H.shape[0]
    w0 = grouped(pool.operator.generate(theta, weight).double(), groups)
    factor = feedback_factor(stats.H, damping)
    solved = solve_alone(stats.H, stats.B, w0, factor, damping)
    theta[slots] = (solved.reshape(-1) * signs / weight.scale).to(theta.dtype)
    if pool.storage.quantized:
        round_layer(pool, weight, stats.H, sole, damping, factor=factor)
    after = grouped(pool.operator.generate(theta, weight), groups)
    return LayerFit(weight.name, output_error(w0, stats.H, stats.B, stats.yy), output_error(after, stats.H, stats.B, stats.yy), 0)


def _squared_norm(t: torch.Tensor) -> float:
    return max(float(t.detach().double().square().sum()), 1e-30)


def _penalty_diagonal(pool: RPSPool, factors: dict[str, float]) -> torch.Tensor:
    """sum_k factors[k] * diag(W_k^T W_k): the Hessian of the penalties, one vector of the pool's size."""
    weights = [pool.weights[name] for name in factors]
    return pool.operator.counts(weights, pool.pool.device, lambda weight: factors[weight.name] * weight.scale**2)


@dataclass(frozen=True)
class _Penalties:
    """The terms of every layer's problem besides its data term, as pool-sized vectors: the anchors
    of the layers that are not solved (diagonal Hessian and linear term) and the proximal terms of
    every solved layer (layer l's problem leaves its own out)."""

    anchor_diagonal: torch.Tensor
    anchor_linear: torch.Tensor
    proximal_diagonal: torch.Tensor
    linked: torch.Tensor  # the slots both solved and unsolved layers use

    def minimum_step(self, slots: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The step (float64) that takes each of `slots`, where no solved layer's data term
        reaches, to its penalties' minimum: one division, the penalties being diagonal."""
        pull = self.anchor_linear[slots] - self.anchor_diagonal[slots] * theta[slots].double()
        return pull / (self.anchor_diagonal[slots] + self.proximal_diagonal[slots])


class _Workspace:
    """Pool-sized buffers that every solve reuses: made once per calibration, and only the slots
    a solve touches are written and zeroed again, so a solve costs its layer's size."""

    def __init__(self, slots: int, device: torch.device):
        self.ones = torch.ones(slots, dtype=torch.float32, device=device)
        self.scattered = torch.zeros(slots, dtype=torch.float32, device=device)
        self.gathered = torch.zeros(slots, dtype=torch.float32, device=device)
        self.counts = torch.zeros(slots, dtype=torch.float64, device=device)

    def touched(self, operator, weight: CompressedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots `weight` uses and, for each, the sum of scale^2 over its elements there."""
        own = operator.diagonal([weight], self.counts.device, out=self.counts)
        touched = own.nonzero().squeeze(1)
        values = own[touched]
        own.index_fill_(0, touched, 0.0)
        return touched, values


def _solve(
    pool, weight, stats, penalties: _Penalties, own_proximal: float, work: _Workspace, damping, iterations, tolerance
) -> tuple[LayerFit, torch.Tensor]:
    """Preconditioned conjugate gradients on layer l's problem (see the module docstring).

    Only the slots layer l touches are coupled (through its data term): the other layers' anchors
    and proximal terms enter as their diagonal Hessian and linear term on those slots, without
    layer l's own proximal term. Of the other slots only the linked ones move, each to its
    penalties' minimum in one division. Every vector is the touched or linked slots', so the cost
    follows the layer's size (and the sharing), not the pool's, which grows with depth. Returns
    the fit and the slots that moved (a quantized pool re-rounds only those: `RPSPool.resnap`).
    """
    theta = pool.pool.detach()
    dtype = torch.float32
    groups = stats.H.shape[0]
    H = (stats.H / stats.yy).to(dtype)
    B = (stats.B / stats.yy).to(dtype)
    ridge = damping * float(torch.diagonal(H, dim1=1, dim2=2).mean())
    A = pool.operator
    signs = A.generate(work.ones, weight)  # scale * sign of every element: A^T (signs * c) sums scale^2 * c per slot
    touched, own = work.touched(A, weight)
    others = penalties.proximal_diagonal[touched] - own_proximal * own  # kept near where they are now
    anchored = (penalties.anchor_diagonal[touched] + others).clamp(min=0)
    current = theta[touched].double()
    pull = penalties.anchor_linear[touched] + others * current - anchored * current  # minus the penalties' gradient at delta = 0
    diagonal = (anchored + ridge * own).to(dtype)
    # the linked slots this layer does not use: each sees its penalties alone, exact in one division
    free = penalties.linked[~torch.isin(penalties.linked, touched)]
    drift = penalties.minimum_step(free, theta).to(dtype)
    scattered, gathered = work.scattered, work.gathered  # zero but on the touched slots, while solving

    def generate(v):  # A_l of a vector on the touched slots
        return A.generate(scattered.index_copy_(0, touched, v), weight)

    def adjoint(u):  # A_l^T(u) on the touched slots
        return A.adjoint(weight, u, out=gathered.index_fill_(0, touched, 0.0))[touched]

    def by_group(w):
        return grouped(w, groups)

    def data_term(w):  # gradient of the data term / 2, as a weight
        return torch.bmm(by_group(w), H).reshape(weight.shape)

    def normal(v):  # the normal operator of layer l's problem
        return adjoint(data_term(generate(v))) + diagonal * v

    def error(w):  # relative output error on the calibration data
        g = by_group(w)
        value = float((torch.bmm(g, H) * g).sum() - 2 * (g * B).sum()) + 1.0
        return max(value, 0.0) ** 0.5

    w0 = A.generate(theta.to(dtype), weight)
    before = error(w0)
    rhs = adjoint(B.reshape(weight.shape) - data_term(w0)) + pull.to(dtype)
    h_diag = torch.diagonal(H, dim1=1, dim2=2)  # (G, d): the data term's diagonal, per weight element
    precondition = adjoint(signs * h_diag.unsqueeze(1).expand(by_group(w0).shape).reshape(weight.shape))
    precondition = 1.0 / (precondition + diagonal).clamp(min=1e-30)

    delta = torch.zeros_like(rhs)
    r = rhs
    z = precondition * r
    p = z.clone()
    rz = float(r @ z)
    # Converged when the residual is small against the whole problem's right-hand side (the one of
    # an empty pool), not against the start: at ratio 1.0 the start is already exact, and rounding
    # noise must not be "solved".
    whole = adjoint(B.reshape(weight.shape))
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
    theta.index_add_(0, touched, delta.to(theta.dtype))
    theta.index_add_(0, free, drift.to(theta.dtype))
    scattered.index_fill_(0, touched, 0.0)
    gathered.index_fill_(0, touched, 0.0)
    return LayerFit(weight.name, before, error(A.generate(theta.to(dtype), weight)), done), torch.cat([touched, free])
