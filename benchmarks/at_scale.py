"""Converting Llama-architecture models larger than memory, from their bf16 shards (issue 20).

    .venv/bin/python benchmarks/at_scale.py make 125m /data/llama-125m   # random-init bf16 shards
    .venv/bin/python benchmarks/at_scale.py convert /data/llama-125m --fraction 8 --fraction 32
    .venv/bin/python benchmarks/at_scale.py convert /data/llama-125m --fraction 8 --calibrate 16

`make` writes a random-init model of the real Llama shapes (transformers' LlamaConfig) as bf16
shards of at most 2 GB with their index and config.json, one tensor at a time: the model is never
whole in memory, so the 7B one (13.5 GB) is made on a 24 GB machine. `convert` runs
`rpsconvert DIR --budget B -o OUT/` in a fresh process for each budget (1/FRACTION of the bf16
bytes) and prints its wall and CPU seconds, its peak resident memory (the child's ru_maxrss), the
file's bytes and the CPU seconds per billion weights, so that 125M, 1B and 7B compare per weight.
Then, in another fresh process, the result is loaded lean (`rpsconvert.load(OUT)`) and runs one
forward pass of 16 tokens: the memory it takes beyond the imports, after loading and at the peak of
the forward pass, against the checkpoint's bytes (the memory budget is run-time memory). With
`--calibrate N` the command also gets N random sequences of 128 tokens and a --max-memory below
what loading the model whole would take, so it calibrates block by block from the files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
import typer
import transformers

from rpsconvert.format.serialized import serialize

SIZES = {  # (hidden, layers, intermediate, heads): the family of Llama's shapes, vocabulary 32000
    "125m": (768, 12, 2048, 12),
    "1b": (2048, 16, 5504, 16),
    "7b": (4096, 32, 11008, 32),
}
SHARD = 2 << 30  # bytes of one shard at most
RPSCONVERT = Path(sys.executable).parent / "rpsconvert"
app = typer.Typer(add_completion=False)
# runs the command and prints its CPU seconds and peak resident bytes: the child's own, not the largest so far
MEASURED = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024]))
sys.exit(done.returncode)
"""
# loads a converted directory lean and runs it on 16 tokens; prints the resident bytes beyond the
# imports after loading and at the forward pass's peak, and the forward pass's seconds. The baseline
# is taken once a tiny Llama was built on meta and run: the libraries its code imports (about 200 MB
# of transformers' integrations) are the same for every size, and not the checkpoint's
LOADED = """
import json, resource, sys, time, torch, transformers, rpsconvert
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tiny = transformers.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
with torch.no_grad():
    transformers.LlamaForCausalLM(tiny)(torch.arange(16)[None])
base = peak()
model = rpsconvert.load(sys.argv[1]).eval()
loaded = peak()
start = time.perf_counter()
with torch.no_grad():
    model(torch.arange(16)[None])
print(json.dumps([loaded - base, peak() - base, time.perf_counter() - start]))
"""


def config_of(size: str, layers: int | None = None) -> transformers.LlamaConfig:
    hidden, all_layers, intermediate, heads = SIZES[size]
    layers = layers or all_layers
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                                    num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000, dtype="bfloat16")


