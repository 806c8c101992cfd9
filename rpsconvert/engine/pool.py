"""RPSPool: the shared pool, the operator that generates weights from it, and its cache.

A pool lives in memory as it is stored (`storage`: integer codes with block scales, or a float
dtype; engine/storage.py) and generation reads the codes, so a model converted to a budget runs in
that budget and the model that runs is the model that is saved. Only while the pool is trained
does it exist as float values in the weights' dtype (the latent pool, read through the stored grid
with straight-through gradients); leaving training packs it back (`RPSPool.pack`).
"""

from __future__ import annotations

import torch
from torch import nn

from rpsconvert.engine.mapping import Mapping, RandomFold, get_mapping
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.storage import MixedStorage, PackedPool, PoolStorage, straight_through, validate

POOL_ATTR = "rps"  # the RPSPool object on the converted model's root (a plain attribute)
POOL_PARAM = "rps_pool"  # the pool Parameter, registered on the root (so never called by Sequential)
# The stored tensors of a packed pool by their file suffix: buffers on the root beside the (then
# empty) Parameter. Float ones are held as their bits in an integer dtype, so that `model.half()`
# or `.to(torch.bfloat16)`, which cast every float tensor, cannot round them.
POOL_BUFFERS = {"": "rps_pool_packed", ".scales": "rps_pool_scales"}
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
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
        storage: PoolStorage | MixedStorage | None = None,
        slots: int | None = None,
    ):
        # the pool's tensors by attribute name while no model holds them (install moves them there)
        self._detached: dict[str, torch.Tensor] | None = {POOL_PARAM: nn.Parameter(pool)}
        self.storage = storage or PoolStorage(pool.dtype)
        self._owner: nn.Module | None = None
        self.operator = PoolOperator(get_mapping(mapping), pool.numel() if slots is None else slots, seed)
        self.weights = {weight.name: weight for weight in weights}
        self.grad_scaling = grad_scaling
        self.grad_scale: torch.Tensor | None = None  # computed at the first backward
        self.info: dict = {}  # what convert() decided (discovery method, weights kept dense and why)
        self._cache: dict[str, torch.Tensor] | None = None
        self._cache_key: tuple | None = None
        self.mode = "lean"  # set_mode: generate each weight when used, or serve a cache of all of them
        self._hooked: int | None = None
        self._snapped: tuple | None = None  # (pool key, the pool on its grid, grid minus latent values)
        # (pool key, what every layer reads while the pool trains: the latent pool, or a quantized
        # one's grid values with the latent values' gradient, cut at its runs; one per pool version)
        self._reads: tuple | None = None
        self._cuts: tuple | None = None  # (layout, the slots where the runs layers read begin and end, or None)

    @classmethod
    def from_stored(
        cls, stored: dict[str, torch.Tensor], storage: PoolStorage | MixedStorage, slots: int, dtype: torch.dtype,
        mapping: str | Mapping, seed: int, weights: list[CompressedWeight],
    ) -> RPSPool:
        """A pool held packed, from the tensors a file stores (`load`): the codes are kept as they
        are read, and no float copy is made. Raises ValueError on tensors that are not such a pool."""
        validate(storage, stored, slots)
        pool = cls(torch.empty(0, dtype=dtype, device=stored[""].device), mapping, seed, weights, storage=storage, slots=slots)
        pool._detached.update({POOL_BUFFERS[suffix]: _as_bits(tensor) for suffix, tensor in stored.items()})
        if not storage.packs(dtype):
            pool.unpack()
        return pool

    @property
    def pool(self) -> nn.Parameter:
        """The pool Parameter: the float latent pool while it trains, empty while the pool is packed
        (it keeps the weights' dtype and device, and the optimizers that hold it keep working)."""
        return self._tensor(POOL_PARAM)

    @property
    def packed(self) -> bool:
        """Whether the pool is held as it is stored (codes and scales), not as float values."""
        return self._tensor(POOL_BUFFERS[""]) is not None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the pool holds, by attribute name (the Parameter, and the packed buffers)."""
        names = (POOL_PARAM, *POOL_BUFFERS.values())
        return {name: self._tensor(name) for name in names if self._tensor(name) is not None}

    def kept(self) -> list[torch.Tensor]:
        """What the pool keeps besides the model's parameters and buffers: the weights of cached
        mode, and a quantized latent pool's rounding while it trains."""
        reads = [] if self._reads is None or not self.storage.quantized else [self._reads[1]]
        held = [*(self._snapped or ())[1:], *(t.whole if isinstance(t, _Cut) else t for t in reads)]
        return [*(self._cache or {}).values(), *held]

    def _tensor(self, name: str) -> torch.Tensor | None:
        if self._owner is None:
            return self._detached.get(name)
        return (self._owner._parameters if name == POOL_PARAM else self._owner._buffers).get(name)

    def _set_buffer(self, name: str, tensor: torch.Tensor | None) -> None:
        if self._owner is None:
            self._detached.pop(name, None) if tensor is None else self._detached.update({name: tensor})
        elif tensor is None:
            self._owner._buffers.pop(name, None)
        else:
            self._owner.register_buffer(name, tensor)

    def stored(self) -> dict[str, torch.Tensor]:
        """The pool's tensors as a file stores them, by name suffix (`storage.tensors`)."""
        if not self.packed:
            return self.storage.encode(self.pool.detach())
        dtypes = {"": torch.uint8 if self.storage.quantized else self.storage.dtype, ".scales": self.storage.dtype}
        return {suffix: self._tensor(name).view(dtypes[suffix]) for suffix, name in POOL_BUFFERS.items() if self._tensor(name) is not None}

    def pack(self) -> None:
        """Hold the pool as it is stored and free the float latent pool and its rounding: eval(),
        set_mode(model, "lean"), and the end of convert, calibrate and recover do it. The codes are
        the latent pool's rounding, so the weights do not change. A pool whose storage is its
        compute dtype (a float32 pool of a float32 model) has nothing to pack and stays as it is."""
        latent = self.pool
        if self.packed or not self.storage.packs(latent.dtype):
            return
        for suffix, tensor in self.storage.encode(latent.detach()).items():
            self._set_buffer(POOL_BUFFERS[suffix], _as_bits(tensor))
        latent.data = torch.empty(0, dtype=latent.dtype, device=latent.device)
        latent.grad = None
        self._snapped = self._reads = None
        self.clear_cache()

    def unpack(self) -> None:
        """Make the pool a float latent pool in the weights' dtype, to train it: a forward with
        gradients in train mode does it by itself, as recover and calibrate do. It costs the
        dtype's bytes a slot, and a quantized pool's training forward keeps three more such vectors
        (its rounding, the difference and the straight-through pool), until `pack`."""
        if not self.packed:
            return
        latent = self.pool
        values = self.storage.decode(self.stored(), self.size)
        latent.data = values.to(dtype=latent.dtype, device=latent.device)
        for name in POOL_BUFFERS.values():
            self._set_buffer(name, None)
        self._snapped = self._reads = None
        self.clear_cache()

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
        return {**self.__dict__, "_cache": None, "_cache_key": None, "_hooked": None, "_snapped": None, "_reads": None}

    def _pool_for_autograd(self) -> torch.Tensor | PackedPool:
        """The pool weights are generated from: the packed codes, or the latent Parameter, with the
        STABLE-RPS gradient hook attached once per Parameter object, read on the stored grid when
        the pool is quantized (straight-through while training, so the latent values can move by
        less than a step)."""
        pool = self.pool
        if self.packed:
            if not (torch.is_grad_enabled() and pool.requires_grad and self._owner is not None and self._owner.training):
                return PackedPool(self.storage, self.stored(), self.size, pool.dtype)
            if torch.compiler.is_compiling():
                raise RuntimeError("a packed pool cannot start training inside torch.compile: call model.train() and run one forward first")
            self.unpack()  # a forward that can train the pool: it needs its float values
        if self._hooked != id(pool) and pool.requires_grad:
            pool.register_hook(self._scale_gradient)
            self._hooked = id(pool)
        training = torch.is_grad_enabled() and pool.requires_grad
        if training and torch.compiler.is_compiling():
            return straight_through(self.storage, pool) if self.storage.quantized else pool
        key = self._current_key()
        if not self.storage.quantized and not training:
            return pool
        # rounded once per pool version (an optimizer step makes a new one), not once per weight:
        # a forward reads the pool for every layer, and rounding it is many passes over it
        if self.storage.quantized and (self._snapped is None or self._snapped[0] != key):
            snapped = self.storage.snap(pool.detach())
            self._snapped = (key, snapped, snapped - pool.detach())
        if not training:
            return self._snapped[1]
        if self._reads is None or self._reads[0] != key:  # once per step, not once per layer
            self._reads = (key, self._cut(pool + self._snapped[2] if self.storage.quantized else pool))
        return self._reads[1]

    def _cut(self, pool: torch.Tensor) -> torch.Tensor | _Cut:
        """A pool being trained, cut where the runs RandomFold's layers read begin and end (on a
        GPU its kernel reads it whole)."""
        cuts = None if pool.is_cuda else self._run_cuts()
        return pool if cuts is None else _Cut(pool, cuts)

    def _run_cuts(self) -> list[int] | None:
        """Every slot where a run RandomFold's layers read begins or ends, 0 and the pool's size
        included, sorted (None for other mappings); kept per layout."""
        layout = tuple((w.offset, w.numel) for w in self.weights.values())
        if self._cuts is None or self._cuts[0] != layout:
            cuts = None
            if isinstance(self.mapping, RandomFold):
                runs = [(begin, begin + hi - lo) for w in self.weights.values() for lo, hi, begin in self.operator.fold_runs(w)]
                cuts = sorted({0, self.size, *(slot for run in runs for slot in run)})
            self._cuts = (layout, cuts)
        return self._cuts[1]

    def resnap(self, slots: torch.Tensor) -> None:
        """Tell a quantized pool that its values changed in place at `slots` only (calibration's
        solves): the cached rounding is brought up to date where they lie, not redone for the
        whole pool at the next forward."""
        if not self.storage.quantized or self._snapped is None:  # packing drops the rounding too
            return
        pool = self.pool.detach()
        _, snapped, delta = self._snapped
        for lo, hi in self.storage.resnap(pool, snapped, slots):
            torch.sub(snapped[lo:hi], pool[lo:hi], out=delta[lo:hi])
        self._snapped, self._reads = (self._current_key(), snapped, delta), None

    def _scale_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.grad_scaling:
            return grad
        if self.grad_scale is None or self.grad_scale.device != grad.device:
            self.grad_scale = slot_grad_scale(self).to(grad.device)
        return grad / self.grad_scale.to(grad.dtype)

    def _current_key(self) -> tuple:
        pool = self.pool
        return (id(pool), pool._version, pool.device, pool.dtype)

    def values(self) -> torch.Tensor | PackedPool:
        """What the weights are generated from now, without gradients: the packed codes, or the
        float pool (on its grid when quantized). `operator.generate` reads any piece of any weight
        from it."""
        with torch.no_grad():
            return self._pool_for_autograd()

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
        """"lean": every weight is generated when it is used, from the pool packed as it is stored,
        so the resident tensors are the stored pool, the dense tensors and the weight in use (the
        memory the budget promised). "cached": every weight is generated now and served from a
        cache, dense-model speed for dense-model memory."""
        self.mode = check_mode(mode)
        if mode == "cached":
            self.materialize()
        else:
            self.clear_cache()
            self.pack()

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


