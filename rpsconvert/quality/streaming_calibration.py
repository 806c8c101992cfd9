"""Calibration of a model larger than memory: block by block, from its safetensors files.

`calibrate` holds the pool as float values with its solver's state (53 bytes a slot), a dense
copy of the converted model and the original whole: 27 GB before the first solve for a 7B model
in bf16. Where every weight has slots of its own (a RandomFold pool with a slot for each element:
the per-layer plan at ratio 1, what `--budget` gives down to about 1/16 of the fp32 bytes), no
solve moves another layer's slots, so calibration need not see the pool whole: a layer is solved,
rounded and written back into the stored bytes on its own, and only the block being solved is
resident, twice, in float32: the original's, read from the files, and the converted one's,
generated from the pool.

Each layer of a block, in forward order, gets calibrate's statistics (H = X^T X and B = Y^T X of
the converted block's inputs X and the original's outputs Y on the original's inputs) and the
minimum of calibrate's objective for a layer whose slots are its own,

    ||X W^T - Y||^2 + ||W - W_0||^2_D,    D = damping * mean diag H (and 1 more for an input never set),

in closed form, W = (B + W_0 D)(H + D)^-1 (calibrate reaches it by conjugate gradients over the
pool), through the factor GPTQ's rounding uses anyway (one per distinct H: q, k and v share
theirs), then rounded onto the stored grid with GPTQ's feedback and encoded into the layer's
blocks (a block it shares with a neighbour is encoded again from both their values, as calibrate
re-snaps it).

The arguments entering the current block, for every batch, for the original, the converted model
and (on held-out batches) the converted model before calibration, are what grows with the data:
kept in memory up to `activation_memory` bytes and written to a temporary directory beyond it.
Held out as in `calibrate`: the last fifth of the batches; the calibration is kept only if it
lowers the relative squared error of the last block's outputs against the original's on them, else
the stored pool, copied to disk before the first solve, is written back as it was. Layers outside
the chain of blocks (a language model's head) keep the weight-space solution.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn

from rpsconvert.engine.encoding import rewrite, spans
from rpsconvert.engine.kinds import grouped
from rpsconvert.engine.mapping import RandomFold, chunks
from rpsconvert.engine.modules import find_pool
from rpsconvert.engine.operator import CompressedWeight
from rpsconvert.engine.pool import RPSPool
from rpsconvert.engine.storage import PoolStorage
from rpsconvert.format.lazy_weights import SafetensorsFiles
from rpsconvert.format.skeleton import file_keys, load_dense, skeleton
from rpsconvert.quality.batches import Batch, eval_mode, run
from rpsconvert.quality.blocks import repeated_blocks
from rpsconvert.quality.calibration import Call, LayerFit, _advance, _call, _capture, _forward_order, _statistics, _Stats, _targets
from rpsconvert.quality.recovery import distillation_loss
from rpsconvert.quality.rounding import feedback_factor, output_error, round_with_feedback, solve_alone

ACTIVATION_MEMORY = 1 << 30  # bytes of block inputs kept in memory before they go to disk


def streams_calibration(model: nn.Module) -> str | None:
    """Why `calibrate_files` cannot calibrate the converted `model`, or None when it can."""
    pool = find_pool(model)
    elements = max((w.offset + w.numel for w in pool.weights.values()), default=0)
    if not isinstance(pool.mapping, RandomFold) or pool.size < elements:
        return (f"calibrating from files needs every weight in slots of its own (a randomfold pool at ratio 1, the plan of --budget "
                f"down to about 1/16 of the fp32 bytes); this pool has {pool.size / max(elements, 1):.3g} slots a weight ({pool.mapping.name})")
    if not repeated_blocks(model, pool.weights):
        return "calibrating from files goes block by block, and this model has no chain of repeated blocks (a ModuleList of layers)"
    return None


def memory_needed(model: nn.Module, activation_memory: int = ACTIVATION_MEMORY) -> int:
    """A bound on the memory `calibrate_files(model, ...)` takes beyond the converted model, in
    bytes: one block twice in float32 (the original's and the converted one's), the activations
    held in memory, and the largest layer's solve: H, its factor and the factorization's three
    temporaries (d x d float64 each, d the layer's inputs), and nine float64 copies of the weight
    (B, the solution, GPTQ's working weight, codes, grid...). For a 7B Llama's down projection
    (d = 11008) the solve alone is about 8 GB."""
    pool = find_pool(model)
    blocks = repeated_blocks(model, pool.weights)
    block = max((sum(p.numel() for p in model.get_submodule(b).parameters()) + sum(
        pool.weights[n].numel for n in pool.weights if n.startswith(f"{b}.")) for b in blocks), default=0)
    solve = max((8 * (5 * w.shape[1] ** 2 * math.prod(w.shape[2:]) ** 2 + 9 * w.numel) for w in pool.weights.values()
                 if any(w.name.startswith(f"{b}.") for b in blocks) and len(w.shape) >= 2), default=0)
    return 2 * 4 * block + activation_memory + solve


def calibrate_files(
    model: nn.Module,
    path: str | os.PathLike,
    batches: Iterable[Batch],
    *,
    arch: str | dict | None = None,
    damping: float = 0.01,
    holdout: float = 0.2,
    activation_memory: int = ACTIVATION_MEMORY,
    quiet: bool = False,
) -> list[LayerFit]:
    """Refit the stored pool of `model`, converted from the safetensors files at `path`
    (`convert_files`, with `arch` as there), to the original's layer outputs on `batches`, a block
    at a time, without loading either model whole (see the module's docstring). Returns one
    LayerFit per layer solved; `report(model).notes` says whether the held-out check kept it."""
    reason = streams_calibration(model)
    if reason:
        raise ValueError(reason)
    pool = find_pool(model)
    pool.pack()
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of example inputs")
    held = min(max(round(holdout * len(batches)), 1), len(batches) - 1) if holdout > 0 else 0
    files = SafetensorsFiles.open(path)
    reference, _ = skeleton(Path(path), arch, files)
    ours, _ = skeleton(Path(path), arch, files)  # the converted model's current block, dense
    blocks = repeated_blocks(model, pool.weights)
    keys = file_keys(reference.state_dict(keep_vars=True), reference, files)
    load_dense(reference, files, keys, {n for n, _ in reference.named_parameters() if any(n.startswith(f"{b}.") for b in blocks)}, Path(path))
    progress = Progress(
        TextColumn("[bold]calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[block]}"), disable=quiet, console=Console(stderr=True),
    )
    with tempfile.TemporaryDirectory(prefix="rpsconvert-calibration-") as scratch, _without_cache(model, reference), \
            eval_mode(model, reference, ours), torch.no_grad(), progress:
        task = progress.add_task("calibrate", total=len(blocks), block="")
        layers = _forward_order(model, pool, batches[0])
        store = _Activations(Path(scratch), activation_memory, len(batches) - held, held)
        _enter(model, reference, blocks[0], batches, store)
        saved = _save(pool, Path(scratch))  # what the held-out check may restore
        fits = []
        for block in blocks:
            progress.update(task, block=block)
            inside = [(name, calls) for name, calls in layers if name.startswith(f"{block}.")]
            fits += _calibrate_block(model, pool, reference, ours, files, keys, block, inside, store, damping)
            progress.advance(task)
        if held:
            before, after = _relative_error(store, "before"), _relative_error(store, "after")
            if after >= before:
                _restore(pool, saved)
                fits = [dataclasses.replace(fit, kept=False) for fit in fits]
            pool.info.setdefault("notes", []).append(
                f"calibration {'kept' if after < before else 'undone'}: held-out relative error of the last block's output "
                f"{before:.4g} without it, {after:.4g} with it"
            )
    pool.clear_cache()
    return fits


def _calibrate_block(model, pool, reference, ours, files, keys, block, inside, store, damping) -> list[LayerFit]:
    """Solve, round and write the layers of one block, then move every stream past it: the
    block's original weights are read from the files and the converted ones generated from the
    pool, both in float32, and both freed at the end."""
    names = [name for name, _ in reference.get_submodule(block).named_parameters(prefix=block)]
    reference.load_state_dict({n: files.tensor(keys[n]).float() for n in names}, strict=False, assign=True)
    ours.load_state_dict({n: _current(model, pool, n) for n in names}, strict=False, assign=True)
    mine, theirs = ours.get_submodule(block), reference.get_submodule(block)
    store.advance("before", mine)  # the held-out batches through the block as converted
    fits, factors = [], {}
    for name, calls in inside:
        feeds = [partial(_call, mine, store.call("ours", b)) for b in store.batches("ours")]
        their_feeds = [partial(_call, theirs, store.call("reference", b)) for b in store.batches("reference")]
        stats = _statistics(ours, name, calls, feeds, _targets(reference, name, calls, their_feeds, reference.get_parameter(name)))
        fits.append(_solve(pool, pool.weights[name], stats, factors, damping))
        ours.get_parameter(name).copy_(pool.weight(name))
    for stream, module in (("ours", mine), ("reference", theirs), ("after", mine), ("held reference", theirs)):
        store.advance(stream, module)
    empty = {n: torch.empty_like(reference.get_parameter(n), device="meta") for n in names}
    reference.load_state_dict(empty, strict=False, assign=True)
    ours.load_state_dict(dict(empty), strict=False, assign=True)
    return fits


def _current(model: nn.Module, pool: RPSPool, name: str) -> torch.Tensor:
    """Parameter `name` of the converted model now, in float32: generated from the pool when compressed."""
    return (pool.weight(name) if name in pool.weights else model.get_parameter(name)).detach().float()


def _enter(model: nn.Module, reference: nn.Module, first: str, batches: list[Batch], store: _Activations) -> None:
    """Capture what enters the first block on every batch, for both models, in float32 (the
    blocks compute in float32); every argument but the first is kept for every block."""
    for b, batch in enumerate(batches):
        for side, source in (("ours", model), ("reference", reference)):
            (x, *rest), kwargs = _float32(_capture(source, first, 1, partial(run, source, batch))[0])
            if not all(_plain(v) for v in (*rest, *kwargs.values())):
                raise ValueError(f"{first} is called with an argument that is neither a tensor nor a plain value, so it cannot be "
                                 "replayed block after block: calibrate the model loaded whole")
            store.rest[(side, b)] = (tuple(rest), kwargs)
            for stream in (side,) if b < store.train else (("before", "after") if side == "ours" else ("held reference",)):
                store.put(stream, b, x)


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(map(_plain, value))
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


def _relative_error(store: _Activations, stream: str) -> float:
    """The mean over the held-out batches of ||x - x_orig||^2 / ||x_orig||^2 of the last block's output."""
    errors = [float(distillation_loss(store.get(stream, b), store.get("held reference", b), "mse")) for b in store.batches(stream)]
    return sum(errors) / len(errors)


@contextmanager
def _without_cache(*models: nn.Module):
    """Hugging Face models without their key-value cache while calibrating: a cache object passed
    to every block would grow each time a block runs again on the same arguments."""
    configs = [m.config for m in models if hasattr(getattr(m, "config", None), "use_cache")]
    used = [c.use_cache for c in configs]
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c, u in zip(configs, used):
            c.use_cache = u


def _save(pool: RPSPool, directory: Path) -> dict[str, Path]:
    """The stored pool's tensors written to files as raw bytes (a safetensors writer would copy them in memory first)."""
    saved = {}
    for suffix, tensor in pool.stored().items():
        saved[suffix] = directory / f"pool{suffix or '.codes'}.bin"
        tensor.contiguous().view(torch.uint8).numpy().tofile(saved[suffix])
    return saved


def _restore(pool: RPSPool, saved: dict[str, Path]) -> None:
    """Write the bytes `_save` kept back into the stored pool."""
    for suffix, tensor in pool.stored().items():
        flat = tensor.view(torch.uint8)
        flat.copy_(torch.from_file(str(saved[suffix]), size=flat.numel(), dtype=torch.uint8))
    pool.clear_cache()


def _solve(pool: RPSPool, weight: CompressedWeight, stats: _Stats, factors: dict, damping: float) -> LayerFit:
    """Fit one layer's slots to its statistics, round them with GPTQ's feedback and write them
    into the stored pool (see the module's docstring)."""
    groups = stats.H.shape[0]
    w0 = grouped(pool.weight(weight.name).double(), groups)
    if "H" not in factors or not torch.equal(factors["H"], stats.H):  # q, k and v: one factor
        factors.update(H=stats.H, U=feedback_factor(stats.H, damping))
    factor = factors["U"]
    solved = solve_alone(stats.H, stats.B, w0, factor, damping)
    signs = torch.cat([piece[3] for piece in chunks(pool.mapping, weight.offset, weight.numel, pool.size, pool.seed)]).double()
    units = solved.reshape(-1) * signs / weight.scale  # the pool values the solve asks for, element by element
    pieces = _pieces(pool, weight)
    if pool.storage.quantized:
        grids = [piece.part.grid(piece.spliced(units), piece.at, piece.at + piece.count) for piece in pieces]
        steps, levels = (torch.cat(t).double() for t in zip(*grids))
        codes = round_with_feedback(
            grouped((units * signs).view(weight.shape), groups), None, grouped(steps.view(weight.shape), groups),
            grouped(levels.view(weight.shape), groups), factor=factor,
        )
        units = codes.reshape(-1) * signs * steps  # a code times a block scale: exact in float32
    for piece in pieces:
        rewrite(piece.part, piece.run, piece.first, piece.spliced(units))
    pool.clear_cache()
    final = grouped(pool.weight(weight.name), groups)
    return LayerFit(weight.name, output_error(w0, stats.H, stats.B, stats.yy), output_error(final, stats.H, stats.B, stats.yy), 0)


@dataclass(frozen=True)
class _Piece:
    """Slots of one run of the stored pool, cut on whole blocks and bytes (`spans`), that hold
    elements of the weight being written: `count` of them from element `element`, at `at` in the
    piece's current `values`, which start at slot `first` of the run."""

    part: PoolStorage
    run: dict[str, torch.Tensor]
    first: int
    values: torch.Tensor
    element: int
    at: int
    count: int

    def spliced(self, units: torch.Tensor) -> torch.Tensor:
        """The piece's values with the weight's slots set to `units` (all its elements' values)."""
        out = self.values.clone()
        out[self.at : self.at + self.count] = units[self.element : self.element + self.count].to(out.dtype)
        return out


def _pieces(pool: RPSPool, weight: CompressedWeight) -> list[_Piece]:
    """The stored pieces that hold the weight's slots, in element order. With a slot for every
    element, fold 0 covers the weight: its slots ascend from the slot of its first element,
    wrapping once at the pool's end at most."""
    start = int(pool.mapping.slots(weight.offset, weight.offset + 1, pool.size, pool.seed)[0])
    head = min(weight.numel, pool.size - start)
    ranges = [(0, start, head)] + ([(head, 0, weight.numel - head)] if head < weight.numel else [])
    stored = pool.stored()
    out = []
    for element, slot, count in ranges:
        for part, tensors, begin, first, last in spans(pool.storage, stored, pool.size, slot, slot + count):
            lo, hi = max(slot, begin + first), min(slot + count, begin + last)
            values = part.read(tensors, first, last).float()
            out.append(_Piece(part, tensors, first, values, element + lo - slot, lo - begin - first, hi - lo))
    return out


class _Activations:
    """The first argument entering the current block, per stream and batch, in memory up to
    `limit` bytes and in files of `directory` beyond; the other arguments, the same for every
    block, per model and batch. Streams: "ours" and "reference" on the calibration batches (the
    converted model as it is solved, and the original), "before", "after" and "held reference" on
    the held-out ones (the converted model without and with calibration, and the original)."""

    SIDE = {"ours": "ours", "before": "ours", "after": "ours", "reference": "reference", "held reference": "reference"}

    def __init__(self, directory: Path, limit: int, train: int, held: int):
        self.directory, self.limit, self.used = directory, limit, 0
        self.train, self.held = train, held
        self.memory: dict[tuple[str, int], torch.Tensor] = {}
        self.rest: dict[tuple[str, int], tuple[tuple, dict]] = {}

    def batches(self, stream: str) -> range:
        return range(self.train) if stream in ("ours", "reference") else range(self.train, self.train + self.held)

    def put(self, stream: str, batch: int, x: torch.Tensor) -> None:
        old = self.memory.pop((stream, batch), None)
        self.used -= old.nbytes if old is not None else 0
        if self.used + x.nbytes <= self.limit:
            self.memory[(stream, batch)] = x
            self.used += x.nbytes
        else:
            save_file({"x": x.contiguous()}, self._file(stream, batch))

    def get(self, stream: str, batch: int) -> torch.Tensor:
        x = self.memory.get((stream, batch))
        return x if x is not None else load_file(self._file(stream, batch))["x"]

    def call(self, stream: str, batch: int) -> Call:
        rest, kwargs = self.rest[(self.SIDE[stream], batch)]
        return (self.get(stream, batch), *rest), kwargs

    def advance(self, stream: str, block: nn.Module) -> None:
        for batch in self.batches(stream):
            self.put(stream, batch, _advance(block, self.call(stream, batch))[0][0])

    def _file(self, stream: str, batch: int) -> Path:
        return self.directory / f"{stream.replace(' ', '-')}-{batch}.safetensors"
