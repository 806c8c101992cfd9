"""Seconds per recovery step against a dense distillation step, for float and integer pools.

A 6-layer, 384-wide nn.TransformerEncoder (random init, the size of all-MiniLM-L6-v2's encoder
layers, 10.6M weights), batches of 32 sequences of 48 tokens. `recover(..., lr=1e-3)` (no trials)
times each step whole: the teacher's forward, the student's forward and backward (generation, its
adjoint, the STABLE-RPS hook, the straight-through rounding) and Adam. The dense row is the same
recovery of a plain copy: what training the model itself costs. Medians of the steps after the
first (which unpacks the pool and warms up).

    .venv/bin/python benchmarks/recovery_step.py [--steps 6]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

from rpsconvert import convert
from rpsconvert.quality import recovery


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(384, 12, 1536, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()


def step_seconds(student: nn.Module, teacher: nn.Module, data: list[torch.Tensor], steps: int) -> float:
    times = []
    original = recovery._Objective.step

    def timed(self, net, batch, optimizer):
        start = time.perf_counter()
        value = original(self, net, batch, optimizer)
        times.append(time.perf_counter() - start)
        return value

    recovery._Objective.step = timed
    try:
        recovery.recover(student, teacher, data, steps=steps, lr=1e-3, quiet=True)
    finally:
        recovery._Objective.step = original
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    teacher = _encoder()
    fp32_bytes = sum(p.numel() * 4 for p in teacher.parameters())
    data = [torch.randn(32, 48, 384, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cases = {
        "dense (a plain copy)": lambda: copy.deepcopy(teacher),
        "budget 1/8 (the plan)": lambda: convert(teacher, budget=fp32_bytes // 8, quiet=True),
        "int4, ratio 0.25": lambda: convert(teacher, ratio=0.25, bits=4),
        "float32, ratio 0.25": lambda: convert(teacher, ratio=0.25),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, medians")
    print("| student | pool | s / step | x dense |")
    print("| --- | --- | --- | --- |")
    dense = None
    for name, make in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            student = make()
        seconds = step_seconds(student, teacher, data, args.steps)
        dense = dense or seconds
        pool = str(student.rps.storage) if hasattr(student, "rps") else "-"
        print(f"| {name} | {pool} | {seconds:.3f} | {seconds / dense:.2f} |", flush=True)


if __name__ == "__main__":
    main()