class _Cut:
    """A pool being trained, split once at every slot where a run its layers read begins or ends:
    each layer's run is then a piece of the split (or, below ratio 1, where runs overlap, the pieces
    it spans put together), so the backward assembles the pool's gradient once per forward, where
    slicing the pool would zero-fill a pool-sized gradient for every run (at 1/16 of
    all-MiniLM-L6-v2's bytes, 265 runs: a third of a recovery step). Any other index is read from
    the whole tensor."""

    def __init__(self, whole: torch.Tensor, cuts: list[int]):
        self.whole = whole
        self.first = {slot: i for i, slot in enumerate(cuts)}  # the piece each cut begins
        self.parts = whole.split([b - a for a, b in zip(cuts, cuts[1:])])

    dtype = property(lambda self: self.whole.dtype)
    device = property(lambda self: self.whole.device)
    requires_grad = property(lambda self: self.whole.requires_grad)

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice) and index.step is None:
            first, last = self.first.get(index.start or 0), self.first.get(index.stop)
            if first is not None and last is not None and first < last:
                return self.parts[first] if last == first + 1 else torch.cat(self.parts[first:last])
        return self.whole[index]


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor as its bits in an integer dtype of its size (POOL_BUFFERS); others as they are."""
    return tensor.view(_BITS[tensor.element_size()]) if tensor.is_floating_point() else tensor


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
