"""Recovery's learning rate: fixed rates against the rate `lr="auto"` chooses.

    .venv/bin/python benchmarks/recovery_lr.py               # the byte-level LM; about 6 minutes on 2 cores
    .venv/bin/python benchmarks/recovery_lr.py --task mlp    # the tests' digits MLP; about a minute

The LM (quality.py's): held-out bits per byte after 300 KL distillation steps, from the
weight-space projection and from the data-aware projection, at ratios 1/2 and 1/8. The digits MLP
(examples/digits.py, trained as the tests train it): held-out distillation loss (KL) / accuracy
after 60 and 300 steps at ratios 1/8 and 1/32, with held-out images as `eval_data` and no early
stop. The rate "auto" chose is shown in parentheses. Results in docs/recovery.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import tasks  # noqa: E402

from examples import digits  # noqa: E402
from rpsconvert import convert  # noqa: E402
from rpsconvert.quality.batches import split  # noqa: E402
from rpsconvert.quality.recovery import recover  # noqa: E402


def _rate(history, lr) -> str:
    return f" ({max(history.lr):.0e})" if lr == "auto" else ""


def lm() -> None:
    rates = (3e-3, 1e-2, "auto")
    task = tasks.text_task(1000, eval_windows=256)
    teacher = tasks.train(tasks.build_seeded(task, task.width), task, task.train_steps)
    print(f"dense: {task.evaluate(teacher):.3f} bits per byte\n")
    print("| ratio | start | " + " | ".join(f"lr {lr}" for lr in rates) + " |")
    print("| --- | --- |" + " --- |" * len(rates))
    for ratio in (1 / 2, 1 / 8):
        for start, calibration in (("projection", None), ("data-aware", task.inputs[:8])):
            row = []
            for lr in rates:
                model = convert(teacher, ratio=ratio, calibration=calibration, quiet=True)
                history = recover(model, teacher, task.inputs, steps=300, lr=lr, loss="kl", patience=300, quiet=True)
                row.append(f"{task.evaluate(model):.3f}{_rate(history, lr)}")
            print(f"| 1/{round(1 / ratio)} | {start} | " + " | ".join(row) + " |", flush=True)


def mlp() -> None:
    rates = (1e-3, 3e-3, 1e-2, 3e-2, "auto")
    parts = digits.digits_split()
    teacher = digits.train(digits.digits_mlp, parts["train"].flat, parts["train"].labels).eval()
    calib, heldout = split(parts["calib"].flat, 50), split(parts["heldout"].flat, 100)
    print(f"dense: {digits.accuracy(teacher, parts['heldout'].flat, parts['heldout'].labels):.1%} held-out accuracy\n")
    print("| ratio | steps | " + " | ".join(f"lr {lr}" for lr in rates) + " |")
    print("| --- | --- |" + " --- |" * len(rates))
    for steps in (60, 300):
        for ratio in (1 / 8, 1 / 32):
            row = []
            for lr in rates:
                torch.manual_seed(0)
                model = convert(teacher, ratio=ratio, quiet=True)
                history = recover(model, teacher, calib, steps=steps, lr=lr, eval_data=heldout, patience=steps, quiet=True)
                accuracy = digits.accuracy(model, parts["heldout"].flat, parts["heldout"].labels)
                row.append(f"{history.heldout_loss[-1]:.3f} / {accuracy:.1%}{_rate(history, lr)}")
            print(f"| 1/{round(1 / ratio)} | {steps} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("lm", "mlp"), default="lm")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.task == "lm":
        lm()
    else:
        mlp()
