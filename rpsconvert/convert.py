"""convert(): the one verb that turns a model's weights into RPS weights."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from itertools import accumulate
from typing import Iterable, Sequence

import torch
from torch import nn

from rpsconvert.budget import check_ratio, format_bytes, parse_bytes, slots_for_budget
from rpsconvert.calibration import calibrate
from rpsconvert.checkpoint import header_bound, stored_bytes
from rpsconvert.discovery import Discovery, discover
from rpsconvert.hashing import check_seed
from rpsconvert.layers import POOL_ATTR, POOL_PARAM, RPSPool, WeightSpec, install
from rpsconvert.mapping import MAX_SLOTS, get_mapping
from rpsconvert.projection import layer_scales, project


class RPSWarning(UserWarning):
    """Something the user should know about a conversion (fallback discovery, budget above size)."""


def _matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select(
    model: nn.Module,
    found: Discovery,
    include: Sequence[str] | str | None,
    exclude: Sequence[str] | str | None,
    min_numel: int,
) -> tuple[list[str], dict[str, str]]:
    """The weights to compress, and for every other parameter the reason it stays dense."""
    params = dict(model.named_parameters())
    weights = set(found.weights)
    chosen, reasons = [], {}
    for name, p in params.items():
        if p.ndim < 2:
            reasons[name] = "1-D"
        elif name not in weights:
            reasons[name] = "not used as a weight" if found.method == "fx" else "not in a known layer (module scan)"
        elif p.numel() < min_numel:
            reasons[name] = f"fewer than min_numel={min_numel} elements"
        elif include is not None and not _matches(name, include):
            reasons[name] = "not included"
        elif _matches(name, exclude):
            reasons[name] = "excluded"
        elif not p.dtype.is_floating_point:
            reasons[name] = "not floating point"
        else:
            chosen.append(name)
    for buffer_name, _ in model.named_buffers():
        reasons[buffer_name] = "buffer"
    return chosen, reasons


def _copy_without(model: nn.Module, params: list[nn.Parameter]) -> nn.Module:
    """A deep copy that does not copy the weights about to be replaced (they are dropped anyway)."""
    memo = {id(p): nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad) for p in params}
    return copy.deepcopy(model, memo)


def convert(
    model: nn.Module,
    ratio: float | None = None,
    *,
    budget: str | int | None = None,
    mapping: str = "randomfold",
    seed: int = 0,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_numel: int = 1000,
    dtype: torch.dtype | None = None,
    architecture: str | dict | None = None,
    inplace: bool = False,
    quiet: bool = False,
    calibration: Iterable | None = None,
) -> nn.Module:
    """Return `model` with its weights generated from one shared pool (STABLE-RPS).

    `ratio` is the fraction of the compressible weight memory kept, in (0, 1] (1.0 is lossless);
    `budget` ("1MB", "500kB", bytes) sizes the pool so the saved checkpoint fits, after the tensors
    kept dense and the header. `dtype` is the pool's storage dtype in the checkpoint (default: the
    weights'; float16/bfloat16 halve the pool's bytes; in memory the pool keeps the weights' dtype
    so it trains normally, holding values exact in the storage dtype). `architecture`
    is recorded in the checkpoint so it can be loaded without a skeleton ("torchvision:resnet50").
    The pool is projected from the trained weights (least squares); below ratio 1.0 that alone
    loses accuracy, which recovery restores. With `calibration` (a list of example input batches)
    the pool is then refit to each layer's outputs on them (rpsconvert.calibration); `quiet`
    hides its progress bar.
    """
    if (ratio is None) == (budget is None):
        raise ValueError("pass exactly one of ratio=... (fraction of weight memory kept) or budget=... ('1MB')")
    if ratio is not None:
        check_ratio(ratio)
    budget_bytes = parse_bytes(budget) if budget is not None else None
    mapping_impl = get_mapping(mapping)
    check_seed(seed)
    if hasattr(model, POOL_ATTR) or hasattr(model, POOL_PARAM):
        raise ValueError(f"the model already has an attribute {POOL_ATTR!r}: it looks already converted")

    found = discover(model)
    if found.fallback_reason:
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({found.fallback_reason}); "
            "found weights by scanning modules instead: weights used only through functional calls stay dense",
            RPSWarning,
            stacklevel=2,
        )
    chosen, reasons = select(model, found, include, exclude, min_numel)
    if not chosen:
        raise ValueError(
            f"no weight of {type(model).__name__} can be compressed (need Linear/Conv/Embedding-like weights "
            f"with >= {min_numel} elements): lower min_numel or check include/exclude"
        )
    params = dict(model.named_parameters())
    weights = [params[name] for name in chosen]
    pool_dtype = dtype or weights[0].dtype
    aliases = [tuple(n for n in found.aliases[name] if n != name) for name in chosen]
    *offsets, total = accumulate((p.numel() for p in weights), initial=0)

    def weight_specs(scales: list[float]) -> list[WeightSpec]:
        return [
            WeightSpec(name, tuple(p.shape), p.dtype, offset, scale, alias)
            for name, p, offset, scale, alias in zip(chosen, weights, offsets, scales, aliases)
        ]

    specs = weight_specs(layer_scales(weights))

    notes = []
    if ratio is not None:
        slots = max(1, round(ratio * total))
    else:
        probe = RPSPool(torch.zeros(1, dtype=pool_dtype), mapping, seed, specs, grad_scaling=False, storage_dtype=pool_dtype)
        probe.info.update(architecture=architecture, discovery=found.method)
        chosen_set = {alias for s in specs for alias in (s.name, *s.aliases)}
        dense = {k: v for k, v in model.state_dict().items() if k not in chosen_set}
        fixed = header_bound(probe, dense, budget_bytes) + stored_bytes(dense)
        largest = sorted(((k, v.numel() * v.element_size()) for k, v in dense.items()), key=lambda kv: -kv[1])
        slots = slots_for_budget(budget_bytes, fixed, pool_dtype.itemsize, largest)
        if slots >= total:
            slots = total
            note = f"the budget {format_bytes(budget_bytes)} holds the whole model: converted at ratio 1.0 (lossless)"
            notes.append(note)
            warnings.warn(note, RPSWarning, stacklevel=2)
    if slots >= total:  # lossless: power-of-two scales make it bit-exact (the header only shrinks)
        specs = weight_specs(layer_scales(weights, power_of_two=True))
    if slots >= MAX_SLOTS:
        raise ValueError(f"a pool of {slots:,} slots exceeds the format's limit of 2**32: use a smaller ratio")

    theta = project([(w, s.offset, s.scale) for w, s in zip(weights, specs)], mapping_impl, slots, seed)
    pool = RPSPool(theta.to(pool_dtype).to(weights[0].dtype), mapping, seed, specs, storage_dtype=pool_dtype)
    pool.pool.requires_grad_(any(w.requires_grad for w in weights))
    result = model if inplace else _copy_without(model, weights)
    pool.info.update(
        discovery=found.method,
        fallback_reason=found.fallback_reason,
        dense_reasons=reasons,
        architecture=architecture,
        original_bytes=stored_bytes(model.state_dict()),
        notes=notes,
    )
    install(result, pool)
    if calibration is not None:
        calibrate(result, model, calibration, quiet=quiet)
    return result
