"""convert(): the one verb that turns a model's weights into RPS weights.

It composes the parts: discovery and the pool operator (engine), the file's size for a byte budget
(format), and the optional data-aware refit (quality).
"""

from __future__ import annotations

import copy
import warnings
from itertools import accumulate
from typing import Callable, Iterable, Sequence, Sized

import torch
from torch import nn

from rpsconvert.engine.budget import check_ratio, format_bytes, parse_bytes, slots_for_budget
from rpsconvert.engine.discovery import Discovery, discover
from rpsconvert.engine.hashing import check_seed
from rpsconvert.engine.mapping import Mapping, RandomFold, get_mapping, mapping_params
from rpsconvert.engine.modules import install, is_converted
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.encoding import encode_pool
from rpsconvert.engine.pool import RPSPool
from rpsconvert.engine import plan, selection
from rpsconvert.engine.projection import Reader, in_memory, layer_scales, powers_of_two
from rpsconvert.engine.storage import MixedStorage, PoolStorage, dtype_name
from rpsconvert.errors import RPSWarning
from rpsconvert.format import provenance as format_provenance
from rpsconvert.format.manifest import POOL_TENSOR, module_versions
from rpsconvert.format.shards import reserve
from rpsconvert.format.sizing import dedupe, header_bound, stored_bytes
from rpsconvert.quality.calibration import calibrate


def choose_weights(
    model: nn.Module,
    found: Discovery,
    include: Sequence[str] | str | None,
    exclude: Sequence[str] | str | None,
    min_numel: int,
) -> tuple[list[str], dict[str, str]]:
    """The weights to compress, and for every other parameter the reason it stays dense.

    `include` and `exclude` are patterns of engine/selection.py: names, globs, `re:` expressions
    and module type names."""
    include, exclude = (None if include is None else selection.patterns_of(include)), selection.patterns_of(exclude)
    params = dict(model.named_parameters())
    weights = set(found.weights)
    chosen, reasons = [], {}
    for name, p in params.items():
        if p.ndim < 2:
            reasons[name] = "1-D"
        elif name not in weights:
            reasons[name] = "not used as a weight" if found.method != "module-scan" else "not in a known layer (module scan)"
        elif p.numel() < min_numel:
            reasons[name] = f"fewer than min_numel={min_numel} elements"
        elif include is not None and not selection.matches(name, selection.holder(model, name), include):
            reasons[name] = "not included"
        elif selection.matches(name, selection.holder(model, name), exclude):
            reasons[name] = "excluded"
        elif not p.dtype.is_floating_point:
            reasons[name] = "not floating point"
        else:
            chosen.append(name)
    for buffer_name, _ in model.named_buffers():
        reasons[buffer_name] = "buffer"
    return chosen, reasons


def _spend(
    budget: int,
    fixed_bytes: Callable[[PoolStorage | MixedStorage], int],
    storages: list[PoolStorage] | None,
    dense: dict[str, torch.Tensor],
    read: Reader,
    layout_for: Callable[[int], list[CompressedWeight]],
    mapping: Mapping,
    seed: int,
    on_stage: plan.OnStage,
) -> tuple[PoolStorage | MixedStorage, int, list[plan.Candidate]]:
    """The storage and slot count a byte budget buys, and every candidate the plan scored.

    Each candidate storage gets the most slots that fit (never more than the weights' elements);
    a float pool of the weights' own dtype that holds every element is lossless and wins outright.
    Of the integer pools that hold every element, only one is scored: with RandomFold (each weight
    one run of a lossless pool) a width per layer with blocks aligned to each layer's rows
    (`plan.mixed`), else the widest width. The least weight error wins.
    """
    layout = layout_for(1)
    total, dtype = sum(w.numel for w in layout), layout[0].dtype
    fixed = {storage: fixed_bytes(storage) for storage in storages or plan.CANDIDATES}
    fitting = [c for c in fixed if fixed[c] + c.bytes(1) <= budget]
    if not fitting:  # the cheapest storage names the minimum budget
        cheapest = min(fixed, key=lambda c: fixed[c] + c.bytes(1))
        largest = sorted(((k, v.numel() * v.element_size()) for k, v in dense.items()), key=lambda kv: -kv[1])
        slots_for_budget(budget, fixed[cheapest], cheapest.bytes, largest)
    candidates = []
    for storage in fitting:
        count = min(slots_for_budget(budget, fixed[storage], storage.bytes, []), total, mapping.max_slots - 1)  # the format's limit
        candidates.append((storage, count, fixed[storage] + storage.bytes(count)))
    lossless = [(s, n) for s, n, _ in candidates if n == total and not s.quantized and s.dtype == dtype]
    if lossless:
        return *lossless[0], []
    whole = [c for c in candidates if c[0].quantized and c[1] == total]
    candidates = [c for c in candidates if c not in whole]
    if storages is None and isinstance(mapping, RandomFold) and total < mapping.max_slots:
        # at ratio 1.0 each layer gets its own width and row-aligned blocks (plan.mixed), in place
        # of the integer pools of one width that hold every element
        operator = PoolOperator(mapping, total, seed)
        on_stage("choosing each layer's width", None)  # the greedy reads a layer at a width when it first asks
        mix = plan.mixed(operator, layout_for(total), read, lambda storage: budget - fixed_bytes(storage))
        if mix is not None:
            candidates.append((mix, total, fixed_bytes(mix) + mix.bytes(total)))
    elif whole:
        candidates.append(whole[0])  # the widest: a narrower one at the same slots only rounds more coarsely
    if len(candidates) == 1:
        return *candidates[0][:2], []
    best, scored = plan.choose(candidates, mapping, seed, read, layout_for, dtype, on_stage)
    return best.storage, best.slots, scored


