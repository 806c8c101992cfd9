"""The `rpsconvert` command: convert a model, inspect or decompress a checkpoint.

`rpsconvert MODEL ...` is short for `rpsconvert convert MODEL ...`; `info` and `decompress` are the
other commands. Every failure is one line on stderr and a non-zero exit (a traceback only with
--debug), and no output file exists unless the whole job succeeded.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
from dataclasses import asdict
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Literal, Optional

import click
import safetensors
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

import rpsconvert
from rpsconvert.engine.budget import check_ratio, format_bytes, parse_bytes
from rpsconvert.format.checkpoint import Checkpoint, checkpoint_bytes, checkpoint_file, is_directory, read, save_directory, serialized, write_dense
from rpsconvert.format.serialized import Serialized
from rpsconvert.quality.streaming_calibration import ACTIVATION_MEMORY, calibrate_files, memory_needed, streams_calibration
from rpsconvert.streaming import available_memory, check_whole_load, convert_files, original_weights, streams, whole_load_bytes
from rpsconvert.format import provenance
from rpsconvert.format.files import taken, write_atomic
from rpsconvert.engine.storage import dtype_name
from rpsconvert.errors import MemoryLimitError, OutputExistsError, RPSError, RPSWarning
from rpsconvert.cli import sweep
from rpsconvert.cli.inputs import ModelInput, default_output, read_calibration, read_model
from rpsconvert.cli.tables import WRAP_WIDTH, plan_table, tensor_table
from rpsconvert.cli.verify import check_inputs, gate_message, verification_table, verify_file
from rpsconvert.engine.mapping import MAPPINGS
from rpsconvert.quality.fidelity import Fidelity, fidelity, weight_errors
from rpsconvert.quality.recovery import recover
from rpsconvert.quality.resume import discard, parse_interval, saved
from rpsconvert.quality.sharding import torchrun_job
from rpsconvert.engine.report import ConversionReport, report

_DEFAULTS = inspect.signature(rpsconvert.convert).parameters  # one source for the defaults
_POOL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_stdout = Console()
_stderr = Console(stderr=True)


class _ConvertByDefault(TyperGroup):
    """A group whose first argument, unless it names a command or a group option, is a MODEL for
    the `convert` command: `rpsconvert m.pt --budget 1MB` runs `rpsconvert convert m.pt --budget 1MB`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        own_options = {opt for param in self.get_params(ctx) for opt in param.opts}
        if args and args[0] not in self.commands and args[0] not in own_options:
            args = ["convert", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_ConvertByDefault,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output file.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
MaxDrop = Annotated[Optional[float], typer.Option("--max-drop", metavar="D", min=0, max=1, help="Fail (exit 2) when more than this share of inputs changes its top-1 prediction, such as 0.02.", show_default=False)]
Atol = Annotated[Optional[float], typer.Option("--atol", metavar="X", min=0, help="Fail (exit 2) when any output element is off by more than X.", show_default=False)]
UNRECORDED = ("output", "force", "quiet", "json_output", "debug", "checkpoint_every", "resume", "strategy")  # a resumed or sharded run ends as one uninterrupted process does
INPUTS = ("model", "calibrate")  # recorded by name, their sha256 beside (provenance.made_from)
GATE_MISSED = 2  # the exit status of a run whose result misses --max-drop or --atol (errors exit 1)
JsonOutput = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout instead of tables.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rpsconvert {rpsconvert.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version, help="Show the version and exit.")] = False,
) -> None:
    """Shrink a trained PyTorch model to a memory budget with randomized parameter sharing (STABLE-RPS).

    rpsconvert MODEL --budget 1MB is short for rpsconvert convert MODEL --budget 1MB.
    """


@contextmanager
def _reported(debug: bool) -> Iterator[None]:
    """Turn any failure into one line on stderr and exit status 1 (130 after an interrupt); with
    `debug`, let it raise with its traceback."""
    try:
        yield
    except (typer.Exit, click.ClickException):
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        typer.secho("interrupted: nothing was written", err=True, fg="red")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        text = " ".join((exc.for_cli() if isinstance(exc, RPSError) else str(exc)).split()) or type(exc).__name__
        if not isinstance(exc, (RPSError, ValueError, OSError)):  # not a user error we expected: say what broke
            text = f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)"
        typer.secho(f"error: {text}", err=True, fg="red")
        raise typer.Exit(1) from None


class _Stages:
    """The stages of one job: a progress bar on stderr while they run (stdout stays clean for
    --json), and how long each took."""

    def __init__(self, total: int, enabled: bool):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=_stderr, transient=True, disable=not (enabled and _stderr.is_terminal),
        )
        self.task = self.progress.add_task("", total=total)
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> _Stages:
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    @contextmanager
    def __call__(self, name: str, description: str, own_bar: bool = False) -> Iterator[None]:
        """One stage; `own_bar` stages (calibration, recovery) show their own progress bar, and
        rich allows one live display at a time, so the stage bar steps aside meanwhile."""
        self.progress.update(self.task, description=description)
        if own_bar:
            self.progress.stop()
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if own_bar:
            self.progress.start()
        self.progress.advance(self.task)

    def reads(self, description: str) -> _Reads:
        """The progress of a conversion that reads a model's files many times over, on the stage's line."""
        return _Reads(lambda text: self.progress.update(self.task, description=f"{description}: {text}"))


