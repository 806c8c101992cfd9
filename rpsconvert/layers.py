"""RPS weights inside ordinary modules.

Like torch.nn.utils.parametrize, a converted module keeps its class (through a subclass created on
the fly), its forward code and its other attributes; only its weight attribute becomes a property
computed from the shared pool. Unlike parametrize, no `original` tensor is kept: the dense weight is
gone, and the state dict holds the pool once (`rps.pool`) plus the tensors kept dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rpsconvert.mapping import CHUNK, chunks, get_mapping

POOL_ATTR = "rps"  # the RPSPool object on the converted model's root (a plain attribute)
POOL_PARAM = "rps_pool"  # the pool Parameter, registered on the root (so never called by Sequential)


@dataclass(frozen=True)
class WeightSpec:
    """One compressed weight: its elements are [offset, offset + numel) of the virtual vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    scale: float
    aliases: tuple[str, ...] = ()  # other names of a tied weight

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class RPSPool:
    """The shared pool and what is needed to generate every compressed weight from it.

    Once installed, the pool Parameter is registered on the model's root as `rps_pool` and read
    from there on every use, so `.to()`, `load_state_dict(assign=True)` or anything else that
    replaces the Parameter object is followed.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        mapping: str,
        seed: int,
        specs: list[WeightSpec],
        grad_scaling: bool = True,
        storage_dtype: torch.dtype | None = None,
    ):
        self._detached = nn.Parameter(pool)
        # The pool trains and generates in the weights' dtype; a checkpoint stores it in
        # `storage_dtype` (fp16/bf16 halve the file), and the values are kept representable in it.
        self.storage_dtype = storage_dtype or pool.dtype
        self._owner: nn.Module | None = None
        self.mapping = get_mapping(mapping)
        self.seed = seed
        self.specs = {spec.name: spec for spec in specs}
        self.grad_scaling = grad_scaling
        self.grad_scale: torch.Tensor | None = None  # computed at the first backward
        self.info: dict = {}  # what convert() decided (discovery method, weights kept dense and why)
        self._cache: dict[str, torch.Tensor] | None = None
        self._cache_key: tuple | None = None
        self._hooked: int | None = None

    @property
    def pool(self) -> nn.Parameter:
        return self._detached if self._owner is None else getattr(self._owner, POOL_PARAM)

    @property
    def size(self) -> int:
        return self.pool.numel()

    def __repr__(self) -> str:
        return f"RPSPool(slots={self.size}, mapping={self.mapping.name}, seed={self.seed}, weights={len(self.specs)})"

    def _pool_for_autograd(self) -> torch.Tensor:
        """The pool, with the STABLE-RPS gradient hook attached once per Parameter object."""
        pool = self.pool
        if self._hooked != id(pool) and pool.requires_grad:
            pool.register_hook(self._scale_gradient)
            self._hooked = id(pool)
        return pool

    def _scale_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.grad_scaling:
            return grad
        if self.grad_scale is None or self.grad_scale.device != grad.device:
            self.grad_scale = slot_grad_scale(self).to(grad.device)
        return grad / self.grad_scale.to(grad.dtype)

    def _current_key(self) -> tuple:
        pool = self.pool
        return (id(pool), pool._version, pool.device, pool.dtype)

    def weight(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        if self._cache is not None and self._cache_key == self._current_key():
            if not (torch.is_grad_enabled() and self.pool.requires_grad):
                return self._cache[name]
        pool = self._pool_for_autograd()
        pieces = [
            pool[slots] * (sign.to(pool.dtype) * spec.scale)
            for _, _, slots, sign in chunks(self.mapping, spec.offset, spec.numel, self.size, self.seed, pool.device)
        ]
        return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).view(spec.shape)

    def materialize(self) -> None:
        """Generate every weight once and reuse it until the pool changes (fast inference)."""
        with torch.no_grad():
            self._cache = None
            self._cache = {name: self.weight(name) for name in self.specs}
        self._cache_key = self._current_key()

    def clear_cache(self) -> None:
        self._cache = None


def slot_grad_scale(pool: RPSPool) -> torch.Tensor:
    """STABLE-RPS per-slot gradient divisor: (sum of the scales of a slot's elements)^2 / count.

    It makes one SGD step move every weight by about lr times the mean sign-corrected gradient of
    the elements sharing its slot, whatever the scales and the pool's init.
    """
    m, device = pool.size, pool.pool.device
    count = torch.zeros(m, dtype=torch.float64, device=device)
    total = torch.zeros(m, dtype=torch.float64, device=device)
    ones = torch.ones(min(CHUNK, max(s.numel for s in pool.specs.values())), dtype=torch.float64, device=device)
    for spec in pool.specs.values():
        for lo, hi, slots, _ in chunks(pool.mapping, spec.offset, spec.numel, m, pool.seed, device):
            count.index_add_(0, slots, ones[: hi - lo])
            total.index_add_(0, slots, ones[: hi - lo], alpha=spec.scale)
    scale = torch.where(count > 0, total**2 / count.clamp(min=1), torch.ones_like(count))
    return scale.clamp(min=torch.finfo(torch.float32).tiny).float()


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _rps_class(cls: type, attrs: tuple[str, ...]) -> type:
    """A subclass of `cls` whose `attrs` are properties read from the pool (one class per pair)."""
    key = (cls, attrs)
    if key not in _CLASSES:
        props = {attr: property(lambda self, a=attr: self._rps_pool.weight(self._rps_names[a])) for attr in attrs}
        _CLASSES[key] = type(f"RPS{cls.__name__}", (cls,), {**props, "_rps_original_class": cls})
    return _CLASSES[key]


def install(model: nn.Module, pool: RPSPool) -> None:
    """Replace every name of every spec by a pool-backed property and attach the pool to `model`."""
    if hasattr(model, POOL_ATTR) or hasattr(model, POOL_PARAM):
        raise ValueError(f"the model already has an attribute {POOL_ATTR!r}: is it already converted?")
    model.register_parameter(POOL_PARAM, pool.pool)
    pool._owner, pool._detached = model, None
    object.__setattr__(model, POOL_ATTR, pool)
    by_module: dict[str, dict[str, str]] = {}
    for spec in pool.specs.values():
        for name in (spec.name, *spec.aliases):
            module_name, _, attr = name.rpartition(".")
            by_module.setdefault(module_name, {})[attr] = spec.name
    for module_name, names in by_module.items():
        module = model.get_submodule(module_name)
        for attr in names:
            delattr(module, attr)
        base = getattr(type(module), "_rps_original_class", type(module))
        merged = {**getattr(module, "_rps_names", {}), **names}
        module.__class__ = _rps_class(base, tuple(sorted(merged)))
        object.__setattr__(module, "_rps_pool", pool)
        object.__setattr__(module, "_rps_names", merged)


def find_pool(model: nn.Module) -> RPSPool:
    pool = model.__dict__.get(POOL_ATTR)
    wrapped = model.__dict__.get("_modules", {}).get("module")  # DistributedDataParallel and similar
    if pool is None and wrapped is not None:
        pool = wrapped.__dict__.get(POOL_ATTR)
    if not isinstance(pool, RPSPool):
        raise ValueError("this model has no RPS pool: convert it with rpsconvert.convert() first")
    return pool


def materialize(model: nn.Module) -> None:
    """Compute every RPS weight once for fast inference; use under torch.no_grad()/inference_mode.

    The cache is ignored while gradients are needed and refreshed when the pool changes.
    """
    find_pool(model).materialize()


def clear_cache(model: nn.Module) -> None:
    find_pool(model).clear_cache()
