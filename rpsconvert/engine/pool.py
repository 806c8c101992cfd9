"""RPSPool: the shared pool Parameter, the operator that generates weights from it, and its cache.

The pool trains and generates in the weights' dtype; a checkpoint stores it as `storage` says (a
float dtype, or integer codes with block scales: engine/storage.py), and generation reads it
through the stored grid, so the model that runs is the model that is saved.
"""

from __future__ import annotations

import torch
from torch import nn

from rpsconvert.engine.mapping import Mapping, get_mapping
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.storage import PoolStorage, straight_through

POOL_ATTR = "rps"  # the RPSPool object on the converted model's root (a plain attribute)
POOL_PARAM = "rps_pool"  # the pool Parameter, registered on the root (so never called by Sequential)
MODES = ("lean", "cached")  # RPSPool.set_mode


class RPSPool:
    """The shared pool and what is needed to generate every compressed weight from it.

    Once installed, the pool Parameter is registered on the model's root as `rps_pool` and read
    from there on every use, so `.to()`, `load_state_dict(assign=True)` or anything else that
    replaces the Parameter object is followed.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        mapping: str | Mapping,
        seed: int,
        weights: list[CompressedWeight],
        grad_scaling: bool = True,
        storage: PoolStorage | None = None,
    ):
        self._detached: nn.Parameter | None = nn.Parameter(pool)
        self.storage = storage or PoolStorage(pool.dtype)
        self._owner: nn.Module | None = None
        self.operator = PoolOperator(get_mapping(mapping), pool.numel(), seed)
        self.weights = {weight.name: weight for weight in weights}
        self.grad_scaling = grad_scaling
        self.grad_scale: torch.Tensor | None = None  # computed at the first backward
        self.info: dict = {}  # what convert() decided (discovery method, weights kept dense and why)
        self._cache: dict[str, torch.Tensor] | None = None
        self._cache_key: tuple | None = None
        self.mode = "lean"  # set_mode: generate each weight when used, or serve a cache of all of them
        self._hooked: int | None = None
        self._snapped: tuple | None = None  # (pool key, the pool on its grid, grid minus latent values)

    @property
    def pool(self) -> nn.Parameter:
        return self._detached if self._owner is None else getattr(self._owner, POOL_PARAM)

    @property
    def mapping(self) -> Mapping:
        return self.operator.mapping

    @property
    def seed(self) -> int:
        return self.operator.seed

    @property
    def size(self) -> int:
        return self.operator.slots

    def __repr__(self) -> str:
        return f"RPSPool(slots={self.size}, mapping={self.mapping.name}, seed={self.seed}, weights={len(self.weights)})"

    def __getstate__(self) -> dict:
        # The hook bookkeeping and the cache refer to objects of this process: a copy starts fresh.
        return {**self.__dict__, "_cache": None, "_cache_key": None, "_hooked": None, "_snapped": None}

    def _pool_for_autograd(self) -> torch.Tensor:
        """The pool weights are generated from: the Parameter, with the STABLE-RPS gradient hook
        attached once per Parameter object, read on the stored grid when the pool is quantized
        (straight-through while training, so the latent values can move by less than a step)."""
        pool = self.pool
        if self._hooked != id(pool) and pool.requires_grad:
            pool.register_hook(self._scale_gradient)
            self._hooked = id(pool)
        if not self.storage.quantized:
            return pool
        training = torch.is_grad_enabled() and pool.requires_grad
        if training and torch.compiler.is_compiling():
            return straight_through(self.storage, pool)
        # rounded once per pool version (an optimizer step makes a new one), not once per weight:
        # a forward reads the pool for every layer, and rounding it is many passes over it
        key = self._current_key()
        if self._snapped is None or self._snapped[0] != key:
            snapped = self.storage.snap(pool.detach())
            self._snapped = (key, snapped, snapped - pool.detach())
        return pool + self._snapped[2] if training else self._snapped[1]

    def resnap(self, slots: torch.Tensor) -> None:
        """Tell a quantized pool that its values changed in place at `slots` only (calibration's
        solves): the cached rounding is brought up to date where they lie, not redone for the
        whole pool at the next forward."""
        if not self.storage.quantized or self._snapped is None:
            return
        pool = self.pool.detach()
        _, snapped, delta = self._snapped
        for lo, hi in self.storage.resnap(pool, snapped, slots):
            torch.sub(snapped[lo:hi], pool[lo:hi], out=delta[lo:hi])
        self._snapped = (self._current_key(), snapped, delta)

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
        """The weight `name` as the pool generates it now.

        In cached mode, while no gradient is needed, it comes from the cache, which is rebuilt
        first when the pool changed (another Parameter, an in-place update, device or dtype);
        otherwise, and always in lean mode, it is generated now (differentiable in the pool).
        torch.compile and torch.export trace the generation in both modes: a graph that computes
        the weights from the pool stays right when the pool changes, where baked-in weights would
        not (for a graph with constant weights, export the model `densify` returns).
        """
        if self.mode == "cached" and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and self.pool.requires_grad):
            if self._cache is None or self._cache_key != self._current_key():
                self.materialize()
            return self._cache[name]
        return self.operator.generate(self._pool_for_autograd(), self.weights[name])

    def set_mode(self, mode: str) -> None:
        """"lean": every weight is generated when it is used, so the resident tensors are the pool,
        the dense tensors and the weights in use (the memory the budget promised). "cached": every
        weight is generated now and served from a cache, dense-model speed for dense-model memory."""
        self.mode = check_mode(mode)
        self.materialize() if mode == "cached" else self.clear_cache()

    def materialize(self) -> None:
        """Switch to cached mode and generate every weight now (fast inference)."""
        self.mode, self._cache = "cached", None  # the old cache's memory goes before the new one is made
        with torch.no_grad():
            pool = self._pool_for_autograd()
            self._cache = self.operator.generate_all(pool, self.weights.values())
        self._cache_key = self._current_key()

    def clear_cache(self) -> None:
        """Drop the cached weights (train(), or on demand); cached mode rebuilds them at the next
        use without gradients, lean mode never does."""
        self._cache = self._cache_key = None


def check_mode(mode: str) -> str:
    """`mode` if it is one of MODES (load checks it before touching the model)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def slot_grad_scale(pool: RPSPool) -> torch.Tensor:
    """STABLE-RPS per-slot gradient divisor: (sum of the scales of a slot's elements)^2 / count.

    It makes one SGD step move every weight by about lr times the mean sign-corrected gradient of
    the elements sharing its slot, whatever the scales and the pool's init.
    """
    weights, device = pool.weights.values(), pool.pool.device
    count = pool.operator.counts(weights, device)
    total = pool.operator.counts(weights, device, lambda weight: weight.scale)
    scale = torch.where(count > 0, total**2 / count.clamp(min=1), torch.ones_like(count))
    return scale.clamp(min=torch.finfo(torch.float32).tiny).float()
