"""Sharded recovery (FSDP2): the student and the teacher split across the processes of a torchrun job.

Under DDP every process holds the whole student, its gradients, Adam's two moments and the whole
fp32 teacher. `recover(strategy="fsdp")` shards both models with `fully_shard` per repeated block
(`repeated_blocks`: a transformer's layers, a CNN's stages) and on the root, so each process holds
1/world of every dense tensor, gradient and Adam moment, and only the block running (and the one
FSDP2 prefetches) is gathered whole.

The RPS pool is one Parameter on the root that every compressed layer of every block reads. Sharded
with the root it would be gathered whole for the whole forward and backward anyway, so it is kept
out of FSDP (`ignored_params`) and replicated: every process holds it, and its gradient is averaged
over the processes (all_reduce, SUM then divided by the world size: gloo has no AVG) just before
each optimizer step. STABLE-RPS's per-slot scaling (the hook on the Parameter,
RPSPool._scale_gradient) divides each slot's gradient by a constant, so scaling each process's
gradient and averaging equals scaling the averaged (full) gradient. A quantized pool trains
straight-through as in a single process: the pool's code path is unchanged.

The caller's modules are never wrapped: fully_shard changes a module's class and parameters for
good. A twin of each is built on the meta device (no memory), sharded, filled from the caller's
tensors, whose storage is then freed; at the end the trained shards are gathered back into the
caller's tensors and the twins are dropped. The twin shares the caller's RPSPool object and pool
Parameter, so the pool trains in place.

The teacher can also be given as its safetensors files (`TeacherFiles`, or a path): its skeleton
is built on the meta device (from config.json, an architecture name, or the caller's), sharded
there, allocated, and each process reads only its share of every tensor from the files
(`shard_files`), so no process ever holds the whole teacher, not even before recovery starts.
"""

from __future__ import annotations

import copy
import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch
import torch.distributed as dist
from torch import nn

from rpsconvert.engine.modules import find_pool, is_converted
from rpsconvert.engine.pool import POOL_PARAM, RPSPool
from rpsconvert.errors import InputError
from rpsconvert.format.lazy_weights import SafetensorsFiles
from rpsconvert.format.manifest import MANIFEST_KEY
from rpsconvert.format.skeleton import file_keys, skeleton
from rpsconvert.quality.blocks import repeated_blocks

STRATEGIES = ("ddp", "fsdp")
SHARD_POOL_BYTES = 64 * 2**20  # shard_pool="auto" shards a latent pool from this size; not the default (docs/recovery.md)


def check_strategy(strategy: str) -> str:
    """`strategy` if recover() knows it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return strategy


@contextmanager
def torchrun_job() -> Iterator[bool]:
    """The process group of the torchrun job running this process, for the length of a recovery
    that a command starts (the CLI, whose models live on the CPU: gloo); yields whether there is a
    job (outside torchrun a recovery runs in the one process). At the end every process waits for
    the others (a barrier) before the group goes, so that none tears gloo down while another still
    gathers the models back.

    The barrier's work holds the collectives still in flight when it began (FSDP's all-gathers,
    DDP's all-reduces), whose tensors own Python objects, and the gloo thread that ran it frees it
    once it is done. A process that returns at once (every one but the writer) could reach the
    interpreter's exit first; the thread then took the GIL to free those tensors, and exiting there
    ended the process in std::terminate ("terminate called without an active exception": core
    dumps of rank 1 under load, 2 runs in 64). So the work is kept (`_FINAL_WORKS`) until the
    interpreter's own teardown, where the main thread frees it and gloo's thread only drops its
    reference.
    """
    if not dist.is_torchelastic_launched():
        yield False
        return
    dist.init_process_group("gloo")
    try:
        yield True
        final_barrier()
    finally:
        dist.destroy_process_group()


def final_barrier() -> None:
    """Wait for every process of the group before it is destroyed, keeping the barrier's work
    until the interpreter's teardown (see `torchrun_job`: a gloo thread freeing it at exit ended
    processes in std::terminate)."""
    barrier = dist.barrier(async_op=True)
    _FINAL_WORKS.append(barrier)
    barrier.wait()


_FINAL_WORKS: list = []  # the final barriers' works, freed by the interpreter's teardown


def device_mesh(device: torch.device):
    """The 1-D mesh of every process of the job, on `device`'s type (cpu with gloo, cuda with nccl)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("strategy='fsdp' needs torch.distributed: run under torchrun and call torch.distributed.init_process_group first")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shards_pool(pool: RPSPool, choice: bool | str) -> bool:
    """Whether recover(strategy="fsdp") shards `pool`: `choice`, or for "auto" whether the latent
    pool being trained (float, whatever its stored bits) holds at least SHARD_POOL_BYTES."""
    if choice != "auto":
        return choice
    return pool.pool.numel() * pool.pool.element_size() >= SHARD_POOL_BYTES