class _Reads:
    """`on_read` and `on_stage` of a conversion from files: the line shows the stage convert is in,
    its bytes read of the passes it announced and the time left at its rate. The bytes of one pass
    are those the first stage read (the layer scales: one pass), so the first stage and a stage of
    unknown passes (the per-layer widths) show bytes and rate only."""

    def __init__(self, show: Callable[[str], None], clock: Callable[[], float] = time.perf_counter):
        self.show, self.clock = show, clock
        self.stage, self.passes, self.pass_bytes = "", None, None
        self.start, self.done = clock(), 0

    def on_stage(self, stage: str, passes: int | None) -> None:
        if self.pass_bytes is None and self.stage:
            self.pass_bytes = self.done
        self.stage, self.passes = stage, passes
        self.start, self.done = self.clock(), 0
        self.show(stage)

    def on_read(self, count: int) -> None:
        self.done += count
        rate = self.done / max(self.clock() - self.start, 1e-9)
        text = f"{self.stage}, {format_bytes(self.done)} read ({format_bytes(int(rate))}/s)"
        if self.passes and self.pass_bytes:
            total = self.passes * self.pass_bytes
            left = max(total - self.done, 0) / max(rate, 1e-9)
            text = f"{self.stage}, {format_bytes(self.done)} of {format_bytes(total)} read ({format_bytes(int(rate))}/s, {_duration(left)} left)"
        self.show(text)


