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

from rpsconvert.quality.batches import Batch, device_of, eval_mode, is_logits, outputs, process_group, run, shard, size, to_device
from rpsconvert.engine.modules import find_pool
from rpsconvert.engine.plan import error_sums
from rpsconvert.engine.projection import Reader, in_memory


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


class Tally:
    """The sums the figures of a Fidelity are made of, added batch by batch: `fidelity` keeps one,
    and so does `verify`, which measures its own figures on the same outputs (each model runs once)."""

    def __init__(self, device: torch.device):
        # squared error, squared reference, cosine sum, vectors, top-1 matches, rows, samples, has logits
        self.sums = torch.zeros(8, dtype=torch.float64, device=device)

    def add(self, pairs: list[tuple[str, torch.Tensor, torch.Tensor]], samples: int) -> None:
        """One batch of `samples` inputs: the `paired_outputs` of the model and its reference."""
        sums = self.sums
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
        sums[6] += samples

    def result(self) -> Fidelity:
        err, ref, cos, vectors, agree, rows, samples, has_logits = self.sums.tolist()
        if samples == 0:
            raise ValueError("no batch to measure fidelity on")
        return Fidelity(
            samples=int(samples),
            relative_error=(err / ref) ** 0.5 if ref > 0 else float(err > 0),
            cosine=cos / max(vectors, 1),
            top1_agreement=agree / rows if has_logits else None,
        )


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
    tally = Tally(device)
    with eval_mode(model, reference):
        for batch in data:
            batch = shard(to_device(inputs(batch) if inputs else batch, device), rank, world)
            if size(batch) == 0:
                continue
            tally.add(paired_outputs(run(model, batch), run(reference, batch)), size(batch))
    if world > 1:
        torch.distributed.all_reduce(tally.sums)
    return tally.result()


@torch.no_grad()
def layer_errors(
    model: nn.Module,
    reference: nn.Module,
    data: Iterable[Batch],
    *,
    inputs: Callable[[Batch], Batch] | None = None,
    isolated: bool = False,
) -> dict[str, float]:
    """Relative output error of every compressed layer against the same layer of the original.

    By default each layer runs inside its own model (`||out - out_orig|| / ||out_orig||` with each
    model on its own activations): it shows where the converted model drifts away from the original
    and whether later layers pull it back. `isolated=True` feeds every layer the original's
    activations instead, so the figure says how well that layer's weights alone were reconstructed.
    Layers are listed in forward order.
    """
    names = []
    for weight in find_pool(model).weights.values():
        for name in (weight.name, *weight.aliases):
            module = name.rpartition(".")[0]
            if module and module not in names:
                names.append(module)
    sums: dict[str, list[float]] = {}
    recorded: dict[str, list] = {name: [] for name in names}

    def add(name: str, output, reference_output) -> None:
        pairs = paired_outputs(output, reference_output)
        entry = sums.setdefault(name, [0.0, 0.0])
        entry[0] += sum(float((a.double() - b.double()).square().sum()) for _, a, b in pairs)
        entry[1] += sum(float(b.double().square().sum()) for _, _, b in pairs)

    def on_reference(name: str):
        student = model.get_submodule(name)

        def hook(module, args, kwargs, output):
            if isolated:
                add(name, student(*args, **kwargs), output)
            else:
                recorded[name].append(output)

        return hook

    def on_model(name: str):
        def hook(module, args, output):
            add(name, output, recorded[name].pop(0))

        return hook

    handles = [reference.get_submodule(n).register_forward_hook(on_reference(n), with_kwargs=True) for n in names]
    if not isolated:
        handles += [model.get_submodule(n).register_forward_hook(on_model(n)) for n in names]
    device = device_of(model)
    try:
        with eval_mode(model, reference):
            for batch in data:
                batch = to_device(inputs(batch) if inputs else batch, device)
                run(reference, batch)
                if not isolated:
                    run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (e / r) ** 0.5 if r > 0 else float(e > 0) for name, (e, r) in sums.items()}


def weight_errors(model: nn.Module, reference: nn.Module | Reader) -> dict[str, float]:
    """Relative weight error ||W - W_orig|| / ||W_orig|| of every compressed weight, and "total".

    The only figure available without example inputs. It says little about quality: the output
    error is what matters, and data-aware projection lowers it while raising this one. The
    originals are `reference`'s parameters, or read a piece at a time (a Reader: the files of a
    model converted without loading it, rpsconvert/streaming.py).
    """
    pool = find_pool(model)
    if isinstance(reference, nn.Module):
        reference = in_memory(dict(reference.named_parameters(remove_duplicate=False)))
    sums = error_sums(pool.operator, list(pool.weights.values()), reference, pool.values())
    errors = {name: (d / n) ** 0.5 if n > 0 else float(d > 0) for name, (d, n) in zip(pool.weights, sums)}
    diff, norm = sum(d for d, _ in sums), sum(n for _, n in sums)
    return {"total": (diff / norm) ** 0.5 if norm > 0 else float(diff > 0), **errors}
