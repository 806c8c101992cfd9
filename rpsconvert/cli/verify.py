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
from rpsconvert.format.checkpoint import load
from rpsconvert.quality.batches import Batch, size
from rpsconvert.quality.verification import Verification, random_inputs, verify


def verify_file(path: Path, original: nn.Module, data: list[Batch] | None) -> tuple[Verification, str]:
    """The figures of the file at `path` against `original`, on `data` or on random inputs, and
    which of the two they were measured on."""
    inputs = data or random_inputs(original)
    loaded = load(path, model=copy.deepcopy(original))
    where = f"{sum(size(b) for b in inputs)} {'held-out' if data else 'random'} inputs"
    return verify(loaded, original, inputs), where


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
