"""`make demo`: the whole story on a small digits CNN, offline, in well under a minute.

1. train a CNN on scikit-learn's digits (examples/digits.py) and pickle it;
2. convert it with the `rpsconvert` command to a fiftieth of its size (6 kB): the weight projection
   alone loses most of its accuracy;
3. convert it again with example inputs (--calibrate, no labels needed) and --recover-steps N:
   data-aware projection, then distillation against the original, in the same budget;
4. load both checkpoints back and score them against the original on digits none of the steps saw.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for examples.digits when run as a script

from examples.digits import accuracy, digits_cnn, digits_split, train  # noqa: E402
from rpsconvert import load, parse_bytes  # noqa: E402
from rpsconvert.cli import app  # noqa: E402

BUDGET = "6kB"  # a fiftieth of the trained model's 287 kB: past what quantization alone reaches, so weights
# are shared too, and the projection alone loses most of the accuracy
TRAIN_STEPS = 300
RECOVER_STEPS = 300


@dataclass
class Scores:
    """Held-out accuracies (in [0, 1]) and file sizes (bytes) of the demo's three models."""

    dense: float
    projected: float
    recovered: float
    dense_bytes: int
    projected_bytes: int
    recovered_bytes: int
    budget_bytes: int


def run(out_dir: Path = Path("outputs/demo"), train_steps: int = TRAIN_STEPS, recover_steps: int = RECOVER_STEPS) -> Scores:
    """The demo: files go to `out_dir`; raises SystemExit with the command's status if it fails.

    It runs on one thread, the command included: the models are tiny, and more threads only wait
    for each other (calibration and recovery were six times slower on two threads of a busy machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir, train_steps, recover_steps)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, train_steps: int, recover_steps: int) -> Scores:
    console = Console()
    start = time.perf_counter()
    data = digits_split()
    train_part, calib, heldout = data["train"], data["calib"], data["heldout"]

    console.rule(f"1. train a small CNN on {len(train_part):,} of scikit-learn's digits")
    model = train(digits_cnn, train_part.images, train_part.labels, steps=train_steps, batch_size=128)
    dense = accuracy(model, heldout.images, heldout.labels)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    console.print(f"{size / 1e3:.0f} kB of weights, accuracy {dense:.1%} on {len(heldout)} held-out digits, "
                  f"trained in {time.perf_counter() - start:.1f} s")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    pickled = out_dir / "digits.pt"
    torch.save(model, pickled)

    projected_path = out_dir / "digits.rps.safetensors"
    _rpsconvert(console, "2. convert it: the weight projection alone", [str(pickled), "--budget", BUDGET, "-o", str(projected_path)])
    projected = accuracy(load(projected_path, model=digits_cnn()).eval(), heldout.images, heldout.labels)
    console.print(f"accuracy {projected:.1%} against {dense:.1%} dense: the weight projection alone. Example inputs get the rest back.")

    inputs = out_dir / "calib.safetensors"
    safetensors.torch.save_file({"x": calib.images.contiguous()}, inputs)
    recovered_path = out_dir / "digits.rec.rps.safetensors"
    _rpsconvert(
        console,
        f"3. again, with {len(calib)} example inputs: calibrate, recover",
        [str(pickled), "--budget", BUDGET, "--calibrate", str(inputs), "--recover-steps", str(recover_steps), "-o", str(recovered_path)],
    )
    recovered = accuracy(load(recovered_path, model=digits_cnn()).eval(), heldout.images, heldout.labels)

    scores = Scores(dense, projected, recovered, pickled.stat().st_size, projected_path.stat().st_size,
                    recovered_path.stat().st_size, parse_bytes(BUDGET))  # fmt: skip
    console.rule("4. load the checkpoints back and score them")
    table = Table(title=f"digits CNN: accuracy on {len(heldout)} digits no step saw", title_justify="left")
    for column in ("", "file", "bytes", "accuracy"):
        table.add_column(column, justify="left" if column in ("", "file") else "right")
    table.add_row("dense", pickled.name, f"{scores.dense_bytes:,}", f"{dense:.1%}")
    table.add_row("projection only", projected_path.name, f"{scores.projected_bytes:,}", f"{projected:.1%}")
    table.add_row("calibrated + recovered", recovered_path.name, f"{scores.recovered_bytes:,}", f"{recovered:.1%}", style="bold")
    table.add_row(f"budget {BUDGET}", "", f"{scores.budget_bytes:,}", "")
    table.caption = f"{time.perf_counter() - start:.0f} s in all"
    console.print(table)
    return scores


def _rpsconvert(console: Console, title: str, args: list[str]) -> None:
    """Run the `rpsconvert` command in this process, as a user would in a shell."""
    args = [*args, "--force"]  # a rerun replaces the demo's own outputs
    console.rule(title)
    console.print(f"$ rpsconvert {' '.join(args)}", style="bold", highlight=False)
    status = app(args, prog_name="rpsconvert", standalone_mode=False)
    if status:
        raise SystemExit(status)


def main() -> int:
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