def _duration(seconds: float) -> str:
    """3 s, 4 min 10 s, 1 h 5 min: the time left, in the units that matter."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@app.command("convert")
def convert_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(
        help="A pickled model (torch.save(model)), a state dict (.safetensors/.pt) with --arch, a Hugging Face "
        "model directory, or a name such as torchvision:resnet50 (pretrained weights).", metavar="MODEL", show_default=False)],
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", metavar="SIZE", help="Largest size of the output file: 1MB, 500kB, 1.5MiB, 123456; several, such as 256kB,1MB,4MB, sweep: a file per budget and a quality-vs-bytes table and plot.")] = None,
    ratio: Annotated[Optional[str], typer.Option("--ratio", "-r", metavar="R", help="Fraction of the weight memory kept, in (0, 1]; 1.0 is lossless. Several, such as 0.01,0.05,0.2, sweep.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="PATH", help="Output file (default: MODEL's name + .rps.safetensors, beside it); a PATH ending in / is a model directory: model.rps.safetensors, config.json and MODEL's tokenizer files.", show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", metavar="SPEC", help="Architecture of a state-dict file, such as torchvision:resnet50 or timm:resnet50.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Unpickle MODEL even if it needs classes outside the safe list: this runs any code the file's author put in it.")] = False,
    mapping: Annotated[Literal[tuple(MAPPINGS)], typer.Option(help="How weights are laid onto the pool.")] = _DEFAULTS["mapping"].default,  # type: ignore[valid-type]
    seed: Annotated[int, typer.Option(help="Seed of the hash functions.")] = _DEFAULTS["seed"].default,
    include: Annotated[Optional[list[str]], typer.Option(metavar="PATTERN", help="Compress only the weights this pattern names (repeatable): a parameter name, a glob (encoder.*), re:REGEX, or a module type (Linear).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(metavar="PATTERN", help="Keep the weights this pattern names dense (repeatable; patterns as for --include).")] = None,
    min_numel: Annotated[int, typer.Option(help="Keep tensors with fewer elements dense.")] = _DEFAULTS["min_numel"].default,
    dtype: Annotated[Optional[Literal[tuple(_POOL_DTYPES)]], typer.Option(help="Pool dtype (default: the weights' dtype).")] = None,  # type: ignore[valid-type]
    bits: Annotated[Optional[Literal[2, 3, 4, 5, 6, 7, 8, 16, 32]], typer.Option(help="Bits per pool slot: 2 to 8 (integer codes, a scale per block of 32) or 16, 32 (float). Default: with --budget the plan chooses; with --ratio the weights' dtype.", show_default=False)] = None,  # type: ignore[valid-type]
    calibrate: Annotated[Optional[Path], typer.Option("--calibrate", metavar="FILE", help="Example inputs (.safetensors, .npy or tensors-only .pt; or .txt, one example per line, for a Hugging Face MODEL with its tokenizer): the pool is refit to the original's layer outputs on them, and a fifth is held out to measure fidelity.", show_default=False)] = None,
    recover_steps: Annotated[int, typer.Option("--recover-steps", metavar="N", min=0, help="Distill the original into the converted model for N steps on the --calibrate inputs.")] = 0,
    recover_lr: Annotated[str, typer.Option("--recover-lr", metavar="RATE", help="Recovery's peak learning rate (Adam), or auto: short trials of the first steps at rates from 1e-5 to 3e-2 choose it (a pretrained model near its original wants a far smaller rate than one far from it).")] = "auto",
    checkpoint_every: Annotated[Optional[str], typer.Option("--checkpoint-every", metavar="INTERVAL", help="Save the recovery state every INTERVAL (50 steps, or 90s, 5min, 1h) to OUTPUT.recovery.pt, so that --resume continues an interrupted run.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the recovery saved in OUTPUT.recovery.pt by an interrupted run of the same command.")] = False,
    strategy: Annotated[Literal["ddp", "fsdp"], typer.Option("--strategy", help="How the processes of a torchrun job (torchrun --nproc_per_node N -m rpsconvert ...) share the recovery: ddp, each holds both models whole; fsdp, both sharded per block (the pool replicated), its state saved in the directory OUTPUT.recovery. Rank 0 writes the output.")] = "ddp",
    verify: Annotated[bool, typer.Option("--verify", help="Load the written file afresh and compare it with MODEL on the held-out inputs (random ones without --calibrate).")] = False,
    max_drop: MaxDrop = None,
    atol: Atol = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Convert and report, with the plan per tensor, but write nothing.")] = False,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", metavar="SIZE", help="Refuse to start a conversion from safetensors files (a Hugging Face directory, or a .safetensors file with --arch, read a piece at a time; loaded whole with --calibrate or --verify) that would need more memory than SIZE. Default: 90% of the memory available now.", show_default=False)] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", metavar="SIZE", help="A model directory's checkpoint larger than SIZE is written as shards of at most SIZE and their index, model.rps.safetensors.index.json (a --budget counts them all).")] = "5GB",
    json_output: JsonOutput = False,
    force: Force = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Convert MODEL and write it as a .rps.safetensors checkpoint."""
    given = dict(locals())  # the call's own arguments: a sweep's point is not ctx.params
    with _reported(debug):
        if (budget is None) == (ratio is None):
            raise ValueError("pass either --budget SIZE (such as 1MB) or --ratio R (such as 0.01)")
        listed = sweep.points(budget, ratio)
        launched = torch.distributed.is_torchelastic_launched()
        if strategy == "fsdp" and not launched:
            raise ValueError("--strategy fsdp shards recovery over the processes of a torchrun job: launch the command as torchrun --nproc_per_node N -m rpsconvert ...")
        if launched and (listed or not recover_steps):
            raise ValueError("under torchrun the processes share one recovery: pass one --budget or --ratio and --recover-steps N")
        writer = not launched or os.environ.get("RANK") == "0"  # under torchrun rank 0 reports and writes the output
        if not writer:
            quiet, json_output = True, False
        if listed:
            return _sweep(ctx, listed, budget is not None, model, output, arch, trust_pickle, max_drop is not None or atol is not None or dry_run, force, quiet, json_output)
        ratio = sweep.ratio_of(ratio) if ratio is not None else None
        if ratio is not None:
            check_ratio(ratio)  # the cheap checks first, before reading a large model
        budget_bytes = parse_bytes(budget) if budget is not None else None
        if recover_steps and calibrate is None:
            raise ValueError("--recover-steps needs --calibrate FILE: recovery distills the original on example inputs")
        lr = _learning_rate(recover_lr)
        if (checkpoint_every or resume) and not recover_steps:
            raise ValueError("--checkpoint-every and --resume save and continue a recovery: pass --recover-steps N too")
        every_steps, every_seconds = parse_interval(checkpoint_every) if checkpoint_every else (None, None)
        calibration, heldout = sweep.once(("calibrate", calibrate, model), lambda: read_calibration(calibrate, model)) if calibrate else (None, None)
        verify = (verify or max_drop is not None or atol is not None) and not dry_run  # a gate is checked on the file
        gated = verify and (max_drop is not None or atol is not None)
        # the file records what made it; the figures measured later get their room now (format/provenance.py)
        later = [key for key, measured in (("weight_error", True), ("fidelity", bool(heldout) or verify), ("gate", gated)) if measured]
        made_by = {"command": _command_line(ctx.command, given), "inputs": _inputs(model, calibrate), **dict.fromkeys(later)}
        with _Stages(3 + bool(recover_steps), enabled=not quiet) as stage, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RPSWarning)
            # from safetensors files without --verify or --recover-steps (which run the original
            # whole), the model is converted without loading it (streaming.py): the same bytes in a
            # fraction of the memory; with --calibrate it is loaded whole where that fits (any pool
            # calibrates so: already checked against the limit), else calibrated a block at a time from the files
            stream = not verify and not recover_steps and streams(model, arch)
            limit = parse_bytes(max_memory) if max_memory else int(0.9 * available_memory())
            sizing = dict(ratio=ratio, budget=budget, include=include or None, exclude=exclude or None, min_numel=min_numel)
            if stream and calibrate is not None:
                stream = whole_load_bytes(model, arch=arch, calibrating=True, **sizing) > limit
            with stage("read", f"reading {model}" if not stream else f"reading the structure of {model}"):
                if (verify or recover_steps) and streams(model, arch):  # loaded whole to run the original: refused now if it cannot fit
                    flag = "--verify" if verify else "--recover-steps"
                    check_whole_load(model, arch=arch, max_memory=limit, calibrating=calibrate is not None, flag=flag, **sizing)
                source = None if stream else _read(model, arch, trust_pickle)
                as_directory = output is not None and is_directory(output)
                output = Path(output) if output else (source.output if source else default_output(Path(model)))
                if (taken(output) if as_directory else output.exists()) and not (force or dry_run):  # fail before the long part
                    raise OutputExistsError(f"{output} already exists: pass {{overwrite}} to replace it, or -o another path", overwrite=True)
                state_file = output.with_name(output.name + (".recovery" if strategy == "fsdp" else ".recovery.pt"))
                if resume and not saved(state_file):
                    raise FileNotFoundError(f"nothing to resume: {state_file} does not exist (--checkpoint-every writes it while recovery runs)")
            options = dict(
                ratio=ratio, budget=budget, mapping=mapping, seed=seed, include=include or None, exclude=exclude or None,
                min_numel=min_numel, dtype=_POOL_DTYPES.get(dtype), bits=bits, provenance=made_by,
                shard_size=parse_bytes(shard_size) if as_directory else None,
            )
            with stage("convert", "converting", own_bar=calibration is not None):
                if stream:
                    reads = stage.reads("converting")
                    converted = convert_files(model, arch=arch, max_memory=limit, on_read=reads.on_read, on_stage=reads.on_stage, **options)
                    if calibration is not None:
                        _calibrate_from_files(converted, model, arch, calibration + heldout, limit, quiet)
                        heldout = None  # calibration held out its own fifth; the original is not loaded to compare on the rest
                else:
                    converted = rpsconvert.convert(source.model, architecture=source.architecture, calibration=calibration, quiet=quiet, **options)
            if calibration is not None and not quiet:  # whether the held-out check kept it, and by how much
                typer.echo(next((n for n in report(converted).notes if n.startswith("calibration ")), "calibrated"), err=True)
            original = source.model if source else original_weights(model, converted, reads.on_read)
            quality = _quality(converted, original, heldout)
            if recover_steps:
                saving = checkpoint_every or resume
                with stage("recover", "recovering", own_bar=True):
                    try:
                        with torchrun_job():
                            history = recover(
                                converted, original, calibration, steps=recover_steps, lr=lr, eval_data=heldout or None, quiet=quiet,
                                checkpoint=state_file if saving else None, checkpoint_every=every_steps, checkpoint_seconds=every_seconds,
                                resume=resume, strategy=strategy,
                            )
                    except KeyboardInterrupt:
                        if saving and saved(state_file):
                            typer.secho(f"recovery state kept in {state_file}: rerun the same command with --resume to continue", err=True)
                        raise
                quality["after recovery"] = history.after
                quality["recovery lr"] = max(history.lr)  # the peak: chosen by the trials under --recover-lr auto
                if not writer:
                    return  # every process holds the recovered model whole
            if stream:
                reads.on_stage("measuring the weight error", 1)
            quality["weight error"] = weight_errors(converted, original)["total"]  # of the model as it is written
            _record(converted, "weight_error", provenance.figure(quality["weight error"]))
            if quality.get("after recovery") or quality.get("converted"):
                on = "recovered" if quality.get("after recovery") else "converted"
                _record(converted, "fidelity", provenance.fidelity(on, asdict(quality.get("after recovery") or quality["converted"])))
            rep = report(converted)
            with stage("write", "writing" if not dry_run else "dry run: writing nothing"):
                data = serialized(converted)
                written = None if dry_run else _write(converted, data, output, as_directory, model, force)
                file_bytes = checkpoint_bytes(written) if written else len(data)
                if written and recover_steps:
                    discard(state_file)  # the result is written: nothing is left to resume
            if verify:
                inputs, checked_on, note = _check_inputs(source, heldout, model, arch, trust_pickle, calibrate)
                checked = verify_file(written, source.model, inputs)
                _record(converted, "fidelity", provenance.fidelity("file", {**asdict(checked.fidelity), "max_abs_error": checked.max_abs_error}))
                if gated:
                    _record(converted, "gate", provenance.gate(not checked.failures(max_drop, atol), max_drop, atol))
                # the same tensors, the figures recorded in the room kept for them
                written = _write(converted, serialized(converted), output, as_directory, model, True)
                file_bytes = checkpoint_bytes(written)
        if not quiet:
            for w in caught:
                if issubclass(w.category, RPSWarning):
                    typer.secho(f"warning: {w.message}", err=True, fg="yellow")
            if calibration is None and rep.ratio < 1:
                typer.secho(
                    f"warning: no --calibrate data, so quality below ratio 1.0 is neither recovered nor measured; weight-space "
                    f"relative error {quality['weight error']:.3f} (pass --calibrate FILE --recover-steps N to recover it)",
                    err=True, fg="yellow",
                )
            if verify and note:
                typer.secho(note, err=True)
            if converted.rps.info.get("architecture") is None and written:
                typer.secho(f"note: {model} is not a torchvision, timm or Hugging Face model, so its architecture is not "
                            f"recorded: load the output with rpsconvert.load(path, model=YourModel())", err=True)
        if json_output:
            typer.echo(json.dumps({
                "input": model, "output": str(written) if written else None, "file_bytes": file_bytes,
                "budget_bytes": budget_bytes, "architecture": converted.rps.info.get("architecture"), "seconds": stage.seconds,
                "report": rep.to_dict(),
                "quality": {k: asdict(v) if isinstance(v, Fidelity) else v for k, v in quality.items()},
                **({"verification": checked.to_dict()} if verify else {}),
            }))
        elif not quiet:
            _stdout.print(_conversion_table(rep, model, written, file_bytes, sum(stage.seconds.values())))
            if dry_run:
                _stdout.print(plan_table(rep, _stdout.width))
            if budget_bytes is not None:  # the budget as read: 1MB and 1MiB differ by 5 %
                _stdout.print(f"budget {budget} = {budget_bytes:,} bytes; the {'checkpoint' if as_directory else 'file'} takes {file_bytes:,}")
            if heldout:
                _stdout.print(_quality_table(quality, model))
            if recover_steps:
                chosen = " (chosen by short trials)" if lr == "auto" else ""
                _stdout.print(f"recovery: {history.steps} steps, peak learning rate {quality['recovery lr']:g}{chosen}")
            if verify:
                _stdout.print(verification_table(checked, written, model, checked_on, budget_bytes))
        if verify and checked.failures(max_drop, atol):
            typer.secho(f"error: {gate_message(checked.failures(max_drop, atol), written)}", err=True, fg="red")
            raise typer.Exit(GATE_MISSED)


