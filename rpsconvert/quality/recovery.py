"""Recovery by distillation: a short fine-tune that brings a compressed model back to its original.

The original model is the teacher: its outputs on unlabeled inputs are the targets, so no labels
are needed and the student learns the original's whole output distribution, not only its argmax.
The pool and every dense tensor (biases, norms) are trained with Adam; the median layer's scale is 1
(see projection.layer_scales), so one learning rate suits both, and the same loop
fine-tunes a model that is not RPS-converted at all (a pruned or low-rank baseline).

It runs unchanged under torchrun: every process passes the same global batches, keeps its share,
DistributedDataParallel averages the gradients, so the result equals a single-process run with the
same global batch.
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Literal, Union

import torch
import torch.distributed
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from rpsconvert.engine.modules import find_pool, is_converted
from rpsconvert.quality import sharding
from rpsconvert.quality.blocks import repeated_blocks
from rpsconvert.quality.batches import Batch, cycle, device_of, eval_mode, is_logits, outputs, process_group, run, shard, size, to_device
from rpsconvert.quality.fidelity import Fidelity, fidelity, paired_outputs
from rpsconvert.quality.resume import Checkpointer, fidelity_from_dict, fidelity_to_dict
from rpsconvert.quality.sharding import TeacherFiles

Loss = Union[str, Callable[[object, object], torch.Tensor]]
LOSSES = ("auto", "kl", "mse", "cosine")
DEFAULT_LR = 3e-3  # where lr="auto" starts its walk: the best fixed rate on models trained here (docs/recovery.md)
LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # the rates lr="auto" tries (half decades)


@dataclass
class RecoveryHistory:
    """What recover() did: the loss at every step, and fidelity on the held-out data."""

    loss: list[float] = field(default_factory=list)  # global mean loss of each step
    lr: list[float] = field(default_factory=list)
    evals: list[tuple[int, Fidelity]] = field(default_factory=list)  # (steps done, fidelity)
    heldout_loss: list[float] = field(default_factory=list)  # the distillation loss at each eval
    before: Fidelity | None = None
    after: Fidelity | None = None  # of the parameters kept (the best evaluated ones)
    best_step: int | None = None
    stopped_early: bool = False
    lr_probe: list[tuple[float, float]] = field(default_factory=list)  # lr="auto": (rate, loss) of each trial
    probe_steps: int = 0  # lr="auto": the steps its trials took that the run did not keep
    pool_sharded: bool | None = None  # strategy="fsdp" on a converted model: whether the pool was sharded (recover's shard_pool)

    @property
    def steps(self) -> int:
        return len(self.loss)


def distillation_loss(output, target_output, loss: Loss = "auto") -> torch.Tensor:
    """How far the student's output is from the teacher's, averaged over the output tensors.

    "kl": KL(teacher || student) of the softmax over the last dimension, per row;
    "mse": squared error relative to the teacher's mean square (scale-free, so tensors of any size
    weigh alike); "cosine": 1 - cosine of the output vectors; "auto": KL for classifier logits
    (outputs named like logits, or unnamed (batch, classes) matrices), relative MSE for the rest
    (embeddings, hidden states). A callable gets (output, target_output) and returns the loss.
    """
    if callable(loss):
        return loss(output, target_output)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)} or pass a function")
    terms = []
    for path, out, target in paired_outputs(output, target_output):
        kind = loss if loss != "auto" else ("kl" if is_logits(path, target) else "mse")
        if kind == "kl":
            rows = target.shape[-1]
            terms.append(
                F.kl_div(
                    F.log_softmax(out.float().reshape(-1, rows), -1),
                    F.log_softmax(target.float().reshape(-1, rows), -1),
                    log_target=True,
                    reduction="batchmean",
                )
            )
        elif kind == "mse":
            terms.append((out.float() - target.float()).square().mean() / _global_mean(target.float().square()))
        else:
            terms.append((1 - F.cosine_similarity(out.float(), target.float(), dim=-1)).mean())
    if not terms:
        raise ValueError("the model returns no floating-point tensor to distill")
    return torch.stack(terms).mean()


class _BlockOutputs:
    """Forward hooks on the repeated blocks of the student and the teacher (none unless `hidden`):
    the outputs of one training step's forwards (`start` to `loss`), and the relative MSE between
    them, averaged over the blocks. Evaluations in between record nothing."""

    def __init__(self, model: nn.Module, teacher: nn.Module, hidden: bool):
        weights = find_pool(model).weights if is_converted(model) else dict(model.named_parameters())
        names = repeated_blocks(model, weights) if hidden else []
        self.outputs: dict[str, list] = {"model": [], "teacher": []}
        self.recording = False
        modules = {"model": dict(model.named_modules()), "teacher": dict(teacher.named_modules())}
        self.handles = [
            modules[side][name].register_forward_hook(partial(self._record, side)) for side in modules for name in names if name in modules[side]
        ]

    def _record(self, side: str, module: nn.Module, args: tuple, output) -> None:
        if self.recording:
            self.outputs[side].append(output)

    def start(self) -> None:
        self.recording = True

    def loss(self) -> torch.Tensor | float:
        pairs = list(zip(self.outputs["model"], self.outputs["teacher"]))
        self.recording = False
        for recorded in self.outputs.values():
            recorded.clear()
        return sum(distillation_loss(ours, theirs, "mse") for ours, theirs in pairs) / len(pairs) if pairs else 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the global batch (all processes), a constant for autograd."""
    _, world = process_group()
    total = torch.stack([x.detach().sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)])
    if world > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).clamp(min=torch.finfo(x.dtype).tiny)


