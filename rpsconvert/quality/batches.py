"""Batches and outputs of any shape: how to feed a model and what to compare in its answer.

A batch is a tensor (`model(x)`), a tuple or list of tensors (`model(*batch)`) or a dict of tensors
(`model(**batch)`). An output is a tensor, a tuple, a dict or a dataclass-like object (Hugging Face's
`ModelOutput`); what recovery and the fidelity report compare are the floating-point tensors in it,
found in a fixed order, so the converted model's and the original's line up one to one.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import torch
from torch import nn

from rpsconvert.errors import InputError

Batch = Union[torch.Tensor, tuple, list, dict]
TEXT_SUFFIXES = (".txt",)  # calibration files of text, one example per line
MAX_TOKENS = 512  # tokens per example of a text file, at most: BERT's window, ample for calibration


def run(model: nn.Module, batch: Batch) -> Any:
    """Call `model` the way the batch's shape says: model(x), model(*batch) or model(**batch)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """The floating-point tensors of an output (with at least one dimension), each with its path.

    The path ("logits", "1", "hidden_states.3") lets the loss treat classifier logits apart from
    embeddings; a scalar such as a model's own `loss` is left out, it is not an output to match.
    """
    found: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.ndim > 0:
                found.append((path, value))
        elif isinstance(value, dict):  # also Hugging Face ModelOutput, an OrderedDict of its non-None fields
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(item, f"{path}.{i}" if path else str(i))

    walk(output, "")
    return found


def is_logits(path: str, tensor: torch.Tensor) -> bool:
    """Classifier scores: an output named like logits, or an unnamed (batch, classes) matrix."""
    named = [part for part in path.split(".") if part and not part.isdigit()]
    return "logit" in path.lower() if named else tensor.ndim == 2


def device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Models in eval mode (no dropout, batch-norm running statistics) for a while, then as before."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def size(batch: Batch) -> int:
    """Number of samples: the first dimension of the batch's first tensor."""
    if isinstance(batch, dict):
        return size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return size(batch[0])
    return batch.shape[0]


def take(batch: Batch, index: torch.Tensor | slice) -> Batch:
    """The samples `index` of every tensor in the batch."""
    if isinstance(batch, dict):
        return {k: take(v, index) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(v, index) for v in batch)
    return batch[index] if isinstance(batch, torch.Tensor) else batch


def process_group() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (torchrun), (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """This process's contiguous share of a global batch (equal shares when the size divides).

    Every process of a torchrun job iterates over the same global batches and keeps its share, so
    a run on k processes sees exactly the samples a single process would, k times faster.
    """
    n = size(batch)
    lo, hi = n * rank // world, n * (rank + 1) // world
    return take(batch, slice(lo, hi))


def split(data: Batch, batch_size: int) -> list[Batch]:
    """A set of samples (a tensor, tuple or dict with the samples along dim 0) cut into batches."""
    n = size(data)
    return [take(data, slice(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)]


def load_calibration(
    path: str | Path, holdout: float = 0.2, seed: int = 0, batch_size: int = 32, *, tokenizer: Any = None,
    max_length: int = MAX_TOKENS,
) -> tuple[list[Batch], list[Batch]]:
    """Example inputs from a tensor or text file, shuffled and split into calibration and held-out batches.

    The file is `.safetensors` (one tensor, or several named ones passed as keyword arguments such
    as input_ids and attention_mask), `.npy`, a `.pt` holding a tensor, a tuple or a dict of
    tensors (read with weights_only=True: nothing is unpickled), or a `.txt` file of examples, one
    per line, which `tokenizer` (a Hugging Face tokenizer) turns into the model's inputs (see
    `tokenize_lines`). The held-out part (`holdout` of the samples, at least one when there are two
    or more) is for the fidelity report only, so the quality printed is measured on inputs the
    conversion never saw.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise InputError(f"{path.name} is text: pass tokenizer= (the model's Hugging Face tokenizer) to turn it into inputs")
        data: Batch = tokenize_lines(path, tokenizer, max_length)
    elif suffix == ".safetensors":
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(path))
        data = next(iter(tensors.values())) if len(tensors) == 1 else tensors
    elif suffix == ".npy":
        import numpy as np

        data = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix in (".pt", ".pth"):
        data = torch.load(path, weights_only=True, map_location="cpu")
    else:
        raise ValueError(f"cannot read calibration data from {path.name}: use a .safetensors, .npy or .pt file")
    _check_samples(data, path)
    n = size(data)
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")
    held = min(max(round(n * holdout), 1 if holdout > 0 and n >= 2 else 0), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    data = take(data, order)
    calibration, heldout = split(take(data, slice(held, n)), batch_size), split(take(data, slice(0, held)), batch_size)
    if suffix in TEXT_SUFFIXES:
        return [_trim(b) for b in calibration], [_trim(b) for b in heldout]
    return calibration, heldout


def read_lines(path: str | Path) -> list[str]:
    """The examples of a text file: its non-blank lines, stripped. The file must be UTF-8 (a byte
    order mark is allowed): text in another encoding would otherwise be tokenized into garbage
    without a word of warning."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                         "save it as UTF-8, one example per line") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{path.name} holds no text: write one example per line")
    return lines


def tokenize_lines(path: str | Path, tokenizer: Any, max_length: int = MAX_TOKENS) -> dict[str, torch.Tensor]:
    """A text file's examples (one per line) as the tensors a Hugging Face model takes as keyword
    arguments: input_ids, attention_mask and whatever else `tokenizer` returns, one row per line.

    Each line is truncated to `max_length` tokens (and to what the tokenizer allows) and padded to
    the longest (with the end-of-text token if the tokenizer has no padding token, as GPT-2's); the
    attention mask tells the model which tokens are padding, and `load_calibration` cuts each batch
    back to its own longest line.
    """
    limit = min(max_length, getattr(tokenizer, "model_max_length", max_length))
    if tokenizer.pad_token is None:  # GPT-2's has none; padding is masked out, so any token will do
        if tokenizer.eos_token is None:
            raise InputError(f"{Path(path).name} needs padding to batch lines of different lengths, and the tokenizer has no padding or end-of-text token")
        tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer stays as it was
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(read_lines(path), padding="longest", truncation=True, max_length=limit, return_tensors="pt")
    return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of tokenized text without the token positions that are padding in all its rows, so
    a batch of short lines does not pay for the file's longest (nor calibrate on its padding)."""
    if "attention_mask" not in batch:
        return batch
    keep = batch["attention_mask"].any(dim=0)
    return {key: value[:, keep] for key, value in batch.items()}


def _check_samples(data: Any, path: Path) -> None:
    tensors = list(data.values()) if isinstance(data, dict) else list(data) if isinstance(data, (tuple, list)) else [data]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in tensors):
        raise ValueError(f"{path.name} must hold a tensor, a tuple or a dict of tensors with the samples along dim 0")
    counts = {t.shape[0] for t in tensors}
    if len(counts) != 1:
        raise ValueError(f"the tensors in {path.name} disagree on the number of samples: {sorted(counts)}")


def cycle(data: Iterable[Batch]):
    """Batches forever, re-iterating `data` (a list or a DataLoader) whenever it runs out."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data gave no batch")
