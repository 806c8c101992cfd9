"""How close a converted model is to its original, measured on held-out inputs.

Three numbers over every floating-point output tensor: top-1 agreement (classifier logits only: the
fraction of rows whose argmax matches), mean cosine of the output vectors (last dimension) and the
relative error ||out - ref|| / ||ref||. They must be measured on data the conversion and the
recovery never saw, or they flatter the result: a pool fitted to a calibration set matches it better
than it matches new inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from rpsconvert.batches import Batch, device_of, eval_mode, is_logits, outputs, process_group, run, shard, size, to_device
from rpsconvert.layers import find_pool


@dataclass(frozen=True)
class Fidelity:
    samples: int
    relative_error: float
    cosine: float
    top1_agreement: float | None = None  # None when no output is classifier logits

    def summary(self) -> str:
        top1 = f"top-1 agreement {self.top1_agreement:.2%}, " if self.top1_agreement is not None else ""
        return f"{top1}output cosine {self.cosine:.4f}, relative error {self.relative_error:.4f} ({self.samples} samples)"


def paired_outputs(output, reference_output) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(path, tensor, reference tensor) for every floating-point output, checked to line up."""
    ours, theirs = outputs(output), outputs(reference_output)
    if [(p, t.shape) for p, t in ours] != [(p, t.shape) for p, t in theirs]:
        raise ValueError(
            "the model and its original return different outputs: "
            f"{[(p, tuple(t.shape)) for p, t in ours]} vs {[(p, tuple(t.shape)) for p, t in theirs]}"
        )
    return [(p, a, b) for (p, a), (_, b) in zip(ours, theirs)]


@torch.no_grad()
def fidelity(
    model: nn.Module,
    reference: nn.Module,
    data: Iterable[Batch],
    *,
    inputs: Callable[[Batch], Batch] | None = None,
) -> Fidelity:
    """Agreement of `model` with `reference` (the original) over the batches of `data`.

    Both run in eval mode (restored afterwards). `inputs` picks the model's input from a batch that
    also holds labels, e.g. `inputs=lambda b: b[0]`. Under torchrun every process passes the same
    batches, measures its share of each and all get the global figures.
    """
    device = device_of(model)
    rank, world = process_group()
    # squared error, squared reference, cosine sum, vectors, top-1 matches, rows, samples, has logits
    sums = torch.zeros(8, dtype=torch.float64, device=device)
    with eval_mode(model, reference):
        for batch in data:
            batch = shard(to_device(inputs(batch) if inputs else batch, device), rank, world)
            if size(batch) == 0:
                continue
            pairs = paired_outputs(run(model, batch), run(reference, batch))
            for _, out, target in pairs:
                out, target = out.double(), target.double()
                sums[0] += (out - target).square().sum()
                sums[1] += target.square().sum()
                sums[2] += F.cosine_similarity(out, target, dim=-1).sum()
                sums[3] += target.numel() // target.shape[-1]
            logits = [(out, target) for path, out, target in pairs if is_logits(path, target)]
            if logits:
                out, target = logits[0]
                sums[4] += (out.argmax(-1) == target.argmax(-1)).sum()
                sums[5] += target.numel() // target.shape[-1]
                sums[7] = 1
            sums[6] += size(batch)
    if world > 1:
        torch.distributed.all_reduce(sums)
    err, ref, cos, vectors, agree, rows, samples, has_logits = sums.tolist()
    if samples == 0:
        raise ValueError("no batch to measure fidelity on")
    return Fidelity(
        samples=int(samples),
        relative_error=(err / ref) ** 0.5 if ref > 0 else float(err > 0),
        cosine=cos / max(vectors, 1),
        top1_agreement=agree / rows if has_logits else None,
    )


@torch.no_grad()
def layer_errors(
    model: nn.Module,
    reference: nn.Module,
    data: Iterable[Batch],
    *,
    inputs: Callable[[Batch], Batch] | None = None,
) -> dict[str, float]:
    """Relative output error of every compressed layer of `model`, each fed the original's inputs.

    Each layer is measured alone (`||layer(x) - original_layer(x)|| / ||original_layer(x)||` with x
    the original model's activations), so the figure says how well that layer's weights were
    reconstructed, not how errors of earlier layers pile up. Layers are listed in forward order.
    """
    names = []
    for spec in find_pool(model).specs.values():
        for name in (spec.name, *spec.aliases):
            module = name.rpartition(".")[0]
            if module and module not in names:
                names.append(module)
    sums: dict[str, list[float]] = {}

    def measure(name: str):
        student = model.get_submodule(name)

        def hook(module, args, kwargs, output):
            pairs = paired_outputs(student(*args, **kwargs), output)
            entry = sums.setdefault(name, [0.0, 0.0])
            entry[0] += sum(float((a.double() - b.double()).square().sum()) for _, a, b in pairs)
            entry[1] += sum(float(b.double().square().sum()) for _, _, b in pairs)

        return hook

    handles = [reference.get_submodule(n).register_forward_hook(measure(n), with_kwargs=True) for n in names]
    device = device_of(model)
    try:
        with eval_mode(model, reference):
            for batch in data:
                run(reference, to_device(inputs(batch) if inputs else batch, device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (e / r) ** 0.5 if r > 0 else float(e > 0) for name, (e, r) in sums.items()}