@app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="A .rps.safetensors checkpoint, or a model directory holding one.", metavar="FILE", show_default=False)],
    against: Annotated[str, typer.Option("--against", metavar="MODEL", help="The original model, as convert reads it.", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", metavar="FILE", help="Inputs to compare on (as --calibrate reads them; all of them are used). Default: random inputs of the shape MODEL's library states (timm, torchvision, Hugging Face), else its first layer's (a Conv2d at 224x224).", show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", metavar="SPEC", help="Architecture of a state-dict MODEL.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Unpickle MODEL even if it needs classes outside the safe list.")] = False,
    max_drop: MaxDrop = None,
    atol: Atol = None,
    json_output: JsonOutput = False,
    debug: Debug = False,
) -> None:
    """Compare a checkpoint, loaded afresh, with its original: errors, cosine, top-1 agreement, size."""
    with _reported(debug):
        file = checkpoint_file(file)  # a model directory's own checkpoint (its shard index when sharded)
        given = read_calibration(data, against, holdout=0)[0] if data else None
        original = read_model(against, arch=arch, trust_pickle=trust_pickle)
        inputs, checked_on, note = check_inputs(original.model, original.architecture, given)
        if note:
            typer.secho(note, err=True)
        checked = verify_file(file, original.model, inputs)
        failures = checked.failures(max_drop, atol)
        if json_output:
            typer.echo(json.dumps({"file": str(file), "file_bytes": checkpoint_bytes(file), "inputs": checked_on, **checked.to_dict(), "failures": failures}))
        else:
            _stdout.print(verification_table(checked, file, against, checked_on, None))
    if failures:
        typer.secho(f"error: quality gate missed: {'; '.join(failures)}", err=True, fg="red")
        raise typer.Exit(GATE_MISSED)