@app.command()
def make(size: str, directory: Path, layers: int = typer.Option(0, help="Fewer layers than SIZE has (0: all): its shapes, in less time.")) -> None:
    """Write a random-init Llama of SIZE (125m, 1b, 7b) as bf16 shards, one tensor in memory at a time."""
    config = config_of(size, layers)
    with torch.device("meta"):
        shapes = {name: (tuple(t.shape), t.ndim) for name, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, weight_map = [], {}, {}

    def flush() -> None:
        if current:
            shards.append(dict(current))
            name = f"part-{len(shards):05d}.safetensors"
            with open(directory / name, "wb") as f:
                serialize(current, {"format": "pt"}).write_to(f)
            weight_map.update(dict.fromkeys(current, name))
            current.clear()

    for name, (shape, ndim) in shapes.items():
        tensor = torch.ones(shape) if ndim == 1 else torch.randn(shape, generator=generator) * config.initializer_range
        tensor = tensor.to(torch.bfloat16)
        if sum(t.numel() * 2 for t in current.values()) + tensor.numel() * 2 > SHARD:
            flush()
        current[name] = tensor
    flush()
    total = len(shards)
    final = {}
    for index in range(1, total + 1):  # the Hugging Face names, now that the count is known
        new = f"model-{index:05d}-of-{total:05d}.safetensors"
        (directory / f"part-{index:05d}.safetensors").rename(directory / new)
        final[f"part-{index:05d}.safetensors"] = new
    size_bytes = sum((directory / name).stat().st_size for name in final.values())
    index = {"metadata": {"total_size": size_bytes}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    count = sum(torch.Size(shape).numel() for shape, _ in shapes.values())
    print(f"{size}: {count / 1e9:.3f} B weights, {total} shards, {size_bytes / 1e9:.2f} GB in {directory}")


@app.command()
def convert(
    directory: Path, fraction: list[int] = typer.Option([8, 32]), keep: bool = False,
    calibrate: int = typer.Option(0, help="Calibrate on this many random sequences of 128 tokens, block by block from the files."),
    max_memory: str = typer.Option("6GB", help="--max-memory of a calibrating run: below what loading the model whole would take."),
) -> None:
    """Convert DIRECTORY at 1/FRACTION of its bf16 bytes, each in a fresh process, and print the table."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    source_bytes = index["metadata"]["total_size"]
    weights = source_bytes // 2
    print(f"{directory.name}: {weights / 1e9:.3f} B weights, {source_bytes / 1e9:.2f} GB bf16")
    extra = []
    if calibrate:  # a random-init model has no language: random tokens are as good as any
        tokens = torch.randint(0, 32000, (calibrate, 128), generator=torch.Generator().manual_seed(0))
        data = Path(tempfile.mkdtemp(dir=directory.parent)) / "calibration.safetensors"
        safetensors.torch.save_file({"input_ids": tokens}, data)
        extra = ["--calibrate", str(data), "--max-memory", max_memory]
        print(f"calibrating on {calibrate} sequences of 128 tokens, --max-memory {max_memory}")
    print(f"{'budget':>12} {'file bytes':>14} {'wall s':>8} {'CPU s':>8} {'peak RSS':>10} {'CPU s / B weights':>18} "
          f"{'loaded / file':>14} {'forward / file':>15} {'forward s':>10} {'weight error':>13}  plan")
    for k in fraction:
        budget = source_bytes // k
        out = Path(tempfile.mkdtemp(dir=directory.parent)) / "out"
        command = [str(RPSCONVERT), str(directory), "--budget", str(budget), "-o", f"{out}/", "--json", "--quiet", *extra]
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            print(f"1/{k}: failed: {result.stderr.strip()}")
            continue
        *lines, usage = result.stdout.strip().splitlines()
        report, (cpu, peak) = json.loads(lines[-1]), json.loads(usage)
        loaded = subprocess.run([sys.executable, "-c", LOADED, str(out)], capture_output=True, text=True, check=True)
        after_load, at_forward, forward = json.loads(loaded.stdout.strip().splitlines()[-1])
        size = report["file_bytes"]
        print(f"{'1/' + str(k):>12} {size:>14,} {wall:>8.0f} {cpu:>8.0f} {peak / 2**30:>8.2f} GiB "
              f"{cpu / (weights / 1e9):>18.0f} {after_load / size:>14.2f} {at_forward / size:>15.2f} {forward:>10.1f} "
              f"{report['quality']['weight error']:>13.4g}  "
              f"{report['report']['pool_dtype']}, ratio {report['report']['ratio']:.3g}")
        for note in report["report"]["notes"]:
            if note.startswith("calibration "):
                print(f"{'':>12} {note}")
        if not keep:
            shutil.rmtree(out.parent)


if __name__ == "__main__":
    app()
