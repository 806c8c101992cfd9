"""Runtime of converted models: lean and cached modes against the dense model, generation
throughput against a plain copy, and the time to load a 1 MB ResNet-50 checkpoint in cached mode.

Models (random init): torchvision ResNet-50 and a BERT-base-sized nn.TransformerEncoder (12 layers,
width 768, 12 heads, feed-forward 3072, sequence 128), both converted at ratio 0.01. Within each
round the dense model, lean mode and cached mode run one after the other, so load from other
processes hits all three alike; the table gives medians over rounds and ratios to the dense model
measured in the same process.

    .venv/bin/python benchmarks/runtime.py [--rounds 5]
    python benchmarks/runtime.py --device cuda --rounds 20 --compiled   # on a GPU machine

On a GPU the timings synchronize the device, the memory column is the GPU memory allocated (not
the process's RSS), generation is also timed on the fold path that the fused kernel replaced
(engine/kernels.py), and `--compiled` adds lean mode under torch.compile.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torchvision
from torch import nn

from rpsconvert import convert, load, resident_bytes, save, set_mode
from rpsconvert.engine import kernels

RATIO = 0.01


def _memory(device: torch.device) -> int:
    """The GPU memory allocated on a GPU; else the process's resident memory (Linux), in bytes."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _seconds(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - start


def _bert_base() -> nn.Module:
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)


MODELS = {
    "ResNet-50": (lambda: torchvision.models.resnet50(), [(1, lambda: torch.randn(1, 3, 224, 224)), (32, lambda: torch.randn(32, 3, 112, 112))]),
    "BERT-base encoder": (_bert_base, [(1, lambda: torch.randn(1, 128, 768)), (8, lambda: torch.randn(8, 128, 768))]),
}


def _resident_bytes(model: nn.Module) -> int:
    """Tensors the model holds (`resident_bytes`: the stored pool, the dense parts, the cache in
    cached mode) and, in lean mode, the largest weight, which exists while its layer runs."""
    pool = model.rps
    largest = 0 if pool._cache is not None else max(w.numel * w.dtype.itemsize for w in pool.weights.values())
    return resident_bytes(model) + largest


def forward_rows(rounds: int, device: torch.device, compiled: bool, models: list[str]) -> list[tuple]:
    rows = []
    for name in models:
        make, batches = MODELS[name]
        torch.manual_seed(0)
        dense = make().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = convert(dense, ratio=RATIO).eval().to(device)  # a copy: dense stays dense
        dense.to(device)
        runs: dict[str, Callable[[], nn.Module]] = {"dense": lambda: dense, "lean": lambda: set_mode(small, "lean"), "cached": lambda: set_mode(small, "cached")}
        if compiled:  # a copy of its own: switching modes would make torch.compile recompile
            lean_compiled = torch.compile(set_mode(copy.deepcopy(small), "lean"))
            runs["lean, compiled"] = lambda: lean_compiled
        for batch, example in batches:
            x = example().to(device)
            times: dict[str, list[float]] = {mode: [] for mode in runs}
            memory: dict[str, int] = {}
            resident: dict[str, int] = {}
            with torch.no_grad():
                for mode, run in runs.items():  # warm-up (and compilation), and the memory of each mode
                    model = run()
                    model(x)
                    memory[mode] = _memory(device)
                    resident[mode] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) if mode == "dense" else _resident_bytes(small)
                for _ in range(rounds):
                    for mode, run in runs.items():
                        model = run()  # caching is not timed
                        times[mode].append(_seconds(lambda: model(x)))
            base = statistics.median(times["dense"])
            for mode, values in times.items():
                rows.append((mode, name, batch, statistics.median(values), statistics.median(values) / base, memory[mode], resident[mode]))
        paths = {"generate all": contextlib.nullcontext}
        if device.type == "cuda":  # the fold path, which the fused kernel replaces on a GPU
            paths["generate all, fold slices"] = lambda: mock.patch.object(kernels, "triton", None)
        for label, path in paths.items():
            with path():
                generation = generation_throughput(small, rounds)
            rows.append((label, name, "-", generation[0], generation[1], _memory(device), 0))
    return rows


def generation_throughput(model: nn.Module, rounds: int) -> tuple[float, float]:
    """Median seconds to generate every compressed weight, and the throughput as a fraction of a
    clone of the same number of bytes (generation writes what a copy writes, reading a small pool)."""
    pool = model.rps
    numel = sum(w.numel for w in pool.weights.values())
    source = torch.randn(numel, dtype=pool.pool.dtype, device=pool.pool.device)
    generate, copy_ = [], []
    with torch.no_grad():
        theta = pool._pool_for_autograd()  # the float pool, or the codes of a packed one
        for _ in range(rounds + 1):  # the first is a warm-up (the kernel's compilation on a GPU)
            generate.append(_seconds(lambda: pool.operator.generate_all(theta, pool.weights.values())))
            copy_.append(_seconds(source.clone))
    return statistics.median(generate[1:]), statistics.median(copy_[1:]) / statistics.median(generate[1:])


def load_seconds(rounds: int, device: torch.device) -> float:
    """Median seconds from a ResNet-50 checkpoint at budget 1MB to a model ready in cached mode,
    not counting imports and building the skeleton."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save(convert(torchvision.models.resnet50(), budget="1MB"), Path(tmp) / "resnet50.rps.safetensors")
        times = []
        for _ in range(rounds):
            skeleton = torchvision.models.resnet50()
            times.append(_seconds(lambda: load(path, skeleton, device=device, mode="cached")))
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--compiled", action="store_true", help="add lean mode under torch.compile")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="which models (default: all)")
    parser.add_argument("--no-load", action="store_true", help="skip the checkpoint load timing")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, ratio {RATIO}, {args.rounds} rounds, medians")
    memory = "GPU memory allocated" if device.type == "cuda" else "RSS after"
    print(f"| mode | model | batch | median s | x dense (generate all: x copy throughput) | {memory} | resident tensors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, name, batch, seconds, ratio, used, resident in forward_rows(args.rounds, device, args.compiled, args.models):
        print(f"| {mode} | {name} | {batch} | {seconds:.4f} | {ratio:.2f} | {used / 1e6:.0f} MB | {resident / 1e6:.1f} MB |", flush=True)
    if not args.no_load:
        print(f"ResNet-50 at budget 1MB, load(mode='cached') until ready: {load_seconds(args.rounds, device):.3f} s (median)")


if __name__ == "__main__":
    main()