def pool_summary(pool: RPSPool, sharded: bool, world: int) -> str:
    """The choice shards_pool made, in one line (recover prints it unless quiet)."""
    size = f"{pool.pool.numel()} slots, {pool.pool.numel() * pool.pool.element_size()} bytes"
    if sharded:
        return f"strategy='fsdp': the pool ({size}) is sharded over {world} processes, gathered whole once a step"
    return f"strategy='fsdp': the pool ({size}) is replicated on each of {world} processes, its gradient all-reduced"


def block_names(model: nn.Module) -> list[str]:
    """The modules that get their own fully_shard: the repeated blocks of the compressed weights
    (of the parameters, for a model that is not converted)."""
    weights = find_pool(model).weights if is_converted(model) else dict(model.named_parameters())
    return repeated_blocks(model, weights)


def shard(module: nn.Module, mesh, blocks: list[str], *, forward_only: bool = False, pool_sharded: bool = False) -> nn.Module:
    """A sharded twin of `module` holding its values; `module`'s parameters are emptied (to
    `gather` them back), except a replicated pool Parameter, which the twin shares.

    The twin is deep-copied with every parameter and buffer replaced by a meta tensor (so the copy
    costs no memory), sharded and allocated (`_allocate`), and filled with this process's share of
    each tensor. With `pool_sharded` the pool Parameter is sharded with the root's group like any
    other (`_TwinPool`); otherwise it is kept out of FSDP and shared with `module`.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    pool = find_pool(module) if is_converted(module) else None
    latent = module._parameters.get(POOL_PARAM) if pool is not None and not pool_sharded else None  # the replicated pool
    memo: dict[int, object] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    if pool is not None:  # replicated: one RPSPool, reading the Parameter on its own (the caller's) root
        memo[id(pool)] = _TwinPool.of(pool) if pool_sharded else pool
    twin = copy.deepcopy(module, memo)
    if pool_sharded:
        memo[id(pool)]._owner = twin
        twin.register_forward_pre_hook(_renew_pool)  # after FSDP's, which registered first (prepend)
    placeholder = twin._parameters.get(POOL_PARAM) if latent is not None else None
    device = _allocate(twin, mesh, blocks, forward_only, ignored={placeholder} if placeholder is not None else None)
    if latent is not None:
        twin._parameters[POOL_PARAM] = latent  # the same Parameter: to_empty must not touch its values
    if pool_sharded and mesh.device_type == "cpu":
        twin.set_custom_reduce_scatter(_AllReduceScatter())
    with torch.no_grad():
        originals = dict(module.named_parameters())
        for name, param in twin.named_parameters():
            if param is latent:
                continue
            source = originals[name].detach().to(device)
            if isinstance(param, DTensor):  # this process's share, cut as FSDP2 cuts (dim 0, torch.chunk)
                param.to_local().copy_(distribute_tensor(source, mesh, param.placements, src_data_rank=None).to_local())
            else:
                param.copy_(source)
        originals = dict(module.named_buffers())
        for name, buffer in twin.named_buffers():
            buffer.copy_(originals[name])
        for param in module.parameters():
            if param is not latent:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    return twin


class _TwinPool(RPSPool):
    """The sharded twin's RPSPool when FSDP shards the pool: it reads the twin's pool Parameter
    (the whole pool while the root's group is gathered, from its pre-forward to the end of the
    backward: once a step, however many layers read it), where the caller's reads the caller's.

    It never packs: FSDP owns that Parameter's storage, and a packed pool empties it (every
    eval() of a quantized pool would). The caller's pool packs once the trained pool is gathered
    back into it.
    """

    @classmethod
    def of(cls, pool: RPSPool) -> _TwinPool:
        """A twin of `pool` sharing its mapping, weights and storage (its caches start empty); its
        owner is set once the model's twin exists."""
        twin = cls.__new__(cls)
        twin.__dict__.update(pool.__getstate__())
        return twin

    def pack(self) -> None:
        """Nothing: the pool stays float while FSDP holds it (see the class)."""


