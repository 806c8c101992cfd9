"""Recovery of a pretrained CNN: torchvision's ImageNet MobileNetV2 (real BatchNorm), converted by
the plan at a fraction of its fp32 bytes, then `recover` at each learning rate, with and without
distilling the blocks' outputs (`hidden=True`). Agreement (top-1) and logit cosine with the
original on held-out crops of real photos (benchmarks/pretrained.py). Results in docs/recovery.md.

    .venv/bin/python benchmarks/recovery_pretrained.py --fraction 0.125 --lrs 1e-3 1e-4 --steps 60 --batch 8
    .venv/bin/python benchmarks/recovery_pretrained.py --fraction 0.25 --lrs auto --outputs-only --steps 20 --batch 4
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from pretrained import Agreement, mobilenet_v2, photo_crops  # noqa: E402

from rpsconvert import convert, recover  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.125, help="budget, as a fraction of the fp32 bytes")
    parser.add_argument("--lrs", type=_rate, nargs="+", default=[1e-3, 1e-4], help='rates, or "auto" (recover chooses)')
    parser.add_argument("--outputs-only", action="store_true", help="skip the runs that also distill the blocks' outputs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crops", type=int, default=96, help="training crops (64 other crops are held out)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    teacher = mobilenet_v2()
    train, held = photo_crops(args.crops, 3), photo_crops(64, 2)
    with torch.no_grad():
        reference = teacher(held)
    budget = int(sum(p.numel() * 4 for p in teacher.parameters()) * args.fraction)
    small = convert(teacher, budget=budget)
    start = Agreement.measure(small.eval(), reference, held)
    print(f"plan at {args.fraction:g} of the bytes: {start.top1:.1%} / {start.cosine:.4f}\n")
    print("| lr | distilled | agreement | cosine | seconds |\n| --- | --- | --- | --- | --- |")
    for lr in args.lrs:
        for hidden in (False,) if args.outputs_only else (False, True):
            model = copy.deepcopy(small)
            torch.manual_seed(1)
            began = time.perf_counter()
            history = recover(model, teacher, list(train.split(args.batch)), steps=args.steps, lr=lr, quiet=True, hidden=hidden)
            after = Agreement.measure(model.eval(), reference, held)
            where = "output and blocks" if hidden else "output"
            rate = f"auto: {max(history.lr):.0e} of " + ", ".join(f"{r:g}" for r, _ in history.lr_probe) if lr == "auto" else f"{lr:g}"
            print(f"| {rate} | {where} | {after.top1:.1%} | {after.cosine:.4f} | {time.perf_counter() - began:.0f} |", flush=True)


def _rate(text: str) -> float | str:
    return text if text == "auto" else float(text)


if __name__ == "__main__":
    main()
