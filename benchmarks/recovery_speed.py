"""Recovery at the speed of training, on the pretrained all-MiniLM-L6-v2 encoder (22.7M weights,
its 30k-token embedding included; benchmarks/calibration_speed.py `minilm`, a random BERT of its
shape without the package), on sentences of the standard library's docstrings.

    .venv/bin/python benchmarks/recovery_speed.py steps [--steps 6]
    .venv/bin/python benchmarks/recovery_speed.py quality --fraction 0.125 --recover-steps 150
    .venv/bin/python benchmarks/recovery_speed.py quality --recover-steps 40 --lr 3e-4 --eval-every 10 --patience 40 [--dropout] [--hidden]

`steps`: CPU seconds per `recover()` step against a dense distillation step, on batches of 32
sentences of 48 tokens. `recover(..., lr=1e-4)` (no trials) times each step whole: the teacher's
forward, the student's forward and backward (generation, its adjoint, the STABLE-RPS hook, the
straight-through rounding) and Adam. The dense row is the same recovery of a plain copy: what
training the model itself costs. Medians of the steps after the first (which unpacks the pool).

`quality`: the encoder as sentence-transformers runs it (tasks.SentenceEmbedding: hidden states
averaged over the mask, normalized), and everything a user runs, timed whole in CPU seconds:
`convert(budget=F x the fp32 bytes, calibration=16 batches of 16 sentences)` (the plan, the
projection, the calibration and its held-out check), then `recover(lr="auto", loss="cosine",
eval_data=...)` for the given steps on 64 batches of 32 training sentences of 48 tokens. The
figure is the held-out embedding cosine (8 batches of 16 sentences of other modules) after each
stage. "CPU s in all" is what a user's run costs: the calibrated conversion and the recovery
(the "plan" column's conversion without calibration, and the benchmark's own fidelity figures
between the two, are left out).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration_speed import minilm, sentences  # noqa: E402
from tasks import SentenceEmbedding, stdlib_text  # noqa: E402

from rpsconvert import convert, report  # noqa: E402
from rpsconvert.engine.modules import find_pool  # noqa: E402
from rpsconvert.quality import recovery  # noqa: E402
from rpsconvert.quality.fidelity import fidelity  # noqa: E402


def tokenized(tokenizer, text: bytes, count: int, size: int, tokens: int, offset: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` batches of `size` sentences, `tokens` long, spread evenly over all of `text` (every
    k-th sentence from `offset`): the first sentences come from a few modules' docstrings, and
    calibrated on those alone all-MiniLM-L6-v2 at 1/8 fell from 0.941 to 0.929 on other modules."""
    found = sentences(text, 10**9)
    lines = found[offset :: max(1, len(found) // (count * size))][: count * size]
    if tokenizer is None:  # the random stand-in: random tokens
        g = torch.Generator().manual_seed(len(lines))
        return [{"input_ids": torch.randint(1000, 30000, (size, tokens), generator=g)} for _ in range(count)]
    return [
        dict(tokenizer(lines[i : i + size], padding="max_length", truncation=True, max_length=tokens, return_tensors="pt"))
        for i in range(0, len(lines), size)
    ]


def step_seconds(student, teacher, data, steps: int) -> float:
    times = []
    original = recovery._Objective.step

    def timed(self, net, batch, optimizer):
        start = time.process_time()
        value = original(self, net, batch, optimizer)
        times.append(time.process_time() - start)
        return value

    recovery._Objective.step = timed
    try:
        recovery.recover(student, teacher, data, steps=steps, lr=1e-4, quiet=True)
    finally:
        recovery._Objective.step = original
    return statistics.median(times[1:])


def steps_table(teacher, tokenizer, steps: int) -> None:
    train_text, _ = stdlib_text()
    data = tokenized(tokenizer, train_text, 4, 32, 48)
    fp32 = sum(p.numel() * 4 for p in teacher.parameters())
    cases = {
        "dense (a plain copy)": lambda: copy.deepcopy(teacher),
        "budget 1/8 (the plan)": lambda: convert(teacher, budget=fp32 // 8, quiet=True),
        "budget 1/16 (the plan)": lambda: convert(teacher, budget=fp32 // 16, quiet=True),
        "int4, ratio 0.25": lambda: convert(teacher, ratio=0.25, bits=4),
        "float32, ratio 0.25": lambda: convert(teacher, ratio=0.25),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps, medians of CPU seconds")
    print("| student | pool | ratio | CPU s / step | x dense |\n| --- | --- | --- | --- | --- |")
    dense = None
    for name, make in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            student = make()
        seconds = step_seconds(student, teacher, data, steps)
        dense = dense or seconds
        pool, ratio = (str(find_pool(student).storage), f"{report(student).ratio:.3g}") if hasattr(student, "rps") else ("-", "-")
        print(f"| {name} | {pool} | {ratio} | {seconds:.3f} | {seconds / dense:.2f} |", flush=True)


def quality_row(bert, tokenizer, fraction: float, recover_steps: int, options: dict) -> None:
    """One row of the quality table; `options` are recover()'s own (lr, eval_every, patience, dropout, hidden)."""
    teacher = SentenceEmbedding(bert).eval()
    train_text, held_text = stdlib_text()
    calibration = tokenized(tokenizer, train_text, 16, 16, 64)
    train = tokenized(tokenizer, train_text, 64, 32, 48, offset=1)  # other sentences than the calibration's
    heldout = tokenized(tokenizer, held_text, 8, 16, 64)
    budget = int(fraction * sum(p.numel() * 4 for p in teacher.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = convert(teacher, budget=budget, quiet=True)  # the reference column, not part of the run timed
        start = time.process_time()
        converted = convert(teacher, budget=budget, calibration=calibration, quiet=True)
    converted_at = time.process_time() - start
    without, calibrated = fidelity(plain, teacher, heldout).cosine, fidelity(converted, teacher, heldout).cosine
    resumed = time.process_time()  # the two fidelity figures above are the benchmark's, not the run's
    history = recovery.recover(converted, teacher, train, steps=recover_steps, loss="cosine", eval_data=heldout, quiet=True, **options)
    total = converted_at + time.process_time() - resumed
    note = next((n for n in report(converted).notes if n.startswith("calibration")), "")
    print(
        f"| 1/{round(1 / fraction)} | {find_pool(converted).storage} | {without:.4f} | {calibrated:.4f} | {history.after.cosine:.4f} "
        f"| {history.steps} of {recover_steps} + {history.probe_steps} (lr {max(history.lr):g}) | {converted_at:.0f} | {total:.0f} |",
        flush=True,
    )
    print(f"  {note}", flush=True)
    print("  lr trials (rate, held-out loss): " + ", ".join(f"{r:g} {v:.5f}" for r, v in history.lr_probe), flush=True)
    print("  held-out cosine by step: " + ", ".join(f"{s} {f.cosine:.4f}" for s, f in history.evals), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("steps", "quality"))
    parser.add_argument("--steps", type=int, default=6, help="steps timed per student (steps)")
    parser.add_argument("--fraction", type=float, nargs="+", default=[0.125], help="budgets, fractions of the fp32 bytes (quality)")
    parser.add_argument("--recover-steps", type=int, nargs="+", default=[150], help="recovery steps, one per fraction or one for all (quality)")
    parser.add_argument("--lr", type=lambda v: v if v == "auto" else float(v), default="auto", help="recover()'s lr (quality)")
    parser.add_argument("--eval-every", type=int, default=None, help="recover()'s eval_every (quality; default a tenth of the steps)")
    parser.add_argument("--patience", type=int, default=3, help="recover()'s patience (quality)")
    parser.add_argument("--dropout", action="store_true", help="keep the student's dropout on, as recover() did before (quality)")
    parser.add_argument("--hidden", action="store_true", help="also distill every block's output (quality)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        teacher, tokenizer = minilm(6, Path(folder))
    if args.what == "steps":
        return steps_table(teacher, tokenizer, args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; held-out embedding cosine; CPU seconds")
    print("| budget | pool | cosine: plan | + calibration | + recovery | steps run of asked (+ lr trials') | CPU s to convert | CPU s in all |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    steps = args.recover_steps * len(args.fraction) if len(args.recover_steps) == 1 else args.recover_steps
    for fraction, count in zip(args.fraction, steps):
        options = {"lr": args.lr, "eval_every": args.eval_every, "patience": args.patience, "dropout": args.dropout, "hidden": args.hidden}
        quality_row(teacher, tokenizer, fraction, count, options)


if __name__ == "__main__":
    main()