class _AllReduceScatter:
    """FSDP2's reduce-scatter of the root's gradients (a sharded pool's) on gloo, made an all_reduce
    in place on FSDP's own input buffer and a copy of this process's share (FSDP2's ReduceScatter
    interface: `allocate` and the call). gloo's reduce_scatter_tensor allocates 1.5 times its
    input beside it (314 MiB for BERT-base's 210 MiB pool at 1/2, measured) and takes twice an
    all_reduce's time (0.33 against 0.16 s), which made the sharded pool's peak 104 MiB higher than
    the replicated one's."""

    def allocate(self, size: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False) -> None:
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])


def _renew_pool(root: nn.Module, args: tuple) -> None:
    """A forward pre-hook on the twin's root, after FSDP's: FSDP2 all-gathers the pool into the
    same Parameter every time without autograd seeing a write (its version stays 0, measured),
    and RPSPool keeps a quantized pool's rounding and the pieces layers read per version, so the
    version is moved on: every forward reads the pool as gathered."""
    torch.autograd.graph.increment_version(root._parameters[POOL_PARAM])


def _allocate(twin: nn.Module, mesh, blocks: list[str], forward_only: bool, ignored: set | None = None) -> torch.device:
    """Wrap `twin` (its parameters on the meta device) with fully_shard per block and on the root,
    then allocate this process's shares (`to_empty`: uninitialized, every buffer too); the device
    they are on.

    The root of a model that is only run forward (the teacher) is resharded after its forward:
    FSDP2 keeps a root's parameters gathered for the backward that follows, which for a teacher
    never comes (BERT-base's word embeddings: 89 MiB held whole on every process).
    """
    from torch.distributed.fsdp import fully_shard

    for name in blocks:
        fully_shard(twin.get_submodule(name), mesh=mesh)
    fully_shard(twin, mesh=mesh, ignored_params=ignored, reshard_after_forward=True if forward_only else None)
    device = torch.device(mesh.device_type) if mesh.device_type == "cpu" else torch.device(mesh.device_type, torch.cuda.current_device())
    twin.to_empty(device=device)
    return device


@dataclass(frozen=True)
class TeacherFiles:
    """The teacher as its safetensors files, for recover(strategy="fsdp") to read straight into
    each process's shards (a plain path means `TeacherFiles(path)`): a Hugging Face directory
    (config.json with model.safetensors, or shards and model.safetensors.index.json), whose model
    is built as `from_pretrained` builds it, or one .safetensors state dict with its architecture
    (`arch`, such as "torchvision:resnet50") or its `skeleton`: the model with its parameters on
    the meta device, built under `rpsconvert.format.architectures.parameters_on_meta()`, which
    keeps its buffers real (`torch.device("meta")` puts them there too, which suits only files that
    store every buffer). The skeleton itself is left as it is (a copy is sharded).
    """

    path: Union[str, os.PathLike]
    arch: Union[str, dict, None] = None
    skeleton: nn.Module | None = None


def teacher_files(teacher) -> TeacherFiles | None:
    """`teacher` as TeacherFiles (a path becomes one), or None for a model."""
    if isinstance(teacher, (str, os.PathLike)):
        return TeacherFiles(teacher)
    return teacher if isinstance(teacher, TeacherFiles) else None


