"""Runtime of converted models: lean and cached modes against the dense model, generation
throughput against a plain copy, and the time to load a 1 MB ResNet-50 checkpoint in cached mode.

Models (random init): torchvision ResNet-50 and a BERT-base-sized nn.TransformerEncoder (12 layers,
width 768, 12 heads, feed-forward 3072, sequence 128), both converted at ratio 0.01. Within each
round the dense model, lean mode and cached mode run one after the other, so load from other
processes hits all three alike; the table gives medians over rounds and ratios to the dense model
measured in the same process.

    .venv/bin/python benchmarks/runtime.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from rpsconvert import convert, load, save, set_mode

RATIO = 0.01


def _rss() -> int:
    """The process's resident memory now, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bert_base() -> nn.Module:
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)


MODELS = {
    "ResNet-50": (lambda: torchvision.models.resnet50(), [(1, lambda: torch.randn(1, 3, 224, 224)), (32, lambda: torch.randn(32, 3, 112, 112))]),
    "BERT-base encoder": (_bert_base, [(1, lambda: torch.randn(1, 128, 768)), (8, lambda: torch.randn(8, 128, 768))]),
}


def _resident_bytes(model: nn.Module) -> int:
    """Tensors the model holds: parameters and buffers (the pool and the dense parts), the cache in
    cached mode, and in lean mode the largest weight, which exists while its layer runs."""
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    pool = model.rps
    if pool._cache is not None:
        return held + sum(t.numel() * t.element_size() for t in pool._cache.values())
    return held + max(w.numel for w in pool.weights.values()) * pool.pool.element_size()


def forward_rows(rounds: int) -> list[tuple]:
    rows = []
    for name, (make, batches) in MODELS.items():
        torch.manual_seed(0)
        dense = make().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = convert(dense, ratio=RATIO).eval()  # a copy: dense stays dense
        for batch, example in batches:
            x = example()
            times: dict[str, list[float]] = {"dense": [], "lean": [], "cached": []}
            rss: dict[str, int] = {}
            resident: dict[str, int] = {}
            with torch.no_grad():
                for mode in times:  # warm-up, and the memory of each mode
                    model = dense if mode == "dense" else set_mode(small, mode)
                    model(x)
                    rss[mode] = _rss()
                    resident[mode] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) if mode == "dense" else _resident_bytes(small)
                for _ in range(rounds):
                    for mode in times:
                        model = dense if mode == "dense" else set_mode(small, mode)  # caching is not timed
                        times[mode].append(_seconds(lambda: model(x)))
            base = statistics.median(times["dense"])
            for mode, values in times.items():
                rows.append((mode, name, batch, statistics.median(values), statistics.median(values) / base, rss[mode], resident[mode]))
        generation = generation_throughput(small, rounds)
        rows.append(("generate all", name, "-", generation[0], generation[1], _rss(), 0))
    return rows


def generation_throughput(model: nn.Module, rounds: int) -> tuple[float, float]:
    """Median seconds to generate every compressed weight, and the throughput as a fraction of a
    clone of the same number of bytes (generation writes what a copy writes, reading a small pool)."""
    pool = model.rps
    numel = sum(w.numel for w in pool.weights.values())
    source = torch.randn(numel, dtype=pool.pool.dtype)
    generate, copy_ = [], []
    with torch.no_grad():
        for _ in range(rounds):
            generate.append(_seconds(lambda: [pool.operator.generate(pool.pool, w) for w in pool.weights.values()]))
            copy_.append(_seconds(source.clone))
    return statistics.median(generate), statistics.median(copy_) / statistics.median(generate)


def load_seconds(rounds: int) -> float:
    """Median seconds from a ResNet-50 checkpoint at budget 1MB to a model ready in cached mode,
    not counting imports and building the skeleton."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save(convert(torchvision.models.resnet50(), budget="1MB"), Path(tmp) / "resnet50.rps.safetensors")
        times = []
        for _ in range(rounds):
            skeleton = torchvision.models.resnet50()
            times.append(_seconds(lambda: load(path, skeleton, mode="cached")))
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ratio {RATIO}, {args.rounds} rounds, medians")
    print("| mode | model | batch | median s | x dense (generate all: x copy throughput) | RSS after | resident tensors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, name, batch, seconds, ratio, rss, resident in forward_rows(args.rounds):
        print(f"| {mode} | {name} | {batch} | {seconds:.4f} | {ratio:.2f} | {rss / 1e6:.0f} MB | {resident / 1e6:.1f} MB |")
    print(f"ResNet-50 at budget 1MB, load(mode='cached') until ready: {load_seconds(args.rounds):.3f} s (median)")


if __name__ == "__main__":
    main()
