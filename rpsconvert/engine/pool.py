"""RPSPool: the shared pool Parameter, the operator that generates weights from it, and its cache.

The pool trains and generates in the weights' dtype; a checkpoint stores it in `storage_dtype`
(fp16/bf16 halve the file), and convert keeps its values representable in that dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from rpsconvert.engine.mapping import Mapping, get_mapping
from rpsconvert.engine.operator import CompressedWeight, PoolOperator

POOL_ATTR = "rps"  # the RPSPool object on the converted model's root (a plain attribute)
POOL_PARAM = "rps_pool"  # the pool Parameter, registered on the root (so never called by Sequential)


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
        storage_dtype: torch.dtype | None = None,
    ):
        self._detached: nn.Parameter | None = nn.Parameter(pool)
        self.storage_dtype = storage_dtype or pool.dtype
        self._owner: nn.Module | None = None
        self.operator = PoolOperator(get_mapping(mapping), pool.numel(), seed)
        self.weights = {weight.name: weight for weight in weights}
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
        return {**self.__dict__, "_cache": None, "_cache_key": None, "_hooked": None}

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
        """The weight `name` as the pool generates it now (from the cache when it is valid)."""
        if self._cache is not None and self._cache_key == self._current_key():
            if not (torch.is_grad_enabled() and self.pool.requires_grad):
                return self._cache[name]
        return self.operator.generate(self._pool_for_autograd(), self.weights[name])

    def materialize(self) -> None:
        """Generate every weight once and reuse it until the pool changes (fast inference)."""
        with torch.no_grad():
            self._cache = None
            self._cache = {name: self.weight(name) for name in self.weights}
        self._cache_key = self._current_key()

    def clear_cache(self) -> None:
        self._cache = None


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