@sweep.reusing()
def _sweep(
    ctx: typer.Context, listed: list[str], by_budget: bool, model: str, output: str | None, arch: str | None, trust_pickle: bool,
    gated_or_dry: bool, force: bool, quiet: bool, json_output: bool,
) -> None:
    """Convert at each point of a sweep (cli/sweep.py), then show and write the curve."""
    if gated_or_dry:
        raise ValueError("a sweep writes a file per point and gates none: drop --max-drop, --atol and --dry-run, and check the file you choose with rpsconvert verify")
    if output and not is_directory(output):
        base = Path(output)
    else:  # the default name depends on the model; -o DIR/ puts the sweep's files in DIR
        default = _read(model, arch, trust_pickle).output
        base = Path(output) / default.name if output else default
    files, table_path, png_path = sweep.outputs(base, listed, "budget" if by_budget else "ratio")
    taken = [path for path in (*files, table_path, png_path) if path.exists()]
    if taken and not force:  # fail before the long part
        raise OutputExistsError(f"{taken[0]} already exists: pass {{overwrite}} to replace the sweep's files, or -o another path", overwrite=True)
    rows = []
    for point, path in zip(listed, files):
        one = {"budget": point, "ratio": None} if by_budget else {"budget": None, "ratio": point}
        convert_command(ctx, **{**ctx.params, **one, "output": path, "verify": True, "quiet": True, "json_output": False})
        rows.append(sweep.row(point, path))
    measured = ctx.params["calibrate"] is not None  # else the files were checked on random inputs only
    table = sweep.markdown(rows, measured)
    write_atomic(table_path, table.encode(), overwrite=force)
    note = sweep.plot(rows, png_path, f"{model}: {'quality' if measured else 'weight-space error'} against size", measured)
    if json_output:
        typer.echo(json.dumps({"sweep": rows, "table": str(table_path), "plot": None if note else str(png_path)}))
    elif not quiet:
        typer.echo(table)
        typer.echo(f"wrote {len(files)} files, {table_path}" + ("" if note else f" and {png_path}"))
        if not measured:  # which random inputs the points were checked on (made once, by the first)
            typer.secho(_check_inputs(_read(model, arch, trust_pickle), None, model, arch, trust_pickle, None)[2], err=True)
    if note:
        typer.secho(note, err=True)


