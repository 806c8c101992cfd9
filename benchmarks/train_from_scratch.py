"""Training from scratch: RPS against a smaller dense model and magnitude pruning at init, at equal bytes.

    .venv/bin/python benchmarks/train_from_scratch.py                    # the comparison (docs/benchmarks.md)
    .venv/bin/python benchmarks/train_from_scratch.py --task digits      # the same on the digits CNN
    .venv/bin/python benchmarks/train_from_scratch.py --units --ratios 1/8    # the pool units compared
    .venv/bin/python benchmarks/train_from_scratch.py --digits                # trained digits CNN, units compared

The STABLE-RPS paper's experiment on the byte-level LM of tasks.py: every model is built fresh
(PyTorch's default init), the RPS one is `convert(model, ratio=r)` right after construction, and all
are trained with the same recipe (AdamW at 3e-3, one-cycle, batch 32 x 64 bytes); held-out bits
per byte. `--task digits` runs the same comparison on the digits CNN of tasks.py (width 32, batch
64 images; test accuracy in %). Each method stores its compressed weights in the bytes of RPS's
fp32 pool: the smaller dense model is the widest that fits (benchmarks/baselines.py), magnitude
pruning at init keeps the largest initial weights of every tensor at one density and pays for its
indices.

`--units` trains the RPS model with its pool put in other units (the scales of every layer times
one factor, the pool divided by it: the same generated weights, another speed under Adam), and
`--digits` converts a trained digits CNN with each unit, projection only and after a short
`recover`. One torch thread: the figures are reproducible on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import baselines  # noqa: E402
import tasks  # noqa: E402

from rpsconvert import convert  # noqa: E402
from rpsconvert.engine.modules import find_pool  # noqa: E402
from rpsconvert.quality.recovery import DEFAULT_LR, recover  # noqa: E402

LR, STEPS, BATCH = 3e-3, 600, 32
TASKS: dict[str, Callable[[int], tasks.Task]] = {  # --task: the task, from the training steps
    "lm": lambda steps: tasks.text_task(steps, eval_windows=256, batch=BATCH),
    "digits": lambda steps: tasks.digits_tasks(steps)[0],
}
DECIMALS = {"stdlib LM": 3, "digits CNN": 1}  # by task name: the decimals its metric is printed with
RATIOS = ("1/2", "1/8", "1/32", "1/128")


def _rms(model: nn.Module, names: list[str]) -> list[tuple[float, int]]:
    params = dict(model.named_parameters())
    return [(float(params[n].detach().double().square().mean().sqrt()), params[n].numel()) for n in names]


UNITS = {  # the pool's unit from the layers' (RMS, element count); layer_scales uses the median
    "median layer RMS (default)": lambda rms: statistics.median(r for r, _ in rms),
    "RMS of all weights (before)": lambda rms: math.sqrt(sum(r * r * n for r, n in rms) / sum(n for _, n in rms)),
    "geometric mean of layer RMS": lambda rms: math.exp(statistics.fmean(math.log(r) for r, _ in rms)),
}


def in_unit(model: nn.Module, original: nn.Module, names: list[str], unit: str) -> nn.Module:
    """`model` (converted from `original`) with its pool in another unit and the same weights."""
    rms = _rms(original, names)
    factor = UNITS["median layer RMS (default)"](rms) / UNITS[unit](rms)
    pool = find_pool(model)
    pool.weights = {name: dataclasses.replace(w, scale=w.scale * factor) for name, w in pool.weights.items()}
    with torch.no_grad():
        pool.pool.div_(factor)
    return model


def adamw_one_cycle(parameters, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(parameters, lr=LR)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps)


def train(model: nn.Module, task: tasks.Task, steps: int) -> str:
    """AdamW at LR with a one-cycle schedule on the task's batches; the task's held-out metric, printed."""
    return f"{task.evaluate(tasks.train(model, task, steps, adamw_one_cycle)):.{DECIMALS[task.name]}f}"


def comparison(task: tasks.Task, ratios: list[str], steps: int) -> None:
    fresh = tasks.build_seeded(task, task.width)
    names = baselines.compressed_names(fresh)
    numel = sum(n for _, n in _rms(fresh, names))
    dense_bytes = baselines.parameter_bytes(fresh) - 4 * numel
    dense = train(fresh, task, steps)
    better = "higher" if task.higher_is_better else "lower"
    print(f"{task.name}, dense (width {task.width}, {numel:,} compressed weights), {task.metric} ({better} is better): {dense}", flush=True)
    print("\n| ratio | bytes | RPS | small dense | magnitude pruning at init |\n| --- | ---: | ---: | ---: | ---: |")
    for ratio in ratios:
        start = time.time()
        budget = 4 * max(1, round(float(Fraction(ratio)) * numel))
        rps = train(convert(tasks.build_seeded(task, task.width), ratio=float(Fraction(ratio))), task, steps)
        width = baselines.small_width(task.build, task.width, budget + dense_bytes)
        small = f"{train(tasks.build_seeded(task, width), task, steps)} (width {width})" if width else "n/a"
        pruned = baselines.prune(tasks.build_seeded(task, task.width), names, budget)
        pruning = train(pruned[0], task, steps) if pruned else "n/a"
        print(f"| {ratio} | {budget / 1000:.1f} kB | {rps} | {small} | {pruning} |", flush=True)
        print(f"  {ratio}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)


def units(task: tasks.Task, ratios: list[str], steps: int) -> None:
    """The RPS model trained with its pool in each unit of UNITS."""
    fresh = tasks.build_seeded(task, task.width)
    names = baselines.compressed_names(fresh)
    print("| ratio | " + " | ".join(UNITS) + " |\n| --- |" + " --- |" * len(UNITS))
    for ratio in ratios:
        cells = []
        for unit in UNITS:
            model = convert(tasks.build_seeded(task, task.width), ratio=float(Fraction(ratio)))
            cells.append(train(in_unit(model, fresh, names, unit), task, steps))
        print(f"| {ratio} | " + " | ".join(cells) + " |", flush=True)


def digits(ratio: float, recovery_steps: int) -> None:
    """A trained digits CNN converted at `ratio` with each unit: accuracy projected and recovered."""
    task = tasks.digits_tasks(1500)[0]
    teacher = tasks.train(tasks.build_seeded(task, task.width), task, task.train_steps)
    names = baselines.compressed_names(teacher)
    dense = task.evaluate(teacher)
    print(f"digits CNN, dense {dense:.1f} %, ratio {ratio:g}, recovery {recovery_steps} steps at lr {DEFAULT_LR:g}\n")
    print("| unit | projection | + recovery |\n| --- | ---: | ---: |")
    for unit in UNITS:
        model = in_unit(convert(teacher, ratio=ratio), teacher, names, unit)
        projected = task.evaluate(model)
        recover(model, teacher, task.inputs, steps=recovery_steps, lr=DEFAULT_LR, loss="kl", patience=recovery_steps, quiet=True)
        print(f"| {unit} | {projected:.1f} | {task.evaluate(model):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", nargs="+", default=list(RATIOS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--task", choices=list(TASKS), default="lm", help="the byte-level LM or the digits CNN")
    parser.add_argument("--units", action="store_true", help="compare the pool's units (RPS only)")
    parser.add_argument("--digits", action="store_true", help="a trained digits CNN at ratio 1/8 with each unit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.digits:
        digits(1 / 8, recovery_steps=300)
    else:
        task = TASKS[args.task](args.steps)
        (units if args.units else comparison)(task, args.ratios, args.steps)


if __name__ == "__main__":
    main()
