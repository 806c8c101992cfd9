"""Conversion speed and memory: ResNet-50 (random init) to ratio 0.01 and to 1 MB.

Each case runs in a fresh subprocess so its peak resident memory (VmHWM) is its own. The forward
latency of the converted model is compared with the dense one, with and without materialized
weights. A naive
per-element Python implementation of the same hash and mapping is timed beside the vectorised one
on a small layer to show the gap (and checked to give the same slots and signs).

    .venv/bin/python benchmarks/convert_speed.py            # prints a table, writes docs/convert_speed.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M32 = 0xFFFFFFFF


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def run_case(kind: str) -> dict:
    """One conversion of a fresh ResNet-50; called in a child process."""
    import importlib

    import torch
    import torchvision

    from rpsconvert import convert

    conv = importlib.import_module("rpsconvert.conversion")  # the module, not the function of that name
    from rpsconvert.engine.discovery import discover

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rss_before = _vm("VmRSS:")
    t0 = time.perf_counter()
    discover(model)
    t_discovery = time.perf_counter() - t0

    spent = {"projection": 0.0}  # the final pool: projected, rounded and packed a piece at a time (encode_pool)
    original_project = conv.encode_pool

    def timed_project(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_project(*args, **kwargs)
        finally:
            spent["projection"] += time.perf_counter() - start

    conv.encode_pool = timed_project
    t0 = time.perf_counter()
    converted = convert(model, ratio=0.01) if kind == "ratio 0.01" else convert(model, budget="1MB")
    t_total = time.perf_counter() - t0
    return {
        "case": kind,
        "discovery_s": t_discovery,
        "projection_s": spent["projection"],
        "total_s": t_total,
        "peak_extra_bytes": _vm("VmHWM:") - rss_before,
        "dense_model_bytes": dense_bytes,
        "pool_slots": converted.rps.size,
    }


def forward_latency(rounds: int = 5) -> dict:
    """Median forward time of ResNet-50 (batch 8, 224x224): dense, RPS generating its weights on
    every call, RPS with materialized weights. The three alternate within each round, so a noisy
    neighbour slows them alike."""
    import statistics

    import torch
    import torchvision

    from rpsconvert import clear_cache, convert, materialize

    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    rps = convert(dense, ratio=0.01)
    x = torch.randn(8, 3, 224, 224)
    times: dict[str, list[float]] = {"dense": [], "rps": [], "rps materialized": []}
    with torch.no_grad():
        dense(x), rps(x)  # warm-up
        for _ in range(rounds):
            for name, model in (("dense", dense), ("rps", rps), ("rps materialized", rps)):
                if name == "rps materialized":
                    materialize(rps)
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
                clear_cache(rps)
    return {name: statistics.median(t) for name, t in times.items()}


# --- the naive baseline: the same H, g and RandomFold with Python integers, one element at a time
def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def _key(seed: int, stream: int) -> int:
    return _fmix32(seed ^ _fmix32((stream * 0x9E3779B9) & M32))


def _h(x: int, key: int) -> int:
    return _fmix32(_fmix32((x & M32) ^ key) ^ (x >> 32))


def naive_slots_and_signs(n: int, m: int, seed: int, start: int = 0) -> tuple[list[int], list[int]]:
    rot, sgn = _key(seed, 1), _key(seed, 4)
    slots = [(_h(i // m, rot) % m + i % m) % m for i in range(start, start + n)]
    signs = [1 - 2 * ((_h(i >> 5, sgn) >> (i & 31)) & 1) for i in range(start, start + n)]
    return slots, signs


def naive_vs_vectorised(n: int = 256 * 256 * 9, m: int = 6000, seed: int = 0) -> dict:
    from rpsconvert.engine.hashing import signs
    from rpsconvert.engine.mapping import RandomFold

    t0 = time.perf_counter()
    slots, sign = naive_slots_and_signs(n, m, seed)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        v_slots, v_sign = RandomFold().slots(0, n, m, seed), signs(0, n, seed)
    t_vec = (time.perf_counter() - t0) / 10
    assert v_slots.tolist() == slots and v_sign.tolist() == sign, "naive and vectorised hashes disagree"
    return {"elements": n, "naive_s": t_naive, "vectorised_s": t_vec, "speedup": t_naive / t_vec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "docs" / "convert_speed.json"))
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    rows = []
    for case in ("ratio 0.01", "budget 1MB"):
        out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive = naive_vs_vectorised()
    latency = forward_latency()
    print("| case | discovery s | projection s | total s | peak extra memory | x dense model | pool slots |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| ResNet-50, {r['case']} | {r['discovery_s']:.2f} | {r['projection_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['peak_extra_bytes'] / 1e6:.0f} MB | {r['peak_extra_bytes'] / r['dense_model_bytes']:.2f} | {r['pool_slots']:,} |"
        )
    print()
    print("| slots and signs of one 256x256x3x3 layer | seconds | ratio |")
    print("| --- | --- | --- |")
    print(f"| naive per-element Python | {naive['naive_s']:.3f} | {naive['speedup']:.0f}x slower |")
    print(f"| vectorised torch (rpsconvert) | {naive['vectorised_s']:.5f} | 1 |")
    print()
    print("| ResNet-50 forward, batch 8 at 224x224 | median seconds | x dense |")
    print("| --- | --- | --- |")
    for name, seconds in latency.items():
        print(f"| {name} | {seconds:.3f} | {seconds / latency['dense']:.2f} |")
    Path(args.out).write_text(json.dumps({"resnet50": rows, "naive_vs_vectorised": naive, "forward": latency}, indent=2) + "\n")


if __name__ == "__main__":
    main()
