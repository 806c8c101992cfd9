"""`--budget 256kB,1MB,4MB` or `--ratio 0.01,0.05,0.2`: one conversion per point, and the curve.

Choosing a budget is choosing a point on a quality-versus-bytes curve, so a sweep draws the curve:
one file per point (its name suffixed with the point), a markdown table printed and written beside
them, and quality against file bytes on a log axis as a PNG. Every point is the ordinary convert
command with --verify (on random inputs without --calibrate, after recovery with --recover-steps),
and its figures are read back from its file's provenance: the curve shows the files as a user will
load them, and each file still says how it scored. Without --calibrate data, the figures on random
inputs only say that each file reproduces its model, so the curve is the weight-space error
(`WEIGHT_SPACE`) and says so; with data, it is the fidelity on the held-out inputs.

What does not depend on the point is done once (`reusing`): reading the model, loading (and
tokenizing) the --calibrate inputs, and the original model's side of calibration. Each file is the
one the same command would write for its point alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from rpsconvert.engine.budget import format_bytes
from rpsconvert.format.checkpoint import read
from rpsconvert.quality.calibration import reusing_reference

T = TypeVar("T")
_shared: ContextVar[dict | None] = ContextVar("rpsconvert_sweep_shared", default=None)

SUFFIX = ".rps.safetensors"
WEIGHT_SPACE = ("weight-space error: no --calibrate data, so the curve is ||W - W_orig|| / ||W_orig|| over the compressed weights, "
                "not quality on real inputs (each file was checked on random ones: it reproduces its model)")


def points(budget: str | None, ratio: str | None) -> list[str]:
    """The points of a sweep (empty for a single conversion); each is checked by the conversion."""
    given = budget if budget is not None else ratio
    if given is None or "," not in given:
        return []
    listed = [p.strip() for p in given.split(",")]
    if not all(listed) or len(set(listed)) < len(listed):
        raise ValueError(f"a sweep is distinct points separated by commas, such as 256kB,1MB,4MB or 0.01,0.05; got {given!r}")
    return listed


@contextmanager
def reusing() -> Iterator[None]:
    """The points of a sweep, run inside, share what does not depend on the point: what `once`
    makes (the model read, the example inputs loaded) and the original's side of calibration."""
    token = _shared.set({})
    try:
        with reusing_reference():
            yield
    finally:
        _shared.reset(token)


def once(key: tuple, make: Callable[[], T]) -> T:
    """`make()`; inside `reusing()`, made by the first point that asks with this key, then shared."""
    made = _shared.get()
    if made is None:
        return make()
    if key not in made:
        made[key] = make()
    return made[key]


def ratio_of(text: str) -> float:
    """A --ratio as a number (its range is checked by check_ratio)."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"ratio must be a number in (0, 1], such as 0.01, got {text!r}") from None


def outputs(base: Path, listed: list[str], kind: str) -> tuple[list[Path], Path, Path]:
    """Where a sweep writes: a file per point beside `base`, named after it and the point
    (m.1MB.rps.safetensors, m.ratio0.05.rps.safetensors), then its table (.md) and plot (.png)."""
    name = base.name
    stem, ext = (name[: -len(SUFFIX)], SUFFIX) if name.endswith(SUFFIX) else (base.stem, base.suffix)
    label = "" if kind == "budget" else "ratio"
    files = [base.with_name(f"{stem}.{label}{point}{ext}") for point in listed]
    return files, base.with_name(f"{stem}.sweep.md"), base.with_name(f"{stem}.sweep.png")


def row(point: str, path: Path) -> dict:
    """A point's figures, from its file: bytes, ratio, and the weight error and fidelity its
    provenance records."""
    ckpt = read(path)
    elements = sum(w.numel for w in ckpt.pool.weights.values())
    made_by = ckpt.manifest["provenance"]
    return {"point": point, "file": str(path), "bytes": path.stat().st_size, "ratio": ckpt.pool.size / max(elements, 1),
            "weight_error": made_by["weight_error"], **{k: v for k, v in made_by["fidelity"].items() if k != "on"}}


def markdown(rows: list[dict], measured: bool) -> str:
    """The sweep as a markdown table, smallest file first: the fidelity columns when it was
    `measured` on held-out data, else the weight-space error, under a line that says why."""
    columns = ["top-1 agreement", "output cosine", "relative error"] if measured else ["weight error"]
    lines = ([] if measured else [WEIGHT_SPACE, ""]) + [f"| point | file bytes | ratio | {' | '.join(columns)} |", "|---|---:|---:|" + "---:|" * len(columns)]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        top1 = f"{r['top1_agreement']:.2%}" if r["top1_agreement"] is not None else "n/a"
        figures = [top1, f"{r['cosine']:.6f}", f"{r['relative_error']:.4g}"] if measured else [f"{r['weight_error']:.4g}"]
        lines.append(f"| {r['point']} | {r['bytes']:,} ({format_bytes(r['bytes'])}) | {r['ratio']:.4g} | {' | '.join(figures)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str, measured: bool) -> str | None:
    """Quality against file bytes (log x) as a PNG at `path`: when `measured` on held-out data,
    top-1 agreement for a classifier, else output cosine; without data, the weight-space error.
    None when written, else the one-line note why not (no matplotlib)."""
    try:
        from matplotlib.figure import Figure  # a dev extra: a sweep without it still writes its table
    except ImportError:
        return f"note: matplotlib is not installed, so {path} is not drawn (pip install matplotlib); the table has the figures"
    ordered = sorted(rows, key=lambda r: r["bytes"])
    if not measured:
        key, label = "weight_error", "weight-space error (no data: not quality)"
    elif all(r["top1_agreement"] is not None for r in ordered):
        key, label = "top1_agreement", "top-1 agreement with the original"
    else:
        key, label = "cosine", "output cosine with the original"
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    axes.plot([r["bytes"] for r in ordered], [r[key] for r in ordered], marker="o")
    for r in ordered:
        axes.annotate(r["point"], (r["bytes"], r[key]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    axes.set(xscale="log", xlabel="file bytes", ylabel=label, title=title)
    axes.grid(True, which="both", alpha=0.3)
    figure.savefig(path, dpi=120)
    return None