def recover(
    model: nn.Module,
    teacher: nn.Module | str | os.PathLike | TeacherFiles,
    data: Iterable[Batch],
    *,
    steps: int,
    lr: float | Literal["auto"] = "auto",
    loss: Loss = "auto",
    eval_data: Iterable[Batch] | None = None,
    inputs: Callable[[Batch], Batch] | None = None,
    labels: Callable[[Batch], torch.Tensor] | None = None,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    eval_every: int | None = None,
    patience: int = 3,
    warmup: float = 0.05,
    hidden: bool = False,
    quiet: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    resume: bool = False,
    strategy: Literal["ddp", "fsdp"] = "ddp",
    shard_pool: bool | Literal["auto"] = False,
    dropout: bool = False,
) -> RecoveryHistory:
    """Fine-tune `model` in place to reproduce `teacher` (the original) on the inputs of `data`.

    Distillation needs no labels: the converted model learns the original's outputs. Adam after a
    linear warmup, then cosine decay to zero; with `eval_data`, training stops early once the
    held-out loss stops improving and the best evaluated parameters are kept, so recovery never
    returns a model worse than it got. BatchNorm layers stay in eval mode: they keep the teacher's
    running statistics, which a few small distillation batches would overwrite (a pretrained
    MobileNetV2 lost its ImageNet statistics that way). Works under torchrun (DistributedDataParallel): every
    process passes the same global batches and takes its share of each.

    Args:
        model: the converted model (trained in place).
        teacher: the original model, unchanged; with strategy="fsdp" also its safetensors
            files (`TeacherFiles`, or the path of a Hugging Face directory), which each process
            reads only its shares of, so that none ever holds the whole teacher
            (quality/sharding.py).
        data: a list or DataLoader of batches (tensor, tuple or dict), cycled for `steps` steps.
        steps: optimizer steps.
        lr: Adam's peak learning rate, or "auto" (the default): the run's first steps (a tenth
            of `steps`, 3 to 50) are tried at rates of LR_GRID, from DEFAULT_LR towards the better
            side, and the trial with the lowest loss on `eval_data` (or on batches it did not train
            on) is kept as the run's first steps. A pretrained model a few collisions away from
            its original wants a rate 100x smaller than a model far from it, and no single
            default suits both (docs/recovery.md). The other trials cost 1 to 7 times those steps
            (`RecoveryHistory.probe_steps`, said on the progress display); pass a number to skip them.
        loss: "auto" (KL on logits, relative MSE elsewhere), "kl", "mse" or "cosine".
        eval_data: held-out batches, never the training ones: fidelity and the distillation loss
            are measured on them every `eval_every` steps (default: a tenth of the steps).
        inputs: picks the model's input out of a batch that also holds labels.
        labels: picks hard labels, adding a cross-entropy term on the first logits (optional).
        trainable: `trainable(name, parameter)` chooses what is trained (default: every parameter
            that requires grad: the pool and the dense tensors).
        eval_every: steps between evaluations.
        patience: evaluations without a 0.1 % gain in the held-out loss before stopping (without
            `eval_data` the stop watches the training loss).
        warmup: fraction of the steps spent warming the learning rate up.
        hidden: also distill every block's output (`repeated_blocks`: a transformer's layers, a
            CNN's stages), as TinyBERT and BRECQ do, with relative MSE, added to the output's loss.
        quiet: hide the progress bar (shown on stderr).
        checkpoint: a file where the whole state of the run is saved (atomically) every
            `checkpoint_every` steps and every `checkpoint_seconds` seconds (default: at every
            evaluation), so that an interrupted run can be resumed (quality/resume.py).
        resume: continue the run saved in `checkpoint` (same model, data and `steps`): with the
            same batches, seed and thread count the result equals an uninterrupted run's.
        strategy: under torchrun, "ddp" (every process holds both models whole) or "fsdp" (both
            sharded with FSDP2 per repeated block: quality/sharding.py); the models come back whole
            on every process. Its `checkpoint` is a directory where every process writes its shares
            (torch.distributed.checkpoint; quality/resume.py).
        shard_pool: with strategy="fsdp", whether the pool is sharded too (each process holds
            1/world of its Adam moments and of its reduced gradient, and gathers it whole once a
            step) or replicated (each holds all of it, its gradient all-reduced: the default);
            "auto" shards a pool of at least sharding.SHARD_POOL_BYTES. Measured at BERT-base size
            (docs/recovery.md), sharding lowered the peak for a 52 MiB pool and raised it for a 210
            MiB one, so the default stays replicated until the rule is measured right.
            `RecoveryHistory.pool_sharded` says which.
        dropout: keep the student's dropout on while it distills. Off by default: the teacher runs
            in eval mode, so a student with dropout chases outputs it cannot produce and its
            gradient carries the dropout's noise. Pretrained all-MiniLM-L6-v2 at 1/8 of the bytes
            (lr 3e-4, 40 steps): the first step's loss 0.098 with dropout, 0.053 without; held-out
            embedding cosine 0.9502 -> 0.9487 with, -> 0.9509 without (docs/recovery.md).

    Returns:
        A RecoveryHistory: the loss per step, fidelity before and after, the steps taken.

    Raises:
        TypeError: `data` is one tensor or dict rather than a sequence of batches.
        ValueError: `steps` < 1, an `lr` that is neither positive nor "auto", an unknown `loss`, or
            nothing to train.

    Example:
        >>> history = recover(small, model, train_batches, steps=1000, eval_data=heldout_batches)
        >>> print(history.before.summary(), "->", history.after.summary())
    """
    if isinstance(data, (torch.Tensor, dict)):
        raise TypeError("data must be a list or DataLoader of batches: split a tensor into a list first, e.g. list(x.split(32))")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if lr != "auto" and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number or 'auto', got {lr!r}")
    sharding.check_strategy(strategy)
    if shard_pool not in (True, False, "auto"):
        raise ValueError(f"shard_pool must be True, False or 'auto', got {shard_pool!r}")
    files = sharding.teacher_files(teacher)
    if files is not None and strategy != "fsdp":
        raise ValueError("a teacher given as its files is read into its shards: pass strategy='fsdp' (under torchrun), or load the teacher and pass the model")
    pool = find_pool(model) if is_converted(model) else None
    if pool is not None:
        pool.unpack()  # trained as float values, packed back into its stored form at the end
    if not any(p.requires_grad and (trainable is None or trainable(n, p)) for n, p in model.named_parameters()):
        raise ValueError("nothing to train: no parameter requires grad (or the trainable filter kept none)")
    rank, world = process_group()
    device = device_of(model)
    callers = None  # strategy="fsdp": the caller's models, while their sharded twins train
    pool_sharded = None
    if strategy == "fsdp":
        mesh = sharding.device_mesh(device)
        callers = (model, teacher if files is None else None)
        if pool is not None:
            pool_sharded = sharding.shards_pool(pool, shard_pool)
            if not quiet and rank == 0:
                Console(stderr=True).print(sharding.pool_summary(pool, pool_sharded, world), soft_wrap=True)
        model = sharding.shard(model, mesh, sharding.block_names(model), pool_sharded=bool(pool_sharded))
        if files is None:
            teacher = sharding.shard(teacher, mesh, sharding.block_names(teacher), forward_only=True)
        else:
            teacher = sharding.shard_files(files, mesh)
    params = [p for n, p in model.named_parameters() if p.requires_grad and (trainable is None or trainable(n, p))]
    net = _distributed(model, device) if world > 1 and callers is None else model
    objective = _Objective(teacher, loss, inputs, labels, _BlockOutputs(model, teacher, hidden), device, rank, world)
    warm = max(1, round(warmup * steps))
    eval_every = eval_every or max(1, steps // 10)
    history = RecoveryHistory()
    best_value, best_state = math.inf, None
    saver = None
    if checkpoint is not None:
        saver = Checkpointer(checkpoint, checkpoint_every or (None if checkpoint_seconds else eval_every), checkpoint_seconds, sharded=callers is not None)
    elif resume:
        raise ValueError("resume=True needs the checkpoint file to resume from: pass checkpoint=PATH")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=quiet or rank != 0,
        transient=False,
        console=Console(stderr=True),
    )
    def advance(state: _State, step: int, batch: Batch, task) -> bool:
        """Step `step` of the run (or of a trial) in `state`; True once the run should stop."""
        record = state.history
        record.loss.append(objective.step(net, batch, state.optimizer))
        record.lr.append(state.schedule.get_last_lr()[0])
        state.schedule.step()
        latest = record.evals[-1][1] if record.evals else None
        progress.update(task, advance=1, status=_status(record.loss[-1], latest))
        if step % eval_every and step != steps:
            return False
        if eval_data is not None:
            latest = fidelity(model, teacher, eval_data, inputs=inputs)
            record.evals.append((step, latest))
            record.heldout_loss.append(heldout_loss(model, teacher, eval_data, loss, inputs))
            value_now = record.heldout_loss[-1]
        else:
            value_now = sum(record.loss[-eval_every:]) / len(record.loss[-eval_every:])
        if value_now < state.best_value * (1 - 1e-3):
            state.best_value, state.stale = value_now, 0
            if eval_data is not None:
                state.best_state, record.best_step = _snapshot(model), step
        else:
            state.stale += 1
        progress.update(task, status=_status(record.loss[-1], latest))
        record.stopped_early = state.stale >= patience and step != steps
        return record.stopped_early

    def fresh(rate: float, record: RecoveryHistory) -> _State:
        optimizer = torch.optim.Adam(params, lr=rate)
        if callers is not None and pool is not None and any(p is pool.pool for p in params):
            optimizer.register_step_pre_hook(sharding.average_pool_gradient(pool.pool))
        return _State(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps, warm)), record, best_value, best_state)

    try:
        with _distillation_modes(model, teacher, dropout), progress:
            if resume:
                state = fresh(DEFAULT_LR, history)  # then the run's own rate, schedule and place
                if callers is None:
                    saved = saver.load(steps)
                    model.load_state_dict(saved["model"])
                    state.optimizer.load_state_dict(saved["optimizer"])
                else:  # read into this process's shares
                    model_state, optimizer_state = sharding.state_dicts(model, state.optimizer)
                    saved = saver.load(steps, {"model": model_state, "optimizer": optimizer_state, "best_state": _snapshot(model)})
                    sharding.load_state_dicts(model, state.optimizer, saved["model"], saved["optimizer"])
                state.history = RecoveryHistory(
                    loss=saved["loss"], lr=saved["lr"], heldout_loss=saved["heldout_loss"], best_step=saved["best_step"],
                    evals=[(s, fidelity_from_dict(f)) for s, f in saved["evals"]], before=fidelity_from_dict(saved["before"]),
                    lr_probe=[tuple(trial) for trial in saved.get("lr_probe", [])],  # none in states saved before lr="auto"
                    probe_steps=saved.get("probe_steps", 0),
                )
                state.schedule.load_state_dict(saved["schedule"])
                state.best_value, state.best_state, state.stale = saved["best_value"], saved["best_state"], saved["stale"]
                torch.set_rng_state(saved["rng"])
            else:
                if eval_data is not None:
                    history.before = fidelity(model, teacher, eval_data, inputs=inputs)
                    history.evals.append((0, history.before))
                    history.heldout_loss.append(heldout_loss(model, teacher, eval_data, loss, inputs))
                    best_value, best_state, history.best_step = history.heldout_loss[-1], _snapshot(model), 0
                if lr == "auto":
                    state = _probe_rates(model, data, eval_data, _probe_steps(steps), fresh, history, advance, progress, objective)
                    if not quiet and rank == 0:
                        progress.print(_probe_summary(state.history, steps))
                else:
                    state = fresh(lr, history)
            history = state.history
            start = history.steps
            task = progress.add_task("recovering", total=steps, completed=start, status=_status(None, history.before))
            batches = cycle(data)
            for _ in range(start):  # the batches the saved run (or the kept trial) has used
                next(batches)
            for step in range(start + 1, steps + 1):
                if history.stopped_early:
                    break
                if saver and (rank == 0 or saver.sharded) and saver.due(step - 1, steps):
                    model_state, optimizer_state = (
                        (model.state_dict(), state.optimizer.state_dict()) if callers is None else sharding.state_dicts(model, state.optimizer)
                    )
                    saver.save({
                        "step": step - 1, "steps": steps, "model": model_state, "optimizer": optimizer_state,
                        "schedule": state.schedule.state_dict(), "rng": torch.get_rng_state(), "best_value": state.best_value,
                        "best_state": state.best_state, "stale": state.stale, "best_step": history.best_step, "loss": history.loss,
                        "lr": history.lr, "heldout_loss": history.heldout_loss, "before": fidelity_to_dict(history.before),
                        "evals": [(s, fidelity_to_dict(f)) for s, f in history.evals], "lr_probe": history.lr_probe,
                        "probe_steps": history.probe_steps,
                    })
                advance(state, step, next(batches), task)
    finally:
        objective.taps.remove()
    best_state = state.best_state
    if best_state is not None:
        model.load_state_dict(best_state)
        history.after = next(f for s, f in history.evals if s == history.best_step)
    if callers is not None:
        for twin, caller in zip((teacher, model), callers[::-1]):
            if caller is not None:  # a teacher read from its files has no caller's model to fill
                sharding.gather(twin, caller)
    if pool is not None:
        pool.pack()
    history.pool_sharded = pool_sharded
    return history