def shard_files(source: TeacherFiles, mesh) -> nn.Module:
    """The teacher of `source`, sharded as `shard` shards a teacher, each process's shares read
    from the files: the skeleton is built (or copied) on the meta device, sharded and allocated,
    and every parameter gets the elements of its share (FSDP2 cuts dim 0 into torch.chunk's
    pieces, so a share of a row-major tensor is one range of its elements: the first rank's rows
    are ceil(rows / world), the last may have fewer, or none), in the skeleton's dtype. Buffers
    keep the skeleton's values unless the files store them. A tensor the files lack, or store in
    another shape, is one InputError line.
    """
    path = Path(source.path)
    files = SafetensorsFiles.open(path)
    if MANIFEST_KEY in files.metadata:
        raise InputError(f"{path} is an rpsconvert checkpoint: the teacher is the original model, give its files")
    if source.skeleton is not None:
        if any(p.device.type != "meta" for p in source.skeleton.parameters()):
            raise InputError("TeacherFiles' skeleton must have its parameters on the meta device: build it under rpsconvert.format.architectures.parameters_on_meta()")
        twin = copy.deepcopy(source.skeleton)
    else:
        twin = skeleton(path, source.arch, files)[0]
    made = dict(twin.named_buffers())  # real (computed at init); to_empty replaces them with empty ones
    keys = file_keys(twin.state_dict(keep_vars=True), twin, files)
    _allocate(twin, mesh, block_names(twin), forward_only=True)
    ties: dict[int, list[str]] = {}
    for name, param in twin.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    params = dict(twin.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for names in ties.values():
            key = next((keys[name] for name in names if name in keys), None)
            if key is None:
                raise InputError(f"{path} does not fit the teacher: it lacks {names[0]}")
            _read_share(files, key, params[names[0]], mesh, path)
        for name, buffer in twin.named_buffers():
            if name in keys:
                _check_shape(files, keys[name], buffer, path)
                buffer.copy_(files.tensor(keys[name]))
            elif made[name].device.type == "meta":
                raise InputError(f"{path} does not store the teacher's buffer {name}, and the skeleton's is on the meta device: build the skeleton under parameters_on_meta(), which keeps buffers real")
            else:
                buffer.copy_(made[name])
    return twin


def _read_share(files: SafetensorsFiles, key: str, param: torch.Tensor, mesh, path: Path) -> None:
    """Read this process's share of `param` (a DTensor sharded on dim 0, or a whole tensor) from
    the files' tensor `key`."""
    from torch.distributed.tensor import DTensor

    _check_shape(files, key, param, path)
    local, lo = param, 0
    if isinstance(param, DTensor):
        local, rows = param.to_local(), param.shape[0]
        lo = min(mesh.get_local_rank() * -(-rows // mesh.size()), rows) * (param.numel() // rows)
    local.copy_(files.read(key, lo, lo + local.numel()).view(local.shape))


def _check_shape(files: SafetensorsFiles, key: str, tensor: torch.Tensor, path: Path) -> None:
    """Refuse a files' tensor `key` whose shape is not `tensor`'s (a DTensor's global one)."""
    shape = tuple(files.entries[key].shape)
    if shape != tuple(tensor.shape):
        raise InputError(f"{path} does not fit the teacher: {key} has shape {shape}, the teacher {tuple(tensor.shape)}")


def gather(twin: nn.Module, module: nn.Module) -> None:
    """Put the twin's values back into `module`'s (emptied) parameters and buffers, whole on every
    process: a collective, every process calls it in the same order."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        originals = dict(module.named_parameters())
        for name, param in twin.named_parameters():
            if param is originals[name]:  # the shared pool Parameter
                continue
            full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            originals[name].data = full.detach().clone().to(originals[name].device)
            # .data= leaves the version, by which the caller's RPSPool keys the pieces of its pool
            # that its layers read: a sharded pool's new values must not be read as the old ones
            torch.autograd.graph.increment_version(originals[name])
        originals = dict(module.named_buffers())
        for name, buffer in twin.named_buffers():
            originals[name].copy_(buffer)


def average_pool_gradient(param: nn.Parameter):
    """An optimizer step pre-hook averaging the replicated pool's gradient over the processes:
    what DDP and FSDP do for the parameters they manage (the mean of the processes' shares of the
    global batch), after STABLE-RPS's scaling, which is linear per slot and so commutes with it."""
    world = dist.get_world_size()

    def hook(optimizer, args, kwargs) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world)

    return hook


def state_dicts(twin: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The sharded twin's and its optimizer's state, keyed by parameter name, each sharded tensor
    as this process's share (a DTensor), for torch.distributed.checkpoint to save, or to load into.

    torch's get_state_dict, because the optimizer's own state_dict() keys its state by the
    parameter's position, which DCP cannot match across processes. An optimizer that has not
    stepped yet gets its state by a step at learning rate 0 on zero gradients (a collective: the
    pool's gradient is averaged), which moves nothing: what is loaded into it replaces it all.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(twin, optimizer)


def load_state_dicts(twin: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Put what `state_dicts` gave (as saved and loaded back) into the twin and its optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(twin, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