def _storage(dtype: torch.dtype | None, bits: int | PoolStorage | None) -> PoolStorage:
    """The pool storage asked for by hand: a float `dtype`, or `bits` (2 to 8: integer codes with
    float16 scales per block; 16 and 32: float16 and float32)."""
    if dtype is not None and bits is not None:
        raise ValueError("pass either dtype= (a float pool) or bits= (2 to 8, 16 or 32), not both")
    if bits is None:
        return PoolStorage(dtype)
    if isinstance(bits, PoolStorage):
        return bits
    if bits in (16, 32):
        return PoolStorage(torch.float16 if bits == 16 else torch.float32)
    match = next((c for c in plan.QUANTIZED if c.bits == bits), None)
    if match is None:
        raise ValueError(f"bits must be an integer from 2 to 8, 16 or 32, got {bits!r}")
    return match


def _provenance(mapping: Mapping, chosen: list[str], reasons: dict[str, str], extra: dict | None, **args) -> dict:
    """The provenance of `convert` called with `args`: the call, JSON-safe (the architecture is the
    manifest's own field), and every tensor's fate (compressed, or the reason it stays dense)."""
    bits, dtype, calibration, include = args["bits"], args["dtype"], args["calibration"], args["include"]
    call = {
        **{key: args[key] for key in ("ratio", "budget", "seed", "min_numel")},
        "mapping": {"name": mapping.name, **mapping_params(mapping)},
        "include": selection.patterns_of(include) if include is not None else None,
        "exclude": selection.patterns_of(args["exclude"]),
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "bits": str(bits) if isinstance(bits, PoolStorage) else bits,
        "calibration": calibration is not None,
        "calibration_batches": len(calibration) if isinstance(calibration, Sized) else None,
    }
    layers: dict[str, list[str]] = {"compressed": list(chosen)}
    for name, reason in reasons.items():
        layers.setdefault(reason, []).append(name)
    return format_provenance.record(call, args["seed"], layers, extra)


def _copy_without(model: nn.Module, params: list[nn.Parameter]) -> nn.Module:
    """A deep copy that does not copy the weights about to be replaced (they are dropped anyway)."""
    memo = {id(p): nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad) for p in params}
    return copy.deepcopy(model, memo)