def _learning_rate(text: str) -> float | str:
    """--recover-lr: "auto" or a positive number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"--recover-lr takes a positive learning rate (such as 1e-4) or auto, not {text!r}")
    return rate


def _read(model: str, arch: str | None, trust_pickle: bool) -> ModelInput:
    """MODEL, read once for all the points of a sweep (sweep.once)."""
    return sweep.once(("model", model, arch, trust_pickle), lambda: read_model(model, arch=arch, trust_pickle=trust_pickle))


def _command_line(command: click.Command, given: dict) -> list[str]:
    """The command that made the file, as parsed (the same from a shell, a script or a test):
    `rpsconvert convert`, its arguments and every option not at its default, the input files by
    name (INPUTS), and none of the options that say where the file goes or how the run is shown
    or saved (UNRECORDED): the same input converted the same way gives the same bytes anywhere."""
    words = ["rpsconvert", command.name]
    for param in command.params:
        value = given.get(param.name)
        if param.name in UNRECORDED or value is None or value == param.default or value in ([], ()):
            continue
        for one in value if param.multiple else [value]:
            one = provenance.input_name(one) if param.name in INPUTS else str(one)
            if param.param_type_name == "argument":
                words.append(one)
            else:
                words += [param.opts[0]] if getattr(param, "is_flag", False) else [param.opts[0], one]
    return words


def _inputs(model: str, calibrate: Path | None) -> dict:
    """What the file was made from: MODEL and the --calibrate file, by name and sha256."""
    return {"model": provenance.made_from(model), **({"calibrate": provenance.made_from(calibrate)} if calibrate else {})}


def _check_inputs(source: ModelInput, heldout: list | None, *key) -> tuple[list, str, str | None]:
    """The inputs --verify checks the written file on (cli/verify.py), made once for all the
    points of a sweep: `key` is what they depend on (MODEL as it is read, --calibrate)."""
    return sweep.once(("check inputs", *key), lambda: check_inputs(source.model, source.architecture, heldout))


def _write(converted: torch.nn.Module, data: Serialized, output: Path, as_directory: bool, model: str, force: bool) -> Path:
    """Write the checkpoint `data`, or a model directory holding it, with MODEL's tokenizer files
    when MODEL is a Hugging Face directory; the checkpoint file's path, which --verify reads."""
    if not as_directory:
        return write_atomic(output, data, overwrite=force)
    tokenizer = Path(model) if Path(model).is_dir() else None
    return checkpoint_file(save_directory(converted, output, overwrite=force, tokenizer_from=tokenizer))


def _record(converted: torch.nn.Module, key: str, value: dict) -> None:
    """Record a figure measured after conversion in the provenance the file will carry."""
    provenance.fill(converted.rps.info["provenance"], key, value)


