"""Verification: the figures a user checks before shipping a converted model, and their gates.

Fidelity (fidelity.py) says how close the model is on average; a deployment check also wants the
worst case (the largest absolute error of any output element) and plain tolerances to gate on:
`--atol` on that largest error, `--max-drop` on the share of inputs whose top-1 prediction changed.
Without example inputs, random ones of the shape the model takes (as its library states it, else as
its first layer says) still catch a file that does not reproduce the model (a wrong seed, mapping
or scale), though not a quality loss specific to real data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn

from rpsconvert.quality.batches import Batch, device_of, eval_mode, run, size, split, to_device
from rpsconvert.quality.fidelity import Fidelity, Tally, paired_outputs

FIRST_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
IMAGE_SIDE = 224  # the side of the ImageNet crop, which torchvision's and timm's classifiers take
MAX_VALUES = 2**22  # random input values in all: 27 images of 3x224x224, enough to catch a file that does not reproduce its model


@dataclass(frozen=True)
class Verification:
    fidelity: Fidelity
    max_abs_error: float  # the largest |out - ref| of any output element
    mean_abs_error: float
    max_relative_error: float  # max |out - ref| / max |ref|: the worst error in the outputs' own scale
    mean_relative_error: float  # mean |out - ref| / mean |ref|

    @property
    def top1_drop(self) -> float | None:
        """The share of inputs whose top-1 prediction changed (None without classifier logits)."""
        agreement = self.fidelity.top1_agreement
        return None if agreement is None else 1 - agreement

    def failures(self, max_drop: float | None = None, atol: float | None = None) -> list[str]:
        """What misses the gates, one phrase each (empty when everything passes)."""
        failed = []
        if max_drop is not None:
            if self.top1_drop is None:
                failed.append("the top-1 drop cannot be measured: the model returns no classifier logits (gate on the absolute error instead)")
            elif self.top1_drop > max_drop:
                failed.append(f"top-1 drop {self.top1_drop:.2%} > max drop {max_drop:.2%}")
        if atol is not None and self.max_abs_error > atol:
            failed.append(f"max absolute error {self.max_abs_error:.4g} > atol {atol:.4g}")
        return failed

    def to_dict(self) -> dict:
        return {**asdict(self), "top1_drop": self.top1_drop}


@torch.no_grad()
def verify(model: nn.Module, reference: nn.Module, data: Iterable[Batch]) -> Verification:
    """Every figure of `model` against `reference` (the original) on the batches of `data`."""
    abs_max, abs_sum, ref_max, ref_sum, count = 0.0, 0.0, 0.0, 0.0, 0
    tally = Tally(device_of(model))
    with eval_mode(model, reference):
        for batch in data:
            batch = to_device(batch, device_of(model))
            pairs = paired_outputs(run(model, batch), run(reference, batch))
            tally.add(pairs, size(batch))
            for _, out, target in pairs:
                error, target = (out.double() - target.double()).abs(), target.double().abs()
                abs_max, ref_max = max(abs_max, float(error.max())), max(ref_max, float(target.max()))
                abs_sum, ref_sum, count = abs_sum + float(error.sum()), ref_sum + float(target.sum()), count + error.numel()
    return Verification(
        fidelity=tally.result(),
        max_abs_error=abs_max,
        mean_abs_error=abs_sum / max(count, 1),
        max_relative_error=abs_max / ref_max if ref_max > 0 else float(abs_max > 0),
        mean_relative_error=abs_sum / ref_sum if ref_sum > 0 else float(abs_sum > 0),
    )


def random_inputs(
    model: nn.Module, samples: int = 256, seed: int = 0, batch_size: int = 64, shape: tuple[int, ...] | None = None,
) -> list[Batch]:
    """Random inputs `model` accepts: standard normal samples of one sample's `shape` where its
    library states it (format.architectures.input_shape), else of what its first layer takes: rows
    for a Linear, token ids for an Embedding (sequences of 16), images of a Conv2d's channels at
    224x224 (the ImageNet crop, what classifiers take). Large samples are fewer: MAX_VALUES in all.

    A first layer that does not say its input's shape (a Conv1d's length, a Conv3d's frames), or
    a shape the model refuses to run, is a ValueError that asks for example inputs."""
    first = next((m for m in model.modules() if isinstance(m, FIRST_LAYERS)), None)
    generator = torch.Generator().manual_seed(seed)
    if shape is None and isinstance(first, nn.Embedding):
        data = torch.randint(first.num_embeddings, (samples, 16), generator=generator)
    else:
        shape = shape or _first_layer_input(model, first)
        dtype = first.weight.dtype if first is not None else torch.get_default_dtype()
        data = torch.randn(min(samples, max(1, MAX_VALUES // math.prod(shape))), *shape, generator=generator, dtype=dtype)
    try:
        with torch.no_grad(), eval_mode(model):
            run(model, data[:1])
    except Exception as exc:  # whatever breaks, the model does not take this shape
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shown = "x".join(map(str, data.shape[1:]))
        raise ValueError(f"cannot tell the input shape of {type(model).__name__} (random inputs of shape {shown} fail in it: {reason}): "
                         "pass example inputs (--data FILE)") from None
    return split(data, batch_size)


def _first_layer_input(model: nn.Module, first: nn.Module | None) -> tuple[int, ...]:
    """One sample's shape as the first layer says it: a Linear's width, a Conv2d's channels at 224x224."""
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    if isinstance(first, nn.Conv2d):
        return (first.in_channels, IMAGE_SIDE, IMAGE_SIDE)
    found = f"its first layer is {type(first).__name__}" if first is not None else "it has no Linear, Conv or Embedding layer"
    raise ValueError(f"cannot tell the input shape of {type(model).__name__} ({found}): pass example inputs (--data FILE)")
