"""Recovery learning rate and starting point on the byte-level LM of quality.py.

    .venv/bin/python benchmarks/recovery_lr.py     # about 6 minutes on 2 cores; prints a markdown table

Held-out bits per byte after 300 KL distillation steps, from the weight-space projection and from
the data-aware projection, at two learning rates (results in docs/recovery.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import tasks  # noqa: E402

from rpsconvert import convert  # noqa: E402
from rpsconvert.quality.recovery import recover  # noqa: E402

RATIOS = (1 / 2, 1 / 8)
RATES = (3e-3, 1e-2, "auto")


def main() -> None:
    task = tasks.text_task(1000, eval_windows=256)
    teacher = tasks.train(tasks.build_seeded(task, task.width), task, task.train_steps)
    print(f"dense: {task.evaluate(teacher):.3f} bits per byte\n")
    print("| ratio | start | " + " | ".join(f"lr {lr}" for lr in RATES) + " |")
    print("| --- | --- |" + " --- |" * len(RATES))
    for ratio in RATIOS:
        for start, calibration in (("projection", None), ("data-aware", task.inputs[:8])):
            row = []
            for lr in RATES:
                model = convert(teacher, ratio=ratio, calibration=calibration, quiet=True)
                history = recover(model, teacher, task.inputs, steps=300, lr=lr, loss="kl", patience=300, quiet=True)
                row.append(f"{task.evaluate(model):.3f}" + (f" ({max(history.lr):.0e})" if lr == "auto" else ""))
            print(f"| 1/{round(1 / ratio)} | {start} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