def convert(
    model: nn.Module,
    ratio: float | None = None,
    *,
    budget: str | int | None = None,
    mapping: str | Mapping = "randomfold",
    seed: int = 0,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_numel: int = 1000,
    dtype: torch.dtype | None = None,
    bits: int | PoolStorage | None = None,
    architecture: str | dict | None = None,
    inplace: bool = False,
    quiet: bool = False,
    calibration: Iterable | None = None,
    provenance: dict | None = None,
    weights_from: Reader | None = None,
    shard_size: str | int | None = None,
    on_stage: plan.OnStage | None = None,
) -> nn.Module:
    """Return `model` with its weights generated from one shared pool (STABLE-RPS).

    Weights are found by a torch.fx pass, else by torch.export on the first calibration batch (or
    a Hugging Face model's dummy inputs), else by a module scan (with an RPSWarning saying why),
    projected onto the pool by least squares, and replaced by properties that generate them; every
    module keeps its class and forward. Below ratio 1.0 the projection alone loses accuracy: pass
    `calibration` here, then `recover`, to get it back.

    Args:
        model: the trained model. It is not modified unless `inplace`.
        ratio: fraction of the compressible weight memory kept, in (0, 1]; 1.0 is lossless (the
            generated weights equal the originals bit for bit).
        budget: bytes the saved checkpoint may take ("1MB", "500kB", "1.5MiB" or an int), header
            and tensors kept dense included; the bytes buy precision first (see `bits`). Pass
            exactly one of `ratio` and `budget`.
        mapping: how elements are laid onto the pool: "randomfold" (default, balanced and lossless
            at 1.0), "hashednet", "roast", or a registered mapping object such as RoastTile(tile=256).
        seed: seed of the hash functions, an integer in [0, 2**32); the same seed gives the same file.
        include: only the weights these patterns name are compressed: exact parameter names,
            fnmatch globs ("encoder.*"), regular expressions after "re:" ("re:.*\\.q_proj\\..*"),
            or module type names ("Linear": the module holding the weight, subclasses included).
        exclude: patterns as for `include`; the weights they name are kept dense.
        min_numel: weights with fewer elements stay dense (1-D tensors always do).
        dtype: a float storage dtype for the pool in the checkpoint; float16 and bfloat16 halve
            the pool's bytes. In memory the pool keeps the weights' dtype so it trains normally,
            holding values exact in the storage dtype.
        bits: the pool's bits per slot: 2 to 8 (integer codes with a float16 scale per
            block of slots), or 16 and 32 (float16, float32). With a `budget` and neither `bits`
            nor `dtype`, the plan chooses: it scores each storage at the slots the budget buys and
            keeps the one whose weights are closest to the originals (`report(model).notes` and
            `model.rps.info["plan"]` say what it weighed). With a `ratio`, the default is the
            weights' dtype. A PoolStorage sets every detail (block size, scale dtype).
        architecture: recorded in the checkpoint so `load` can rebuild the model without a
            skeleton, e.g. "torchvision:resnet50".
        inplace: convert `model` itself instead of a copy (saves the copy's memory).
        quiet: hide the calibration progress bar.
        calibration: example input batches (a list); the pool is then refit to each layer's
            outputs on them (see `calibrate`).
        provenance: JSON-safe facts recorded in the checkpoint's provenance beside the call (the
            command line passes its own). A "fidelity" or "gate" key given as None reserves room
            for figures measured later (format/provenance.py `fill`): a budget holds them too.
        weights_from: where the compressed weights' values are read, a piece at a time (default:
            the model's own tensors). The streaming conversion of a model larger than memory
            (rpsconvert/streaming.py) passes its files, with the model's compressed weights on the
            meta device; every number is computed as from memory, so the file is the same.
        shard_size: a model directory saved from the result is cut into shards of at most this
            size ("5GB"; `save`'s `max_shard_size` by default), and a `budget` counts the shards'
            headers and their index too (the single file then stays within it as well).
        on_stage: told each stage of the work on the compressed weights as it starts (the layer
            scales, each candidate the plan scores, the pool's encoding), with the passes over
            their values it reads (None where the plan decides as it goes): with `weights_from`
            counting its reads, a progress display knows each stage's share done and its ETA
            (the command's bars for a model read from its files).

    Returns:
        The converted model (`model` itself with `inplace`). `report(model)` says what was done.

    Raises:
        BudgetError: the budget cannot hold even the tensors kept dense; the message names the
            minimum budget.
        ValueError: bad arguments, an already converted model, or no compressible weight.

    Example:
        >>> small = convert(torchvision.models.resnet50(), budget="1MB")
        >>> save(small, "resnet50.rps.safetensors")
    """
    if (ratio is None) == (budget is None):
        raise ValueError("pass exactly one of ratio=... (fraction of weight memory kept) or budget=... ('1MB')")
    if ratio is not None:
        check_ratio(ratio)
    budget_bytes = parse_bytes(budget) if budget is not None else None
    shard_bytes = parse_bytes(shard_size) if shard_size is not None else None
    mapping_impl = get_mapping(mapping)
    check_seed(seed)
    if is_converted(model):
        raise ValueError("the model is already converted (it has an RPS pool): pass the original model")
    if weights_from is not None and calibration is not None:
        raise ValueError("calibration runs the original model, which weights_from= leaves in its files: convert without calibration")

    found = discover(model, calibration[0] if isinstance(calibration, Sequence) and len(calibration) else None)
    if found.fallback_reason:
        warnings.warn(
            f"neither torch.fx nor torch.export (which needs example inputs: pass calibration=) could trace "
            f"{type(model).__name__} ({found.fallback_reason}); found weights by scanning modules instead: "
            "weights used only through functional calls stay dense",
            RPSWarning,
            stacklevel=2,
        )
    chosen, reasons = choose_weights(model, found, include, exclude, min_numel)
    if not chosen:
        raise ValueError(
            f"no weight of {type(model).__name__} can be compressed (need Linear/Conv/Embedding-like weights "
            f"with >= {min_numel} elements): lower min_numel or check include/exclude"
        )
    params = dict(model.named_parameters())
    weights = [params[name] for name in chosen]
    read = weights_from or in_memory(dict(zip(chosen, weights)))
    made_by = _provenance(
        mapping_impl, chosen, reasons, provenance, ratio=ratio, budget=budget, seed=seed, include=include, exclude=exclude,
        min_numel=min_numel, dtype=dtype, bits=bits, calibration=calibration,
    )
    aliases = [tuple(n for n in found.aliases[name] if n != name) for name in chosen]
    *offsets, total = accumulate((p.numel() for p in weights), initial=0)
    if ratio is not None and round(ratio * total) >= mapping_impl.max_slots:  # before any weight is read
        limit = mapping_impl.max_slots
        raise ValueError(
            f"a pool of {round(ratio * total):,} slots exceeds the {mapping_impl.name} mapping's limit of {limit:,}: "
            f"use a ratio below {(limit - 1) / total:.3g}" + (" or mapping='randomfold'" if limit < RandomFold.max_slots else "")
        )

    def layouts(scales: list[float]) -> list[CompressedWeight]:
        return [
            CompressedWeight(name, tuple(p.shape), p.dtype, offset, scale, alias)
            for name, p, offset, scale, alias in zip(chosen, weights, offsets, scales, aliases)
        ]

    on_stage = on_stage or (lambda description, passes: None)
    on_stage("layer scales", 1)
    scales = layer_scales(read(w, 0, w.numel) for w in layouts([1.0] * len(chosen)))  # one weight in memory at a time
    layout = layouts(scales)

    def layout_for(slots: int) -> list[CompressedWeight]:  # lossless: power-of-two scales make it bit-exact
        return layouts(powers_of_two(scales) if slots >= total else scales)

    notes = []
    storages = [_storage(dtype, bits)] if dtype is not None or bits is not None else None
    chosen_set = {alias for w in layout for alias in (w.name, *w.aliases)}
    state = model.state_dict()
    dense = {k: v for k, v in state.items() if k not in chosen_set}
    if ratio is not None:
        storage, slots = (storages or [PoolStorage(layout[0].dtype)])[0], max(1, round(ratio * total))
    else:
        room = format_provenance.reserved(made_by, planned=storages is None, max_slots=total, budget=budget)

        def fixed_bytes(storage) -> int:  # the file's bytes outside the pool (the header depends on the storage)
            probe = RPSPool(torch.zeros(1, dtype=layout[0].dtype), mapping_impl, seed, layout, grad_scaling=False, storage=storage)
            probe.info.update(architecture=architecture, discovery=found.method, provenance=room)
            fixed = header_bound(probe, dense, budget_bytes, module_versions(state)) + stored_bytes(dense)
            if shard_bytes is not None and budget_bytes > shard_bytes:  # the result may be cut into shards
                fixed += reserve([*dedupe(dense)[0], *(POOL_TENSOR + suffix for suffix, _, _ in storage.tensors(1))])
            return fixed

        storage, slots, scored = _spend(budget_bytes, fixed_bytes, storages, dense, read, layout_for, mapping_impl, seed, on_stage)
        if len(scored) > 1:
            notes.append(f"plan: {storage} pool of {slots:,} slots (ratio {slots / total:.4g}), the least weight error of {len(scored)} candidates")
        elif slots == total and not storage.quantized and storage.dtype == layout[0].dtype:
            notes.append(f"the budget {format_bytes(budget_bytes)} holds the whole model: converted at ratio 1.0 (lossless)")
            warnings.warn(notes[-1], RPSWarning, stacklevel=2)

    layout = layout_for(slots)
    operator = PoolOperator(mapping_impl, slots, seed)
    on_stage(f"encoding the {storage} pool", 1)
    pool = RPSPool.from_stored(encode_pool(storage, operator, layout, read, layout[0].dtype), storage, slots, layout[0].dtype, mapping_impl, seed, layout)
    result = model if inplace else _copy_without(model, weights)
    pool.info.update(
        shard_size=shard_bytes,
        discovery=found.method,
        fallback_reason=found.fallback_reason,
        dense_reasons=reasons,
        architecture=architecture,
        original_bytes=stored_bytes(dense) + sum(w.numel * w.dtype.itemsize for w in layout),
        notes=notes,
        plan=[c.row() for c in scored] if budget is not None else [],
        provenance={**made_by, "plan": format_provenance.plan_rows(scored) if budget is not None else []},
    )
    pool.pool.requires_grad_(any(w.requires_grad for w in weights))  # trainable as the weights were
    install(result, pool)
    if calibration is not None:
        pool.unpack()  # calibration solves for float values, rounded again by pack
        calibrate(result, model, calibration, quiet=quiet)
    pool.pack()  # the model runs from the pool as it is stored: the budget holds in memory too
    return result
