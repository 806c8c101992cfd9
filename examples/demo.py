"""`make demo`: train a small digits CNN, convert it with the `rpsconvert` command, score the result.

The README's first command: the main job on a built-in example, offline, in about ten seconds. A
pickled model goes in, a checkpoint of at most the budget comes out, and it is loaded back and
scored against the original.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from rpsconvert.format.checkpoint import load
from rpsconvert.cli import app
from rpsconvert.digits import accuracy, digits_cnn, load_digits, train_digits_cnn

BUDGET = "100kB"  # about a third of the trained model's 287 kB


def main(out_dir: Path = Path("outputs/demo")) -> int:
    console = Console()
    console.rule("1. train a small CNN on scikit-learn's digits")
    data = load_digits()
    start = time.perf_counter()
    model = train_digits_cnn(data)
    dense_accuracy = accuracy(model, data.x_test, data.y_test)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    console.print(f"{size / 1e3:.0f} kB of weights, test accuracy {dense_accuracy:.1%}, trained in {time.perf_counter() - start:.1f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    pickled = out_dir / "digits.pt"
    torch.save(model, pickled)

    args = [str(pickled), "--budget", BUDGET, "--force"]
    console.rule(f"2. rpsconvert {' '.join(args)}")
    status = app(args, prog_name="rpsconvert", standalone_mode=False)
    if status:
        return status

    console.rule("3. load the checkpoint back and score it")
    path = out_dir / "digits.rps.safetensors"
    small = load(path, model=digits_cnn()).eval()
    console.print(
        f"{path}: {path.stat().st_size:,} bytes (budget {BUDGET}), test accuracy {accuracy(small, data.x_test, data.y_test):.1%} "
        f"against {dense_accuracy:.1%} dense. This is the weight projection alone; recovery (distillation "
        "against the original) closes the gap."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
