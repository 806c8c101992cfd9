"""Against the peers: HQQ, optimum-quanto, torchao and bitsandbytes at equal bytes, beside the plan.

    python benchmarks/peers.py            # full run: writes docs/benchmarks.md (## Against the peers) and docs/peers.png
    python benchmarks/peers.py --quick    # a smoke run of a few minutes (digits CNN and LM, tiny steps, three budgets)

Every library quantizes the same weights the plan compresses (embeddings included), each weight as
a matrix of output rows (a conv kernel's out x in*kh*kw, an embedding's rows; a weight whose rows
are not a multiple of 128 long as its flat elements in rows of 128, see as_matrix), through the
library's own quantizer: HQQLinear, quanto's quantize and freeze, torchao's quantize_ with
IntxWeightOnlyConfig, and bitsandbytes' Linear4bit, on an nn.Linear holding that matrix. Its bytes
are those of the tensors the library then holds (codes, scales, zero points, at their dtypes),
read from them, except torchao's codes: its CPU tensor keeps them unpacked in int8, so they are
counted packed at their bits (its scales and zero points as held). At each budget each library
gets its configuration (bits, group size, variant) with the lowest weight error among those
whose bytes fit, a choice that needs no data. The model then runs on the library's dequantized
weights. Recovery (at 1/16 and below) is quality.py's, the same steps for every row: a peer's
weights train as floats rounded onto its fixed grid (its scales and zero points) in every forward,
straight-through, as a converted model's quantized pool does.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrained  # noqa: E402
import quality  # noqa: E402
import tasks  # noqa: E402
from quality import Cell, Context  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED_BUDGETS = ("1/4", "1/8", "1/16", "1/32", "1/64")
TRAINED_BUDGETS = PRETRAINED_BUDGETS + ("1/128", "1/256")
QUICK_BUDGETS = ("1/8", "1/16", "1/64")
RECOVERY_FROM = Fraction(1, 16)  # rows recover at this budget and below
START, END = "<!-- peers:start -->", "<!-- peers:end -->"


# ---------------------------------------------------------------- one library's quantized matrix


@dataclass
class Grid:
    """Where a weight may lie: w = (q - zero) * scale, q an integer in [low, high], per group of
    `group` consecutive elements of the (padded) matrix; what recovery rounds onto."""

    scale: torch.Tensor  # (groups, 1)
    zero: torch.Tensor  # (groups, 1)
    low: int
    high: int
    group: int

    def round(self, matrix: torch.Tensor) -> torch.Tensor:
        groups = matrix.reshape(-1, self.group)
        q = (groups / self.scale + self.zero).round().clamp(self.low, self.high)
        return ((q - self.zero) * self.scale).view_as(matrix)


@dataclass
class Quantized:
    weight: torch.Tensor  # the dequantized matrix, float32
    stored: int  # bytes of what the library holds for it
    grid: Grid | None  # None: a codebook grid (NF4, FP4), not recovered


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _linear(matrix: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
    layer.weight.data.copy_(matrix)
    return layer


HQQ_ROWS = 40  # a matrix padded to a multiple of these rows has a multiple of 40 groups, which HQQ's packings divide


def hqq(bits: int, group: int) -> Callable[[torch.Tensor], Quantized]:
    """HQQ (half-quadratic proximal optimization of each group's zero point and scale), codes packed
    as the library packs them, float16 scale and zero per group (HQQLinear's default compute dtype)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    def quantize(matrix: torch.Tensor) -> Quantized:
        rows, groups = matrix.shape[0], matrix.numel() // group
        padded = F.pad(matrix, (0, 0, 0, -rows % HQQ_ROWS))  # HQQ's packing drops groups beyond a multiple of 8 (1-bit) or 10 (3-bit)
        layer = HQQLinear(_linear(padded), BaseQuantizeConfig(nbits=bits, group_size=group), compute_dtype=torch.float16, device="cpu")
        scale, zero = layer.meta["scale"].float()[:groups], layer.meta["zero"].float()[:groups]
        grid = Grid(scale, zero, 0, 2**bits - 1, group)
        return Quantized(layer.dequantize().float()[:rows], _tensor_bytes(layer.W_q, layer.meta["scale"], layer.meta["zero"]), grid)

    return quantize


def quanto(qtype: str) -> Callable[[torch.Tensor], Quantized]:
    """optimum-quanto's weight quantization (qint2 and qint4: groups of 128 with a scale and a
    shift, in the weight's dtype; qint8: one scale per row). Its grids are not recovered here."""
    from optimum import quanto as q

    def quantize(matrix: torch.Tensor) -> Quantized:
        model = nn.Sequential(_linear(matrix))
        q.quantize(model, weights=getattr(q, qtype))
        q.freeze(model)
        weight = model[0].weight
        parts = [getattr(weight, name) for name in weight.__tensor_flatten__()[0]]
        codes = [getattr(p, "_data", p) for p in parts]  # a PackedTensor holds its bytes in _data
        return Quantized(weight.dequantize().float(), _tensor_bytes(*codes), None)

    return quantize


def torchao(bits: int, group: int) -> Callable[[torch.Tensor], Quantized]:
    """torchao's IntxWeightOnlyConfig: asymmetric, a float16 scale and an int8 zero point per
    group; codes counted packed at `bits` (its CPU tensor holds them in int8)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    config = IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group), mapping_type=MappingType.ASYMMETRIC, scale_dtype=torch.float16
    )

    def quantize(matrix: torch.Tensor) -> Quantized:
        layer = _linear(matrix)
        quantize_(layer, config)
        weight = layer.weight
        grid = Grid(weight.scale.float().reshape(-1, 1), weight.zero_point.float().reshape(-1, 1), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, group)
        stored = math.ceil(weight.qdata.numel() * bits / 8) + _tensor_bytes(weight.scale, weight.zero_point)
        return Quantized(weight.dequantize().float(), stored, grid)

    return quantize


def bitsandbytes(kind: str, double: bool) -> Callable[[torch.Tensor], Quantized]:
    """bitsandbytes' Linear4bit: NF4 or FP4 codes in blocks of 64 with an fp32 absmax per block, or
    with `double` the absmax itself quantized to 8 bits (compress_statistics)."""
    import bitsandbytes as bnb

    def quantize(matrix: torch.Tensor) -> Quantized:
        weight = bnb.nn.Params4bit(matrix.clone(), requires_grad=False, quant_type=kind, compress_statistics=double)._quantize("cpu")
        state = weight.quant_state
        stats = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset] if state.nested else [])
        return Quantized(bnb.functional.dequantize_4bit(weight.data, state).float(), _tensor_bytes(weight.data, *stats), None)

    return quantize


@dataclass(frozen=True)
class Peer:
    name: str
    package: str  # its distribution, for the version
    configs: dict[str, Callable[[], Callable[[torch.Tensor], Quantized]]]  # label -> quantizer factory


PEERS = (
    Peer("HQQ", "hqq", {f"{b}-bit, groups of {g}": (lambda b=b, g=g: hqq(b, g)) for b in (1, 2, 3, 4) for g in (32, 64, 128)}),
    Peer("quanto", "optimum-quanto", {t: (lambda t=t: quanto(t)) for t in ("qint2", "qint4", "qint8")}),
    Peer("torchao", "torchao", {f"int{b}, groups of {g}": (lambda b=b, g=g: torchao(b, g)) for b in range(1, 8) for g in (32, 64, 128)}),
    Peer("bitsandbytes", "bitsandbytes", {f"{k}{', double quant' if d else ''}": (lambda k=k, d=d: bitsandbytes(k, d)) for k in ("nf4", "fp4") for d in (False, True)}),
)


# ---------------------------------------------------------------- a peer on a whole model


@dataclass
class Applied:
    """One configuration of a peer on every compressed weight: what it stores and how far it is."""

    label: str
    stored: int
    error: float  # relative weight error over all compressed weights (Frobenius)
    weights: dict[str, Quantized]


ROW = 128  # every group size tried divides it


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the matrix a library quantizes: its output rows where their length is a multiple
    of ROW; otherwise (a depthwise kernel's 9, a first conv's 27) the flat tensor in rows of ROW,
    zero-padded at the end (the padding's codes are counted), so no library refuses a short row or
    pays for padding every one."""
    rows, cols = weight.shape[0], weight[0].numel()
    if cols % ROW == 0:
        return weight.reshape(rows, cols)
    return F.pad(weight.flatten(), (0, -weight.numel() % ROW)).view(-1, ROW)


def from_matrix(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return matrix.flatten()[: like.numel()].view_as(like)


def apply(teacher: nn.Module, names: list[str], label: str, quantizer: Callable[[torch.Tensor], Quantized], keep: bool) -> Applied:
    """The configuration on every weight; `keep`: with the dequantized weights (else bytes and error only)."""
    params = dict(teacher.named_parameters())
    weights, stored, err, total = {}, 0, 0.0, 0.0
    for name in names:
        original = params[name].detach()
        made = quantizer(as_matrix(original))
        stored += made.stored
        err += float((from_matrix(made.weight, original) - original).square().sum())
        total += float(original.square().sum())
        if keep:
            weights[name] = made
    return Applied(label, stored, math.sqrt(err / total), weights)


class _OnGrid(nn.Module):
    """The weight is its float latent rounded onto the peer's grid, straight-through."""

    def __init__(self, grid: Grid):
        super().__init__()
        self.grid = grid

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rounded = from_matrix(self.grid.round(as_matrix(weight)), weight)
        return weight + (rounded - weight).detach()


def dequantized_model(teacher: nn.Module, applied: Applied, trainable: bool) -> nn.Module:
    """The teacher with the peer's weights; `trainable`: latent floats on the peer's grid."""
    model = copy.deepcopy(teacher)
    for name, made in applied.weights.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        with torch.no_grad():
            weight.copy_(from_matrix(made.weight, weight))
        if trainable:
            parametrize.register_parametrization(module, attr, _OnGrid(made.grid))
    return model


# ---------------------------------------------------------------- the benchmark


@dataclass
class Sweep:
    """Every configuration of every peer on one task (bytes and weight error), computed once; the
    weights of a chosen one are made again when asked for (keeping all would take gigabytes)."""

    ctx: Context
    applied: dict[str, list[Applied]]  # peer -> its configurations, without their weights
    chosen: dict[tuple[str, str], Applied]

    def best(self, peer: Peer, budget: int) -> Applied | None:
        """The configuration of `peer` with the lowest weight error whose bytes fit `budget`."""
        fits = [a for a in self.applied[peer.name] if a.stored <= budget]
        if not fits:
            return None
        label = min(fits, key=lambda a: a.error).label
        if (peer.name, label) not in self.chosen:
            self.chosen[peer.name, label] = apply(self.ctx.teacher, self.ctx.names, label, peer.configs[label](), keep=True)
        return self.chosen[peer.name, label]


def sweep(ctx: Context) -> Sweep:
    applied = {}
    for peer in PEERS:
        applied[peer.name] = []
        for label, factory in peer.configs.items():
            try:
                applied[peer.name].append(apply(ctx.teacher, ctx.names, label, factory(), keep=False))
            except Exception as error:  # a configuration whose CPU path does not run: recorded, skipped
                print(f"  {ctx.task.name}: {peer.name} {label} fails on CPU: {str(error).splitlines()[0][:120]}", file=sys.stderr)
        print(f"  {ctx.task.name}: {peer.name}: " + ", ".join(f"{a.label} {a.stored:,} B err {a.error:.3g}" for a in applied[peer.name]), file=sys.stderr, flush=True)
    return Sweep(ctx, applied, {})


def peer_cells(ctx: Context, found: Sweep, budget: int, recover: bool) -> dict[str, Cell]:
    cells = {}
    for peer in PEERS:
        best = found.best(peer, budget)
        if best is None:
            cells[peer.name] = Cell(note=f"no configuration fits (smallest {min(a.stored for a in found.applied[peer.name]):,} B)")
            continue
        cells[peer.name] = quality.scored(ctx, dequantized_model(ctx.teacher, best, trainable=False), best.stored, best.label)
        if recover and next(iter(best.weights.values())).grid is not None:
            model = quality.recovered(ctx, dequantized_model(ctx.teacher, best, trainable=True))
            cells[f"{peer.name} + recovery"] = quality.scored(ctx, model, best.stored, best.label)
    return cells


def rtn_cells(ctx: Context, budget: int) -> dict[str, Cell]:
    """The project's own round-to-nearest references (baselines.py), where their bits fit."""
    return {f"{m} RTN": quality.quantized_cell(ctx, budget, m) for m in ("int8", "int4")}


PLAN = ("RPS plan", "RPS plan, data-aware", "RPS plan, data-aware + recovery")
RECOVERED = PLAN[2]  # what a user with data does: calibrate, then recover; the row the targets at 1/16 and below judge
COLUMNS = PLAN + tuple(p.name for p in PEERS) + ("HQQ + recovery", "torchao + recovery", "int8 RTN", "int4 RTN")


@dataclass
class Result:
    task: tasks.Task
    dense: float
    numel: int
    run: Run
    rows: dict[str, dict[str, Cell]]
    seconds: float


def run_task(task: tasks.Task, run: Run) -> Result:
    began = time.time()
    ctx = quality.context(task, run.recovery_steps, run.calibration_batches)
    found = sweep(ctx)
    rows = {}
    for name in run.budgets:
        start, budget = time.time(), quality.budget_bytes(name, ctx.numel)
        recover = Fraction(name) <= RECOVERY_FROM
        methods = PLAN if recover else PLAN[:2]
        rows[name] = {**quality.plan_cells(ctx, budget, methods), **peer_cells(ctx, found, budget, recover), **rtn_cells(ctx, budget)}
        print(f"  {task.name} at {name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return Result(task, task.evaluate(ctx.teacher), ctx.numel, run, rows, time.time() - began)


# ---------------------------------------------------------------- output


def _format(task: tasks.Task, value: float) -> str:
    digits = 4 if "cosine" in task.metric and task.agreement is None else (1 if task.higher_is_better else 3)
    return f"{value:.{digits}f}"


def _columns(result: Result) -> list[str]:
    return [c for c in COLUMNS if any(c in cells for cells in result.rows.values())]


def table(result: Result) -> str:
    """A row per budget; each cell its quality and its bytes; the best of a row in bold."""
    task, columns = result.task, _columns(result)
    lines = ["| budget | bytes | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, cells in result.rows.items():
        values = [c.value for c in cells.values() if c.value is not None]
        best = max(values) if task.higher_is_better else min(values)
        row = []
        for column in columns:
            cell = cells.get(column, Cell(note="not recovered above 1/16"))
            if cell.value is None:
                row.append("n/a")
                continue
            text = _format(task, cell.value) + ("" if cell.cosine is None else f" / {cell.cosine:.3f}")
            row.append(f"{'**' + text + '**' if cell.value == best else text} ({quality._kb(cell.bytes)})")
        lines.append(f"| {name} | {quality._kb(quality.budget_bytes(name, result.numel))} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def notes(result: Result) -> list[str]:
    chosen: dict[str, list[str]] = {}
    for name, cells in result.rows.items():
        for column, cell in cells.items():
            if cell.value is not None and cell.note and "recovery" not in column:
                chosen.setdefault(column, []).append(f"{name}: {cell.note}")
    return [f"{column}: " + "; ".join(items) + "." for column, items in chosen.items()]


def _better(task: tasks.Task, a: float, b: float, strictly: bool = False) -> bool:
    if a == b:
        return not strictly
    return a > b if task.higher_is_better else a < b


def verdicts(result: Result) -> list[str]:
    """The issue's targets on this task, each with its numbers."""
    task, out = result.task, []
    peers = [p.name for p in PEERS]
    for name, cells in result.rows.items():
        found = {p: cells[p].value for p in peers if cells[p].value is not None}
        show = ", ".join(f"{p} {_format(task, v)}" for p, v in found.items()) or "no peer fits"
        if Fraction(name) >= Fraction(1, 8):
            plan, aware = cells["RPS plan"].value, cells["RPS plan, data-aware"].value
            best = max(found.values(), default=None) if task.higher_is_better else min(found.values(), default=None)
            ok = best is None or (plan is not None and _better(task, plan, best))
            ahead = best is None or (aware is not None and _better(task, aware, best, strictly=True))
            out.append(
                f"{task.name} at {name}: plan without data >= the best peer: {quality._met(ok)}; with calibration ahead of every peer: "
                f"{quality._met(ahead)} (plan {_format(task, plan) if plan is not None else 'n/a'}, data-aware "
                f"{_format(task, aware) if aware is not None else 'n/a'}; {show})."
            )
        else:
            ours = cells[RECOVERED].value
            others = {c: v.value for c, v in cells.items() if c != RECOVERED and v.value is not None}
            ok = ours is not None and all(_better(task, ours, v, strictly=True) for v in others.values())  # a tie (all at chance) is no win
            rival = max(others, key=lambda c: others[c] if task.higher_is_better else -others[c], default=None)
            out.append(
                f"{task.name} at {name}: {RECOVERED} the best row: {quality._met(ok)} (ours "
                f"{_format(task, ours) if ours is not None else 'n/a'}; best other: {rival} {_format(task, others[rival]) if rival else 'n/a'})."
            )
    return out


def plot(results: list[Result], path: Path) -> None:
    def series(result: Result) -> list[tuple[str, int, list[tuple[float, float]]]]:
        cells = result.rows.values()
        return [(column, i, sorted((c[column].bytes, c[column].value) for c in cells if column in c and c[column].value is not None)) for i, column in enumerate(COLUMNS)]

    quality.plot_panels(results, series, "bytes of the compressed weights", path)


def section(results: list[Result], command: str, seconds: float, plot_name: str) -> str:
    versions = ", ".join(f"{p.package} {version(p.package)}" for p in PEERS)
    steps = "; ".join(f"{r.task.name} {r.run.recovery_steps} steps, {r.run.calibration_batches} calibration batches" for r in results)
    parts = [
        "## Against the peers",
        "",
        f"Made by `{command}` in {seconds / 60:.1f} min with {torch.get_num_threads()} torch thread(s) on a shared 2-core CPU "
        f"(torch {torch.__version__}, rpsconvert at this commit; {versions}). Every row of a table was measured in that run.",
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip().replace("\n", " "),
        "",
        "A **budget** is a fraction of the fp32 bytes of the compressed weights, as in `## Quality`; each cell is the "
        "task's quality and, in parentheses, the bytes that row stores for those weights. **RPS plan** is "
        "`convert(model, budget=...)` (its budget also pays for the dense tensors and the file's header, so its pool has "
        "a little less), **data-aware** adds `calibration=` (training batches), **data-aware + recovery** recovers that "
        "calibrated conversion (what a user with data does), and every "
        "**+ recovery** row is quality.py's `recovered` (distillation from the dense model, `lr=\"auto\"`, no early stop) "
        f"at the same steps within a task: {steps}. The int8 and int4 RTN rows are the project's hand-written baselines (baselines.py), "
        "shown where 8 and 4.5 bits a weight fit. quanto's and bitsandbytes' grids are not recovered (quanto fits no "
        "budget of 1/16 or below, bitsandbytes none below 1/4).",
        "",
        "MobileNetV2: top-1 agreement with the original (%) / logit cosine on 128 held-out crops of four photos "
        f"({', '.join(pretrained.HELD_OUT_PHOTOS)}: scikit-learn's china and scikit-image's), calibration and recovery on "
        f"64 crops of five others ({', '.join(pretrained.TRAINING_PHOTOS)}). all-MiniLM-L6-v2: mean cosine of the sentence "
        "embeddings (mean pooling, normalized) with the original's on held-out standard-library sentences. The LM "
        "and digits CNN are `## Quality`'s, trained here from their seeds.",
        "",
        f"![against the peers]({plot_name})",
    ]
    for result in results:
        parts += [
            "",
            f"### {result.task.name}: {result.task.metric}, dense {_format(result.task, result.dense)} "
            f"({result.numel:,} compressed weights, {quality._kb(4 * result.numel)} in fp32; {result.seconds / 60:.1f} min)",
            "",
            table(result),
            "",
        ] + [f"- {line}" for line in notes(result)]
    parts += ["", "### Targets", ""] + [f"- {line}" for r in results for line in verdicts(r)]
    return "\n".join(parts)


@dataclass(frozen=True)
class Run:
    """One task's share of a run: its budgets, recovery steps and calibration batches."""

    budgets: tuple[str, ...]
    recovery_steps: int
    calibration_batches: int


@dataclass(frozen=True)
class Settings:
    digits_train_steps: int
    lm_train_steps: int
    trained: Run  # digits CNN and LM
    mobilenet: Run | None  # None: no pretrained tasks
    minilm: Run | None


FULL = Settings(1500, 1000, Run(TRAINED_BUDGETS, 100, 8), Run(PRETRAINED_BUDGETS, 20, 8), Run(PRETRAINED_BUDGETS, 20, 8))
QUICK = Settings(150, 20, Run(QUICK_BUDGETS, 5, 2), None, None)


def _installed(package: str) -> bool:
    try:
        version(package)
    except PackageNotFoundError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits CNN and LM only, tiny steps, three budgets")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "peers.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    missing = [p.package for p in PEERS if not _installed(p.package)]
    if missing:
        raise SystemExit(f"peers.py needs {', '.join(missing)}: run `make bench`, or pip install them at the versions the Makefile names")
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    start = time.time()
    runs = [(tasks.digits_tasks(settings.digits_train_steps)[0], settings.trained), (tasks.text_task(settings.lm_train_steps), settings.trained)]
    if settings.mobilenet is not None:
        photos = (pretrained.sample_photos(pretrained.HELD_OUT_PHOTOS), pretrained.sample_photos(pretrained.TRAINING_PHOTOS))
        runs += [(tasks.mobilenet_task(128, 64, 4, photos), settings.mobilenet), (tasks.minilm_task(8, 16), settings.minilm)]
    results = [run_task(task, run) for task, run in runs]
    command = "python benchmarks/peers.py" + (" --quick" if args.quick else "")
    body = section(results, command, time.time() - start, args.plot.name)
    plot(results, args.plot)
    quality.write_section(args.docs, body, START, END)
    print(body)


if __name__ == "__main__":
    main()
