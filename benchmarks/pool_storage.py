"""Bytes for precision or for slots: pool storages and the budget plan on a pretrained MobileNetV2.

    python benchmarks/pool_storage.py      # about 10 minutes on one thread; writes docs/quality.md (## Pool storage)
    python benchmarks/pool_storage.py --calibrated    # the plan with calibration crops (## ... with calibration data)

Part 1 fixes the ratio at 1.0 (no collisions) and varies only how the pool is stored: float16,
int8 and int4 in blocks of 16 to 128 slots with float16 or float32 block scales, and every width
from 7 to 2 bits in blocks of 32. It says which block sizes, scale dtypes and widths earn their
bytes (the plan's candidates). Part 2 gives the plan budgets of
1/2 to 1/16 of the fp32 bytes and compares its choice with a float32 pool at the same bytes (all
the bytes spent on slots, as the first release did). Every figure is measured on crops of real
photos against the original's logits, no calibration, no recovery. `--calibrated` gives the plan
32 other crops as calibration data (data-aware projection, then GPTQ-style rounding of each layer
onto its grid: quality/rounding.py) and measures on the same 64 held-out crops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrained import Agreement, mobilenet_v2, photo_crops  # noqa: E402
from rpsconvert import PoolStorage, convert, report, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# block sizes and scale dtypes studied at 8 and 4 bits; every width from 8 to 2 at the plan's blocks of 32
STORAGES = [(16, None, None)] + [
    (bits, block, scale) for bits in (8, 4) for block in (16, 32, 64, 128) for scale in (16, 32)
    if scale == 16 or block == 32
] + [(bits, 32, 16) for bits in (7, 6, 5, 3, 2)]
BUDGETS = ("1/2", "1/4", "1/6", "1/8", "1/16")
CALIBRATED_BUDGETS = ("1/4", "1/6", "1/8")
START, END = "<!-- pool-storage:start -->", "<!-- pool-storage:end -->"
CALIBRATED = "<!-- pool-storage-calibrated:start -->", "<!-- pool-storage-calibrated:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrated", action="store_true", help="only the plan with calibration data")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the figures are qualities, not timings; one thread is the fairest neighbour
    model = mobilenet_v2()
    inputs = photo_crops(64, seed=1)
    with torch.no_grad():
        reference = torch.cat([model(b) for b in inputs.split(32)])
    full = save(convert(model, ratio=1.0), ROOT / "outputs" / "mnv2-full.rps.safetensors", overwrite=True).stat().st_size
    if args.calibrated:
        return calibrated(model, inputs, reference, full)
    lines = [f"Pretrained MobileNetV2 (torchvision ImageNet weights, {full / 1e6:.2f} MB as an fp32 checkpoint), 64 crops "
             "of scikit-learn's sample photos; top-1 agreement and logit cosine against the original.", ""]

    lines += ["### Ratio 1.0: only the storage varies", "",
              "| storage | bits per weight | file / fp32 file | top-1 agreement | cosine |", "|---|---|---|---|---|"]
    for bits, block, scale in STORAGES:
        storage = PoolStorage(torch.float16) if block is None else PoolStorage(getattr(torch, f"float{scale}"), bits, block)
        converted = convert(model, ratio=1.0, bits=storage)
        size = save(converted, ROOT / "outputs" / "mnv2.rps.safetensors", overwrite=True).stat().st_size
        result = Agreement.measure(converted, reference, inputs)
        per_weight = 8 * storage.bytes(converted.rps.size) / converted.rps.size
        lines.append(f"| {storage} | {per_weight:.3f} | {size / full:.3f} | {result.top1:.3f} | {result.cosine:.4f} |")
        print(lines[-1], flush=True)

    lines += ["", "### The plan at a budget, against a float32 pool of the same bytes", "",
              "| budget | plan's choice | ratio | top-1 | cosine | fp32 pool ratio | fp32 top-1 | fp32 cosine | plan seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for budget in BUDGETS:
        numerator, denominator = map(int, budget.split("/"))
        size = full * numerator // denominator
        start = time.perf_counter()
        planned = convert(model, budget=size)
        seconds = time.perf_counter() - start
        fp32 = convert(model, budget=size, bits=32)
        a, b = Agreement.measure(planned, reference, inputs), Agreement.measure(fp32, reference, inputs)
        lines.append(f"| {budget} | {planned.rps.storage} | {report(planned).ratio:.3f} | {a.top1:.3f} | {a.cosine:.4f} | "
                     f"{report(fp32).ratio:.3f} | {b.top1:.3f} | {b.cosine:.4f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    _write(["## Pool storage", "", "    python benchmarks/pool_storage.py", "", *lines], (START, END))


def calibrated(model, inputs, reference, full) -> None:
    """The plan at a budget without and with 32 calibration crops (other crops than the held-out ones)."""
    calibration = list(photo_crops(32, seed=2).split(8))
    lines = ["| budget | plan's choice | top-1 | cosine | with calibration: top-1 | cosine | seconds |", "|---|---|---|---|---|---|---|"]
    for budget in CALIBRATED_BUDGETS:
        numerator, denominator = map(int, budget.split("/"))
        size = full * numerator // denominator
        planned = convert(model, budget=size)
        start = time.perf_counter()
        fed = convert(model, budget=size, calibration=calibration, quiet=True)
        seconds = time.perf_counter() - start
        a, b = Agreement.measure(planned, reference, inputs), Agreement.measure(fed, reference, inputs)
        lines.append(f"| {budget} | {planned.rps.storage} | {a.top1:.3f} | {a.cosine:.4f} | {b.top1:.3f} | {b.cosine:.4f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    _write(["## The plan with calibration data", "", "    python benchmarks/pool_storage.py --calibrated", "",
            "The same model, budgets and 64 held-out crops as above; 32 other crops (4 batches of 8) as "
            "calibration data; *seconds* is the whole conversion with calibration, on one thread.", "", *lines], CALIBRATED)


def _write(lines: list[str], markers: tuple[str, str]) -> None:
    start, end = markers
    path = ROOT / "docs" / "quality.md"
    text = path.read_text() if path.exists() else "# Quality\n"
    if start not in text:
        text += "\n" + start + "\n" + end + "\n"
    body = "\n".join(lines)
    head, rest = text.split(start)
    path.write_text(head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
