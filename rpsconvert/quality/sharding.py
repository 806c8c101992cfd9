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
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from rpsconvert.engine.modules import find_pool, is_converted
from rpsconvert.engine.pool import POOL_PARAM
from rpsconvert.quality.blocks import repeated_blocks

STRATEGIES = ("ddp", "fsdp")


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
    """
    if not dist.is_torchelastic_launched():
        yield False
        return
    dist.init_process_group("gloo")
    try:
        yield True
        dist.barrier()
    finally:
        dist.destroy_process_group()


def device_mesh(device: torch.device):
    """The 1-D mesh of every process of the job, on `device`'s type (cpu with gloo, cuda with nccl)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("strategy='fsdp' needs torch.distributed: run under torchrun and call torch.distributed.init_process_group first")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def block_names(model: nn.Module) -> list[str]:
    """The modules that get their own fully_shard: the repeated blocks of the compressed weights
    (of the parameters, for a model that is not converted)."""
    weights = find_pool(model).weights if is_converted(model) else dict(model.named_parameters())
    return repeated_blocks(model, weights)


def shard(module: nn.Module, mesh, blocks: list[str], *, forward_only: bool = False) -> nn.Module:
    """A sharded twin of `module` holding its values; `module`'s parameters are emptied (to
    `gather` them back) except the pool Parameter, which the twin shares.

    The root of a model that is only run forward (the teacher) is resharded after its forward:
    FSDP2 keeps a root's parameters gathered for the backward that follows, which for a teacher
    never comes (BERT-base's word embeddings: 89 MiB held whole on every process).

    The twin is deep-copied with every parameter and buffer replaced by a meta tensor (so the copy
    costs no memory), wrapped with fully_shard per block and on the root, allocated (`to_empty`)
    and filled with this process's share of each tensor.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    pool = find_pool(module) if is_converted(module) else None
    latent = module._parameters.get(POOL_PARAM) if pool is not None else None
    memo: dict[int, object] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    if pool is not None:
        memo[id(pool)] = pool  # one RPSPool: it reads the Parameter registered on its own (the caller's) root
    twin = copy.deepcopy(module, memo)
    for name in blocks:
        fully_shard(twin.get_submodule(name), mesh=mesh)
    placeholder = twin._parameters.get(POOL_PARAM) if latent is not None else None
    ignored = {placeholder} if placeholder is not None else None
    fully_shard(twin, mesh=mesh, ignored_params=ignored, reshard_after_forward=True if forward_only else None)
    device = mesh.device_type if mesh.device_type == "cpu" else torch.device(mesh.device_type, torch.cuda.current_device())
    twin.to_empty(device=device)
    if latent is not None:
        twin._parameters[POOL_PARAM] = latent  # the same Parameter: to_empty must not touch its values
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
