"""RPS weights inside ordinary modules, and the way back.

Like torch.nn.utils.parametrize, a converted module keeps its class (through a subclass created on
the fly), its forward code and its other attributes; only its weight attribute becomes a property
computed from the shared pool. Unlike parametrize, no `original` tensor is kept: the dense weight is
gone, and the state dict holds the pool once (`rps_pool`) plus the tensors kept dense.
`is_converted` / `densify` are the pair parametrize offers as `is_parametrized` /
`remove_parametrizations`.
"""

from __future__ import annotations

import torch
from torch import nn

from rpsconvert.engine.pool import POOL_ATTR, POOL_PARAM, RPSPool

_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _rps_class(cls: type, attrs: tuple[str, ...]) -> type:
    """A subclass of `cls` whose `attrs` are properties read from the pool (one class per pair)."""
    key = (cls, attrs)
    if key not in _CLASSES:
        props = {attr: property(lambda self, a=attr: self._rps_pool.weight(self._rps_names[a])) for attr in attrs}
        _CLASSES[key] = type(
            f"RPS{cls.__name__}",
            (cls,),
            {**props, "_rps_original_class": cls, "__reduce_ex__": _reduce_converted, "train": _train_and_pack},
        )
    return _CLASSES[key]


def _train_and_pack(module: nn.Module, mode: bool = True) -> nn.Module:
    """nn.Module.train, which also drops the pool's cache (training changes the pool at every step,
    so cached weights would only hold memory); eval() keeps the cache and packs the pool back into
    its stored form once the whole model leaves training (a submodule's eval() inside a training
    model leaves the pool to the training). The latent pool itself comes back at the first forward
    that trains it."""
    module._rps_original_class.train(module, mode)
    pool = module._rps_pool
    if mode:
        pool.clear_cache()
    elif pool._owner is None or not pool._owner.training:
        pool.pack()
    return module


def _reduce_converted(module: nn.Module, protocol: int):
    """Pickle (and deepcopy) a converted module by its original class and weight names: the class
    made on the fly has no importable name, so it is rebuilt on load with `_rps_class`."""
    return (_new_converted, (module._rps_original_class, tuple(sorted(module._rps_names))), module.__getstate__())


def _new_converted(cls: type, attrs: tuple[str, ...]) -> nn.Module:
    rps_cls = _rps_class(cls, attrs)
    return rps_cls.__new__(rps_cls)


def is_converted(model: nn.Module) -> bool:
    """Whether `model` (or the model a DistributedDataParallel-like wrapper holds) has an RPS pool."""
    return _pool_of(model) is not None or POOL_PARAM in model._parameters


def _pool_of(model: nn.Module) -> RPSPool | None:
    pool = model.__dict__.get(POOL_ATTR)
    wrapped = model.__dict__.get("_modules", {}).get("module")  # DistributedDataParallel and similar
    if pool is None and wrapped is not None:
        pool = wrapped.__dict__.get(POOL_ATTR)
    return pool if isinstance(pool, RPSPool) else None


def find_pool(model: nn.Module) -> RPSPool:
    pool = _pool_of(model)
    if pool is None:
        raise ValueError("this model has no RPS pool: convert it with rpsconvert.convert() first")
    return pool


def install(model: nn.Module, pool: RPSPool) -> None:
    """Replace every name of every compressed weight by a pool-backed property; attach the pool."""
    if is_converted(model):
        raise ValueError("the model is already converted (it has an RPS pool): pass the original model")
    if hasattr(model, POOL_ATTR):
        raise ValueError(f"the model has an attribute {POOL_ATTR!r} of its own, where rpsconvert keeps its pool: rename it")
    for name, tensor in pool.tensors.items():
        model.register_parameter(name, tensor) if name == POOL_PARAM else model.register_buffer(name, tensor)
    pool._owner, pool._detached = model, None
    object.__setattr__(model, POOL_ATTR, pool)
    for module, names in _by_module(model, pool).items():
        order = module.__dict__.get("_rps_order") or list(module._parameters)  # for densify
        for attr in names:
            delattr(module, attr)
        base = getattr(type(module), "_rps_original_class", type(module))
        merged = {**getattr(module, "_rps_names", {}), **names}
        module.__class__ = _rps_class(base, tuple(sorted(merged)))
        object.__setattr__(module, "_rps_pool", pool)
        object.__setattr__(module, "_rps_names", merged)
        object.__setattr__(module, "_rps_order", order)


def _by_module(model: nn.Module, pool: RPSPool) -> dict[nn.Module, dict[str, str]]:
    """module -> {attribute: compressed weight name} for every name of every compressed weight."""
    out: dict[nn.Module, dict[str, str]] = {}
    for weight in pool.weights.values():
        for name in (weight.name, *weight.aliases):
            module_name, _, attr = name.rpartition(".")
            out.setdefault(model.get_submodule(module_name), {})[attr] = weight.name
    return out


def densify(model: nn.Module) -> nn.Module:
    """Turn a converted model back into the plain model, in place, and return it.

    Every compressed weight becomes an ordinary Parameter holding the weight the pool generates now
    (tied weights stay tied), every module gets its original class back, and the pool is removed:
    the result is the model `convert` started from, with the converted model's weights.
    """
    pool = find_pool(model)
    with torch.no_grad():
        dense = {
            name: nn.Parameter(pool.weight(name).clone(), requires_grad=pool.pool.requires_grad) for name in pool.weights
        }
    for module, names in _by_module(model, pool).items():
        module.__class__ = module._rps_original_class
        order = module.__dict__.pop("_rps_order")
        del module.__dict__["_rps_pool"], module.__dict__["_rps_names"]
        for attr, name in names.items():
            module.register_parameter(attr, dense[name])
        params = module._parameters  # back in the original order, so state dicts list the same keys
        module._parameters = {**{k: params[k] for k in order if k in params}, **params}
    for name in pool.tensors:
        delattr(model, name)
    del model.__dict__[POOL_ATTR]
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Choose how a converted model gets its weights, and return it.

    "lean" (what `convert` and `load` return): each compressed weight is generated from the pool
    when its layer runs, so the resident tensors are the pool, the dense tensors and the weight in
    use: the memory the budget promised, at the cost of generation in every forward.
    "cached": every weight is generated now and served from a cache while no gradient is needed
    (under torch.no_grad() or inference_mode): the dense model's speed for the dense model's
    memory. The cache is dropped by `model.train()`, rebuilt when the pool changes, and ignored
    while gradients are needed (training generates as in lean mode).

    Raises:
        ValueError: an unknown mode, or a model that is not converted.
    """
    find_pool(model).set_mode(mode)
    return model


def materialize(model: nn.Module) -> None:
    """set_mode(model, "cached"): compute every RPS weight now for fast inference (use under
    torch.no_grad() or inference_mode; the cache is ignored while gradients are needed)."""
    find_pool(model).materialize()


def clear_cache(model: nn.Module) -> None:
    """Drop the cached weights now. In cached mode the next forward without gradients rebuilds
    them; `set_mode(model, "lean")` drops them for good."""
    find_pool(model).clear_cache()
