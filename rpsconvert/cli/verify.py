"""`rpsconvert verify` and `convert --verify`: the written file, loaded afresh, beside the original.

The check reads the file from disk into a new copy of the original's architecture, so nothing of
the conversion (its pool in memory, a cache, a mistake in the writer) can make it pass: what is
checked is what a user will load.
"""

from __future__ import annotations

import copy
from pathlib import Path

from rich.table import Table
from torch import nn

from rpsconvert.engine.budget import format_bytes
from rpsconvert.format.architectures import input_shape, normalize
from rpsconvert.format.checkpoint import load
from rpsconvert.quality.batches import Batch, size
from rpsconvert.quality.verification import Verification, random_inputs, verify


def verify_file(path: Path, original: nn.Module, inputs: list[Batch]) -> Verification:
    """The figures of the file at `path`, loaded into a copy of `original`, against it on `inputs`."""
    return verify(load(path, model=copy.deepcopy(original)), original, inputs)


def check_inputs(original: nn.Module, architecture: str | dict | None, data: list[Batch] | None) -> tuple[list[Batch], str, str | None]:
    """The inputs a file is checked on, how a table names them, and for random ones the line to
    print: `data` (held-out examples) when given, else random inputs (`random_check`)."""
    return (data, f"{sum(size(b) for b in data)} held-out inputs", None) if data else random_check(original, architecture)


def random_check(original: nn.Module, architecture: str | dict | None) -> tuple[list[Batch], str, str]:
    """Random inputs to check a file on when there are no example ones (of the shape the model's
    library states, else its first layer's), how a table names them, and the one line that says
    their shape, where it comes from and what they can show."""
    stated = input_shape(architecture) if architecture else None
    inputs = random_inputs(original, shape=stated)
    sample = inputs[0][0]
    kind = f"inputs of shape {'x'.join(map(str, sample.shape))}" if sample.is_floating_point() else f"sequences of {len(sample)} token ids"
    where = f"{sum(size(b) for b in inputs)} random {kind}"
    named = normalize(architecture) if stated else None
    source = f"the input {named['source']}:{named['name']} states" if named else "what its first layer takes"
    return inputs, where, f"note: no example inputs, so {where} ({source}): they check that the file reproduces the model, not its quality on real data"


def verification_table(result: Verification, path: Path, against: str, where: str, budget_bytes: int | None) -> Table:
    table = Table(title=f"{path} against {against} on {where}", title_justify="left", show_header=False)
    f = result.fidelity
    rows = [
        ("absolute error", f"max {result.max_abs_error:.4g}, mean {result.mean_abs_error:.4g}"),
        ("relative error", f"max {result.max_relative_error:.4g}, mean {result.mean_relative_error:.4g}, norm {f.relative_error:.4g}"),
        ("output cosine", f"{f.cosine:.6f}"),
        ("top-1 agreement", "n/a (no classifier logits)" if f.top1_agreement is None else f"{f.top1_agreement:.2%}"),
        ("file size", f"{path.stat().st_size:,} bytes ({format_bytes(path.stat().st_size)})"
         + (f" of a {budget_bytes:,}-byte budget" if budget_bytes else "")),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def gate_message(failures: list[str], path: Path) -> str:
    """The one line of a missed gate: the file is kept (it is the best the run reached), and the
    exit status (2) tells a script that it misses the gate."""
    return f"quality gate missed: {'; '.join(failures)} ({path} is written all the same: the best attempt reached)"