def _calibrate_from_files(converted: torch.nn.Module, model: str, arch: str | None, batches: list, limit: int, quiet: bool) -> None:
    """--calibrate of a model too large to load whole: block by block from its files, when every
    weight of the converted pool has slots of its own; else one line saying why and what to do."""
    reason = streams_calibration(converted)
    if reason:
        raise MemoryLimitError(
            f"{model} does not fit in the {format_bytes(limit)} allowed to calibrate it loaded whole, and {reason}: give a larger "
            "budget, or convert without --calibrate, or free memory and raise --max-memory"
        )
    activations = min(ACTIVATION_MEMORY, limit // 8)  # the rest of them wait on disk
    needed = memory_needed(converted, activations) + report(converted).pool_bytes
    if needed > limit:
        raise MemoryLimitError(
            f"calibrating {model} block by block needs about {format_bytes(needed)} of memory (the pool, one block twice in float32, "
            f"the activations and the largest layer's solve), more than the {format_bytes(limit)} allowed: free memory and raise "
            "--max-memory, or convert without --calibrate"
        )
    calibrate_files(converted, model, batches, arch=arch, activation_memory=activations, quiet=quiet)


def _quality(converted: torch.nn.Module, original: torch.nn.Module, heldout: list | None) -> dict:
    """How close the converted model is to the original on held-out inputs when there are any
    (never the ones it was calibrated or recovered on); the weight error joins it once the model
    is final."""
    return {"converted": fidelity(converted, original, heldout)} if heldout else {}


def _quality_table(quality: dict, model: str) -> Table:
    rows = {k: v for k, v in quality.items() if isinstance(v, Fidelity)}
    samples = next(iter(rows.values())).samples
    table = Table(title=f"fidelity to {model} on {samples} held-out inputs", title_justify="left")
    for column in ("", "top-1 agreement", "output cosine", "relative error"):
        table.add_column(column, justify="left" if not column else "right")
    for name, f in rows.items():
        top1 = f"{f.top1_agreement:.2%}" if f.top1_agreement is not None else "n/a"
        table.add_row(name, top1, f"{f.cosine:.4f}", f"{f.relative_error:.4f}")
    return table


def _conversion_table(rep: ConversionReport, model: str, written: Path | None, file_bytes: int, seconds: float) -> Table:
    compressed = [w for w in rep.weights if w.compressed]
    dense = [w for w in rep.weights if not w.compressed]
    target = written or "(dry run: nothing written)"
    table = Table(title=f"{model} -> {target}", title_justify="left")
    for column in ("", "tensors", "elements", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("compressed", f"{len(compressed)}", f"{rep.compressible_elements:,}", format_bytes(sum(w.bytes_before for w in compressed)),
                  format_bytes(rep.pool_bytes))
    table.add_row("kept dense", f"{len(dense)}", f"{sum(w.elements for w in dense):,}", format_bytes(rep.dense_bytes), format_bytes(rep.dense_bytes))
    table.add_row("file", f"{len(rep.weights)}", "", format_bytes(rep.original_bytes), format_bytes(file_bytes), style="bold")
    table.caption = (f"{rep.original_bytes / file_bytes:.1f}x smaller in {seconds:.1f} s: a pool of {rep.pool_slots:,} {rep.pool_dtype} slots "
                     f"(ratio {rep.ratio:.4g}), mapping {rep.mapping}, seed {rep.seed}")
    return table


@app.command()
def info(
    file: Annotated[Path, typer.Argument(help="A .rps.safetensors checkpoint, or a model directory holding one.", metavar="FILE", show_default=False)],
    json_output: JsonOutput = False,
    debug: Debug = False,
) -> None:
    """Show a checkpoint's metadata and its per-layer table (after checking its sha256)."""
    with _reported(debug):
        file = checkpoint_file(file)  # a model directory's own checkpoint (its shard index when sharded)
        ckpt = read(file)
        if json_output:
            dense = {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for name, t in ckpt.tensors.items()}
            typer.echo(json.dumps({"file": str(file), "file_bytes": checkpoint_bytes(file), "manifest": ckpt.manifest, "dense": dense}))
        else:
            _stdout.print(_metadata_table(ckpt, file))
            _stdout.print(_layer_table(ckpt))


def _metadata_table(ckpt: Checkpoint, file: Path) -> Table:
    manifest, pool = ckpt.manifest, ckpt.pool
    elements = sum(w.numel for w in pool.weights.values())
    size = checkpoint_bytes(file)
    table = Table(title=str(file), title_justify="left", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # a sha256 is shown whole, over two lines if it must
    for key, value in (
        ("format", f"{manifest['format']} v{manifest['format_version']} (hash {manifest['hash']}), sha256 verified"),
        ("written by", f"rpsconvert {manifest.get('rpsconvert_version', '?')}"),
        ("architecture", _architecture(manifest.get("architecture"))),
        ("mapping, seed", f"{manifest['mapping']}, {manifest['seed']}"),
        ("pool", f"{pool.size:,} {pool.storage} slots, {format_bytes(pool.storage.bytes(pool.size))}"),
        ("compressed", f"{len(pool.weights)} weights, {elements:,} elements (ratio {pool.size / max(elements, 1):.4g})"),
        ("kept dense", f"{len(ckpt.dense_state())} tensors, {format_bytes(sum(t.numel() * t.element_size() for t in ckpt.tensors.values()))}"),
        ("size", f"{format_bytes(manifest['original_bytes'])} -> {format_bytes(size)} file ({manifest['original_bytes'] / size:.1f}x smaller)"),
        *_provenance_rows(manifest.get("provenance")),
    ):
        table.add_row(key, value)
    return table


def _provenance_rows(made_by: dict | None) -> list[tuple[str, str]]:
    """What made the file, as `info` shows it (--json has the whole record)."""
    if made_by is None:
        return [("provenance", "not recorded (written by an older rpsconvert, or saved after load)")]
    call = made_by["call"]
    rows = [("made with", f"rpsconvert {made_by['rpsconvert']}, torch {made_by['torch']}, python {made_by['python']}"),
            ("command", shlex.join(made_by["command"])) if "command" in made_by else
            ("call", "convert(" + ", ".join(f"{k}={v!r}" for k, v in call.items() if v not in (None, False, [])) + ")")]
    for role, source in made_by.get("inputs", {}).items():
        digests = [f"sha256 {source['sha256']}"] if "sha256" in source else [f"{name}: sha256 {d}" for name, d in source.get("files", {}).items()]
        rows.append((f"{role} input", "\n".join([source["name"], *digests])))
    if made_by.get("weight_error") is not None:
        rows.append(("weight error", f"{made_by['weight_error']:.4g} (||W - W_orig|| / ||W_orig||, compressed weights)"))
    kept = {reason: len(names) for reason, names in made_by["layers"].items() if reason != "compressed"}
    rows.append(("why dense", ", ".join(f"{reason}: {n}" for reason, n in kept.items()) or "nothing kept dense"))
    if made_by["plan"]:
        rows.append(("plan", f"{len(made_by['plan'])} candidates weighed (info --json lists them)"))
    if made_by.get("fidelity"):
        f = made_by["fidelity"]
        figures = {"top-1 agreement": (f["top1_agreement"], ".2%"), "cosine": (f["cosine"], ".6f"), "relative error": (f["relative_error"], ".4g"),
                   "max abs error": (f["max_abs_error"], ".4g")}
        on = {"converted": "held-out inputs", "recovered": "held-out inputs after recovery", "file": "the file reloaded (--verify)"}[f["on"]]
        rows.append(("fidelity", ", ".join(f"{k} {v:{spec}}" for k, (v, spec) in figures.items() if v is not None) + f", on {on}"))
    if made_by.get("gate"):
        g = made_by["gate"]
        limits = ", ".join(f"--{k.replace('_', '-')} {g[k]:.4g}" for k in ("max_drop", "atol") if g[k] is not None)
        rows.append(("quality gate", f"{'passed' if g['passed'] else 'MISSED'} ({limits})"))
    return rows


def _architecture(architecture: str | dict | None) -> str:
    if not architecture:
        return "not recorded: load with a skeleton"
    if isinstance(architecture, str):
        return architecture
    options = ", ".join(f"{k}={v!r}" for k, v in architecture.get("kwargs", {}).items())
    named = f"{architecture['source']}:{architecture['name']}" + (f"({options})" if options else "")
    return named + (" from its recorded config" if "config" in architecture else "")


def _layer_table(ckpt: Checkpoint) -> Table:
    """One row per tensor name: compressed weights (their scale), then dense tensors (their size).
    A tied name's "stored" cell names the tensor it shares, so it may wrap; the names never do."""
    rows = []
    for s in ckpt.pool.weights.values():
        for name in (s.name, *s.aliases):
            rows.append([name, _shape(s.shape), dtype_name(s.dtype), f"{s.scale:.4g}", "pool" if name == s.name else f"= {s.name}"])
    aliases = ckpt.manifest["dense_aliases"]
    for name, t in ckpt.dense_state().items():
        stored = f"= {aliases[name]}" if name in aliases else f"dense {format_bytes(t.numel() * t.element_size())}"
        rows.append([name, _shape(t.shape), dtype_name(t.dtype), "", stored])
    columns = [("shape", "left", None), ("dtype", "left", None), ("scale", "right", None), ("stored", "left", WRAP_WIDTH)]
    return tensor_table("tensors", columns, rows, _stdout.width)


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "x".join(map(str, shape)) or "scalar"


@app.command("decompress")
def decompress_command(
    file: Annotated[Path, typer.Argument(help="A .rps.safetensors checkpoint, or a model directory holding one.", metavar="FILE", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="PATH", help="Output file (default: FILE's name + .dense.safetensors).", show_default=False)] = None,
    force: Force = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Write the dense state dict of a checkpoint, for PyTorch without rpsconvert.

    It loads with load_state_dict(strict=True) into the original architecture, wherever PyTorch runs.
    """
    with _reported(debug):
        output = output or file.with_name(file.name.removesuffix(".safetensors").removesuffix(".rps") + ".dense.safetensors")
        if output.exists() and not force:
            raise OutputExistsError(f"{output} already exists: pass {{overwrite}} to replace it, or -o another path", overwrite=True)
        write_dense(file, output, overwrite=force)  # a weight at a time: never the dense model in memory
        if not quiet:
            with safetensors.safe_open(str(output), framework="pt") as f:
                count = len(f.keys())
            typer.echo(f"wrote {output}: {count} tensors, {format_bytes(output.stat().st_size)}")


@app.command("export")
def export_command(
    file: Annotated[Path, typer.Argument(help="A .rps.safetensors checkpoint, or a model directory holding one.", metavar="FILE", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="PATH", help="The ONNX file (default: FILE's name + .onnx).", show_default=False)] = None,
    force: Force = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Write an ONNX graph that generates the weights from the pool: about the checkpoint's size.

    It is traced on a random input of the shape the model's library states, and checked with
    onnxruntime against PyTorch when onnxruntime is installed. For a graph with dense weights,
    decompress the file and export the plain model.
    """
    from rpsconvert.format.onnx_export import check_onnx, export_onnx
    from rpsconvert.quality.verification import random_inputs

    with _reported(debug):
        file = checkpoint_file(file)
        output = output or file.with_name(file.name.removesuffix(".safetensors").removesuffix(".rps") + ".onnx")
        if output.exists() and not force:
            raise OutputExistsError(f"{output} already exists: pass {{overwrite}} to replace it, or -o another path", overwrite=True)
        model = rpsconvert.load(file).eval()
        inputs = (random_inputs(model, samples=1)[0],)
        export_onnx(model, output, inputs, overwrite=force)
        try:
            error = check_onnx(output, model, inputs)
        except ImportError:
            error = None
        if not quiet:
            sizes = f"{format_bytes(output.stat().st_size)} (the checkpoint {format_bytes(checkpoint_bytes(file))}, dense {format_bytes(read(file).manifest['original_bytes'])})"
            checked = "not checked: onnxruntime is not installed" if error is None else f"onnxruntime's outputs within {error:.3g} of PyTorch's"
            typer.echo(f"wrote {output}: {sizes}; {checked}")
