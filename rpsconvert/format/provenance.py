"""What made a checkpoint, recorded in its manifest under "provenance" (docs/cli.md, "Provenance").

A file that says which versions, call and plan made it, and how close it came to the original, can
be trusted or reproduced months later. A budget is a promise about the file, though, and
sizing.header_bound bounds the header from the manifest as it will be written, before the pool is
sized. So every field is known by then or has its room reserved: figures learnt later (the plan's
weight errors, the weight error and fidelity of the result, a quality gate) are rounded by
`figure`, whose JSON is never longer than PLACEHOLDER's, and `reserved` stands the longest possible
value in for each of them.

A file is meant to be shared, and the same input converted the same way must give the same bytes
wherever it is written: so the provenance names what made the file (`made_from`: an input's name
and sha256) and never where anything lies (no output path, no directory of the input).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import sys
from pathlib import Path

import torch

from rpsconvert.engine import plan
from rpsconvert.engine.storage import MixedStorage
from rpsconvert.version import __version__

PLACEHOLDER = -9.99999e15  # JSON -9999990000000000.0: no figure() is longer (repr switches to e-notation at 1e16)
LATER = ("weight_error", "fidelity", "gate")  # measured after conversion: a caller reserves one by passing it as None
MEASURED_ON = ("converted", "recovered", "file")  # held-out inputs after conversion or recovery; the written file reloaded
BUDGET_WIDTH = 20  # characters: 2**64 bytes has 20 digits
FIDELITY_FIGURES = ("top1_agreement", "cosine", "relative_error", "max_abs_error")


def figure(x: float | None) -> float | None:
    """`x` to 6 significant digits, enough for a cosine of 0.99998 (None when there is no finite
    value: JSON has no NaN)."""
    return float(f"{x:.5e}") if x is not None and math.isfinite(x) else None


def record(call: dict, seed: int, layers: dict[str, list[str]], extra: dict | None) -> dict:
    """The provenance of a conversion, the plan's candidates still to come (`plan_rows`)."""
    later = [key for key in extra or {} if key in LATER and extra[key] is not None]
    if later:
        raise ValueError(f"provenance {', '.join(later)} is measured after conversion: pass it as None to reserve its room")
    own = {"rpsconvert", "torch", "python", "seed", "call", "layers", "plan"} & set(extra or {})
    if own:
        raise ValueError(f"provenance {', '.join(sorted(own))} is recorded by convert itself: name your facts otherwise")
    return {
        "rpsconvert": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "seed": seed,
        "call": call,
        **(extra or {}),
        "layers": layers,
        "plan": [],
    }


def plan_rows(scored: list[plan.Candidate]) -> list[dict]:
    """The candidates the plan weighed: storage, slots and weight error (rounded: see `figure`).
    Their file bytes follow from storage and slots, and are left out so that the header's bound
    does not depend on the budget: the minimum budget a BudgetError names must fit when passed."""
    return [{"storage": str(c.storage), "slots": c.slots, "weight_error": figure(c.error)} for c in scored]


def reserved(provenance: dict, planned: bool, max_slots: int, budget: str | int) -> dict:
    """`provenance` with the longest value each unknown field can take, for sizing the header: the
    plan's rows (when the plan chooses: `planned`) and the reserved LATER fields. The budget, as
    given, is bounded by BUDGET_WIDTH characters wherever it is quoted (the call, a command line),
    so that spelling it otherwise (1kB, then the 8144 an error named) keeps the bound."""
    bound = copy.deepcopy(provenance)
    wide = "9" * max(BUDGET_WIDTH, len(str(budget)))
    bound["call"]["budget"] = wide
    for key, value in bound.items():
        if isinstance(value, list):
            bound[key] = [wide if word == str(budget) else word for word in value]
    if planned:
        # a row per candidate storage (each named as it is), and one for the per-layer mix the plan may add (plan.mixed)
        widths = [len(str(c)) for c in plan.CANDIDATES] + [len(_widest_mix())]
        bound["plan"] = [{"storage": "9" * n, "slots": _nines(max_slots), "weight_error": PLACEHOLDER} for n in widths]
    if "weight_error" in bound:
        bound["weight_error"] = PLACEHOLDER
    if "fidelity" in bound:
        bound["fidelity"] = {"on": max(MEASURED_ON, key=len), **dict.fromkeys(FIDELITY_FIGURES, PLACEHOLDER)}
    if "gate" in bound:
        bound["gate"] = {"passed": False, "max_drop": PLACEHOLDER, "atol": PLACEHOLDER}
    return bound


def fidelity(on: str, figures: dict[str, float | None]) -> dict:
    """The "fidelity" entry: figures measured `on` held-out data (MEASURED_ON), the FIDELITY_FIGURES
    that were measured (the others null)."""
    if on not in MEASURED_ON:
        raise ValueError(f"fidelity is measured on one of {MEASURED_ON}, not {on!r}")
    return {"on": on, **{name: figure(figures.get(name)) for name in FIDELITY_FIGURES}}


def gate(passed: bool, max_drop: float | None, atol: float | None) -> dict:
    """The "gate" entry: whether the file met the quality gates it was asked to meet."""
    return {"passed": passed, "max_drop": figure(max_drop), "atol": figure(atol)}


def fill(provenance: dict, key: str, value: dict | float | None) -> None:
    """Record a LATER field; only a reserved one, since the header was sized with its room."""
    if key not in provenance:
        raise ValueError(f"provenance {key!r} was not reserved when the file was sized: pass it as None to convert")
    provenance[key] = value


def made_from(source: str | Path) -> dict:
    """An input as the provenance names it (`input_name`) with its sha256: a file's, or a
    directory's (a Hugging Face model) for each file in it, hidden ones (a download cache's) left
    out; a library's model name (torchvision:resnet50) has no file of its own."""
    path, named = Path(source), {"name": input_name(source)}
    if path.is_file():
        return {**named, "sha256": _sha256(path)}
    if path.is_dir():
        files = sorted(f.relative_to(path) for f in path.rglob("*") if f.is_file())
        return {**named, "files": {f.as_posix(): _sha256(path / f) for f in files if not any(part.startswith(".") for part in f.parts)}}
    return named


def input_name(source: str | Path) -> str:
    """A file or directory by its own name, never its path; anything else (a model name) as given."""
    path = Path(source)
    return path.resolve().name if path.exists() else str(source)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _nines(n: int) -> int:
    return 10 ** len(str(n)) - 1


def _widest_mix() -> str:
    """The longest name a mix can have: every width, each share spelled as widely as 100%."""
    return re.sub(r"\d+%", "100%", str(MixedStorage(tuple((1, part) for part in plan.QUANTIZED))))