@dataclass
class _Objective:
    """One distillation step: the teacher's outputs, the student's loss against them (plus the
    block outputs' and the labels' terms), the gradient and the optimizer's step."""

    teacher: nn.Module
    loss: Loss
    inputs: Callable[[Batch], Batch] | None
    labels: Callable[[Batch], torch.Tensor] | None
    taps: _BlockOutputs
    device: torch.device
    rank: int
    world: int

    def step(self, net: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> float:
        """Trains on `batch`; returns the loss over the global batch (all processes)."""
        x = shard(to_device(self.inputs(batch) if self.inputs else batch, self.device), self.rank, self.world)
        self.taps.start()
        with torch.no_grad():
            target = run(self.teacher, x)
        output = run(net, x)
        value = distillation_loss(output, target, self.loss) + self.taps.loss()
        if self.labels is not None:
            value = value + _label_loss(output, shard(to_device(self.labels(batch), self.device), self.rank, self.world))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return _global_mean(value.detach()).item()


@contextmanager
def _distillation_modes(model: nn.Module, teacher: nn.Module, dropout: bool) -> Iterator[None]:
    """The teacher in eval mode; the student's root in train mode (it tells a converted model's
    pool that it trains), its BatchNorm layers in eval mode, keeping the teacher's running
    statistics (see recover's docstring), and, unless `dropout`, every other module below the root
    in eval mode too, so that the student computes the function the teacher computes: dropout in
    the student alone made the target one it cannot reach and the gradient noisy (recover's
    `dropout`). Afterwards every module as it was."""
    with eval_mode(model, teacher):  # which puts every module back as it was
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
            elif not dropout and module is not model:
                module.training = False  # Hugging Face attention reads its own flag, not its Dropout's
        yield


def _probe_steps(steps: int) -> int:
    """Steps of each rate's trial: a tenth of the run, at least 3 (fewer is noise) and at most 50."""
    return min(steps, max(3, min(50, steps // 10)))


@dataclass
class _State:
    """A recovery run between two steps: its optimizer, its schedule, what it did so far, and the
    early stop's bookkeeping (each trial of lr="auto" is one, and the kept trial becomes the run)."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    history: RecoveryHistory
    best_value: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0


def _probe_rates(
    model: nn.Module,
    data: Iterable[Batch],
    eval_data: Iterable[Batch] | None,
    steps: int,
    fresh: Callable[[float, RecoveryHistory], _State],
    history: RecoveryHistory,
    advance: Callable[[_State, int, Batch, object], bool],
    progress: Progress,
    objective: _Objective,
) -> _State:
    """lr="auto": the run's first `steps` steps tried at rates of LR_GRID, walking from DEFAULT_LR
    towards the side that does better until the loss rises again (the loss is close to unimodal in
    the log of the rate).

    Each trial starts from the model and the random generator as received and takes the run's own
    first steps (its batches, its warmup, its evaluations), then measures the distillation loss on
    `eval_data` (without it, on the 8 batches that follow, which no trial trains on). The best
    trial is kept: the model, the optimizer, the schedule and the generator continue from where it
    ended, so the run is the run an explicit `lr=` would make, and only the other trials' steps are
    spent on the choice. Returns that trial's state, every trial's (rate, loss) in its history.
    """
    start = _snapshot(model)
    batches = cycle(data)
    used = [next(batches) for _ in range(steps)]
    measure_on = eval_data if eval_data is not None else [next(batches) for _ in range(8)]
    devices = [objective.device] if objective.device.type == "cuda" else []
    trials: dict[float, float] = {}
    best: tuple[float, _State, dict[str, torch.Tensor], tuple] | None = None  # loss, state, parameters, generator
    task = progress.add_task("choosing lr", total=None, status="")

    def trial(i: int) -> float:
        nonlocal best
        rate = LR_GRID[i]
        if rate not in trials:
            with torch.random.fork_rng(devices=devices):
                state = fresh(rate, copy.deepcopy(history))
                for step, batch in enumerate(used, 1):
                    if advance(state, step, batch, task):
                        break
                value = heldout_loss(model, objective.teacher, measure_on, objective.loss, objective.inputs)
                trials[rate] = value if math.isfinite(value) else math.inf  # a rate that diverged is the worst
                if best is None or trials[rate] < best[0]:
                    best = (trials[rate], state, _snapshot(model), (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]))
            model.load_state_dict(start)
            progress.update(task, status="  ".join(f"{r:g}: {v:.4g}" for r, v in trials.items()))
        return trials[rate]

    i = LR_GRID.index(DEFAULT_LR)
    here, lower = trial(i), trial(i - 1)
    direction = -1 if lower < here else 1
    if direction == -1:
        i -= 1
    while 0 <= i + direction < len(LR_GRID) and trial(i + direction) < trial(i):
        i += direction
    progress.remove_task(task)
    _, state, parameters, (cpu_rng, device_rngs) = best
    model.load_state_dict(parameters)
    torch.set_rng_state(cpu_rng)
    for device, rng in zip(devices, device_rngs):
        torch.cuda.set_rng_state(rng, device)
    state.history.lr_probe = list(trials.items())
    state.history.probe_steps = (len(trials) - 1) * len(used)
    return state


def _probe_summary(history: RecoveryHistory, steps: int) -> str:
    """The trials of lr="auto" in one line, with what they cost beyond the run."""
    kept = min(history.lr_probe, key=lambda trial: trial[1])[0]
    tried = ", ".join(f"{rate:g}" for rate, _ in history.lr_probe)
    return (
        f"lr='auto': tried {tried}; kept {kept:g}, whose trial is the run's first {history.steps} steps; "
        f"the other trials took {history.probe_steps} steps ({history.probe_steps / steps:.0%} of the run)"
    )


def _warmup_cosine(steps: int, warm: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over `warm` steps, then a cosine down to zero at `steps`."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(step - warm + 1, steps - warm) / max(steps - warm, 1)))

    return factor


@torch.no_grad()
def heldout_loss(
    model: nn.Module, teacher: nn.Module, data: Iterable[Batch], loss: Loss = "auto", inputs: Callable | None = None
) -> float:
    """The distillation loss on held-out batches (eval mode): what early stopping watches.

    Watching the objective itself, not one of the fidelity figures, keeps the stop consistent with
    the training: KL on logits can keep improving agreement while the logits' scale, and so their
    relative error, drifts.
    """
    rank, world = process_group()
    device = device_of(model)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with eval_mode(model, teacher):
        for batch in data:
            x = shard(to_device(inputs(batch) if inputs else batch, device), rank, world)
            n = size(x)
            total[0] += distillation_loss(run(model, x), run(teacher, x), loss).double() * n
            total[1] += n
    if world > 1:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


def _distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around the model. A static graph lets parameters that a forward never uses (a head the
    distillation does not reach) stay unused without a graph traversal at every step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, static_graph=True)


def _label_loss(output, labels: torch.Tensor) -> torch.Tensor:
    pairs = [(p, t) for p, t in outputs(output) if is_logits(p, t)]
    if not pairs:
        raise ValueError("labels were given but the model returns no classifier logits")
    logits = pairs[0][1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _status(loss: float | None, latest: Fidelity | None) -> str:
    parts = [] if loss is None else [f"loss {loss:.4g}"]
    if latest is not None:
        if latest.top1_agreement is not None:
            parts.append(f"top-1 {latest.top1_agreement:.1%}")
        parts.append(f"cos {latest.cosine:.4f}")
        parts.append(f"rel err {latest.relative_error:.4f}")
    return "  ".join(parts)
