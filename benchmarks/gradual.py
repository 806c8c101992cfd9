"""Gradual compression against one-shot compression + recovery, at equal total recovery steps.

    .venv/bin/python benchmarks/gradual.py                        # 1 thread; prints a markdown table
    .venv/bin/python benchmarks/gradual.py --steps 300 --ratios 1/20 1/64 --lrs 3e-3 1e-2 --data-aware

On the byte-level LM of tasks.py (the teacher of recovery_lr.py: 1000 training steps), each target
ratio is reached

- in one shot: convert the original at the target ratio, recover for all the steps;
- gradually in k stages (as gradual pruning does): convert at ratio target**(1/k), recover for
  steps/k, densify the result into a plain model, convert that at target**(2/k), recover, ... until
  the target ratio. The teacher is always the original model, the loss KL, the learning rate the
  same; each stage is its own `recover` call (its own warmup and cosine decay), and the stages go
  on through the training batches where the previous one stopped, so every method sees the same
  batch stream.

`--data-aware` adds the same methods with every conversion fit on 8 training batches
(`convert(..., calibration=...)`; at a later stage the layers are fit to the densified previous
stage, the model being converted). Reported per learning rate: held-out bits per byte after all the
recovery (bpb, lower is better), held-out bits per byte right after the last conversion, before its
recovery (start: does the gradual path give the last stage a better starting point?), and wall
seconds of conversions + recoveries (s, evaluation excluded). `torch.manual_seed(0)` before every run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import tasks  # noqa: E402

from rpsconvert import convert, densify  # noqa: E402
from rpsconvert.quality.recovery import recover  # noqa: E402

CALIBRATION_BATCHES = 8


@dataclass
class Result:
    start: float  # held-out bits per byte right after the last conversion, before its recovery
    final: float  # held-out bits per byte after the last recovery
    seconds: float  # conversions + recoveries, evaluation excluded


def schedule(target: float, stages: int, steps: int) -> list[tuple[float, int]]:
    """(ratio, recovery steps) per stage: ratios geometric from 1 down to `target`, steps split evenly."""
    counts = [steps // stages + (i < steps % stages) for i in range(stages)]
    return [(target ** ((i + 1) / stages), counts[i]) for i in range(stages)]


def rotated(batches: list[torch.Tensor], offset: int) -> list[torch.Tensor]:
    """The batches starting at `offset` (cycled), so a later stage continues the earlier one's stream."""
    offset %= len(batches)
    return batches[offset:] + batches[:offset]


def compress(teacher: nn.Module, task: tasks.Task, plan: list[tuple[float, int]], lr: float, data_aware: bool) -> Result:
    """Run the stages of `plan` from the original `teacher` (seeded); time everything but evaluation."""
    torch.manual_seed(0)
    calibration = task.inputs[:CALIBRATION_BATCHES] if data_aware else None
    dense, done, model, seconds, start = teacher, 0, None, 0.0, float("nan")
    for i, (ratio, steps) in enumerate(plan):
        clock = time.perf_counter()
        if i > 0:
            dense = densify(model)
        model = convert(dense, ratio=ratio, calibration=calibration, quiet=True)
        seconds += time.perf_counter() - clock
        if i == len(plan) - 1:
            start = task.evaluate(model)
        clock = time.perf_counter()
        recover(model, teacher, rotated(task.inputs, done), steps=steps, lr=lr, loss="kl", patience=10**6, quiet=True)
        seconds += time.perf_counter() - clock
        done += steps
    return Result(start, task.evaluate(model), seconds)


def label(plan: list[tuple[float, int]], data_aware: bool) -> str:
    ratios = " -> ".join(f"1/{1 / r:.3g}" for r, _ in plan)
    name = "one-shot" if len(plan) == 1 else f"gradual x{len(plan)} ({ratios})"
    return name + (", data-aware" if data_aware else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="total recovery steps of every method")
    parser.add_argument("--ratios", nargs="+", default=["1/20", "1/64"], help="target ratios, e.g. 1/20 0.05")
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3], help="recovery learning rates")
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3], help="stage counts (1 = one-shot)")
    parser.add_argument("--data-aware", action="store_true", help="also run every method with data-aware conversions")
    parser.add_argument("--train-steps", type=int, default=1000, help="teacher training steps (recovery_lr.py: 1000)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    task = tasks.text_task(args.train_steps, eval_windows=256)
    teacher = tasks.train(tasks.build_seeded(task, task.width), task, task.train_steps)
    print(f"dense teacher: {task.evaluate(teacher):.3f} bits per byte ({time.perf_counter() - begin:.0f} s to build)")
    print(f"{args.steps} recovery steps in all, loss kl, no early stop, 1 thread\n")
    print("| ratio | method | " + " | ".join(f"lr {lr:g}: bpb | start | s" for lr in args.lrs) + " |")
    print("| --- | --- |" + " ---: | ---: | ---: |" * len(args.lrs), flush=True)
    for text in args.ratios:
        target = float(Fraction(text))
        for data_aware in (False, True) if args.data_aware else (False,):
            for stages in args.stages:
                plan = schedule(target, stages, args.steps)
                results = [compress(teacher, task, plan, lr, data_aware) for lr in args.lrs]
                cells = [f"{r.final:.3f} | {r.start:.3f} | {r.seconds:.0f}" for r in results]
                print(f"| {text} | {label(plan, data_aware)} | " + " | ".join(cells) + " |", flush=True)
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
