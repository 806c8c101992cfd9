"""Converting a model larger than memory, from its safetensors files, never holding it whole.

The model is built with its parameters on the meta device (no memory, no initialization), its
weights are found on that skeleton (discovery needs only shapes), the tensors that stay dense are
read into it, and `convert` reads every compressed weight from the files a piece at a time
(`weights_from`): the least-squares pool is computed a range of slots at a time and packed as it
goes (engine/encoding.py), so the memory is the pool's codes, one weight and the pieces in flight.
Every number is computed as from memory, in the same order, so the file is the same byte for byte
as converting the loaded model (tests/test_streaming.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from rpsconvert.conversion import choose_weights, convert
from rpsconvert.engine.budget import format_bytes, parse_bytes
from rpsconvert.engine.discovery import discover
from rpsconvert.engine.encoding import PIECE
from rpsconvert.engine.modules import find_pool
from rpsconvert.engine.projection import Reader
from rpsconvert.errors import InputError, MemoryLimitError
from rpsconvert.format.lazy_weights import INDEX_FILE, SINGLE_FILE, SafetensorsFiles
from rpsconvert.format.manifest import MANIFEST_KEY
from rpsconvert.format.skeleton import CONFIG_FILE, file_keys, load_dense, skeleton
from rpsconvert.quality.calibration import SLOT_BYTES


def convert_files(
    path: str | os.PathLike, *, arch: str | dict | None = None, max_memory: int | None = None,
    on_read: Callable[[int], None] | None = None, **options,
) -> nn.Module:
    """`convert` a model from its safetensors files without loading it: a Hugging Face directory
    (config.json with model.safetensors, or shards and model.safetensors.index.json), or one
    .safetensors state dict with `arch` (such as "torchvision:resnet50").

    `options` are `convert`'s (ratio or budget, bits, include, ...), calibration excepted: it runs
    the original model. The result is the converted model, as `convert(load(path))` gives it.
    With `max_memory` (bytes), a conversion whose `memory_needed` exceeds it is refused before it
    starts (MemoryLimitError), rather than killed by the system when memory runs out; `on_read` is
    called with the bytes of every read of a weight, and `convert`'s `on_stage` with the passes
    each stage reads (a progress display with an ETA: the command's).
    """
    path = Path(path)
    files, model, architecture, chosen, keys, compressed = _prepare(path, arch, options)
    if max_memory is not None:
        needed = _needed(model, files, chosen, keys, compressed, options)
        if needed > max_memory:
            raise MemoryLimitError(
                f"converting {path} needs about {format_bytes(needed)} of memory (the stored pool, the largest weight "
                f"in float64, the pieces in flight, the tensors kept dense), more than the {format_bytes(max_memory)} "
                "allowed: free memory and raise --max-memory, or give a smaller budget"
            )
    load_dense(model, files, keys, compressed, path)
    return convert(model, weights_from=files.reader(keys, on_read), inplace=True, architecture=architecture, **options)


def memory_needed(path: str | os.PathLike, *, arch: str | dict | None = None, **options) -> int:
    """A bound on the memory `convert_files(path, arch=arch, **options)` takes at its peak beyond
    what the process held before, in bytes (what --max-memory is checked against): the stored
    pool (the chosen one's: the plan scores the others as they are projected), the largest
    compressed weight in its dtype and in float64 (its layer scale), the pieces in flight, and the
    tensors kept dense. The pool takes at most the budget, or with a ratio that share of the
    weights at 4 bytes each."""
    files, model, _, chosen, keys, compressed = _prepare(Path(path), arch, options)
    return _needed(model, files, chosen, keys, compressed, options)


def whole_load_bytes(path: str | os.PathLike, *, arch: str | dict | None, calibrating: bool, **options) -> int:
    """The memory a conversion from safetensors files needs when it loads the model whole, because
    it runs the original (`--calibrate`, `--verify`): the model in its files' dtypes and, to
    calibrate, its dense copy and calibration's pool-sized state (`SLOT_BYTES` a slot, the pool at
    most a slot per weight, or two bits a slot of the budget). A 7B model in bf16 needs 27 GB
    before calibrating a slot."""
    files, model, _, chosen, keys, _ = _prepare(Path(path), arch, options)
    params = dict(model.named_parameters())
    count = sum(params[name].numel() for name in chosen)
    model_bytes = _stored_bytes(files, set(keys.values()))
    ratio, budget = options.get("ratio"), options.get("budget")
    slots = round(ratio * count) if ratio is not None else count if budget is None else min(count, parse_bytes(budget) * 4)
    return model_bytes * (2 if calibrating else 1) + (SLOT_BYTES * slots if calibrating else 0)


def check_whole_load(
    path: str | os.PathLike, *, arch: str | dict | None, max_memory: int, calibrating: bool, flag: str, **options
) -> None:
    """Refuse (MemoryLimitError) a conversion that loads the model whole (`whole_load_bytes`) for
    `flag` (--verify, --recover-steps: they run the original whole) when it would need more than
    `max_memory` bytes: one line now, rather than the system killing the process later."""
    needed = whole_load_bytes(path, arch=arch, calibrating=calibrating, **options)
    if needed > max_memory:
        what = "the model, its dense copy and calibration's state" if calibrating else "the model"
        raise MemoryLimitError(
            f"converting {path} with {flag} needs about {format_bytes(needed)} of memory ({flag} loads it whole: {what}), more than the "
            f"{format_bytes(max_memory)} allowed: convert without it (the files are then read a piece at a time, and --calibrate goes "
            "block by block), free memory and raise --max-memory, or give a smaller model"
        )


def _prepare(path: Path, arch: str | dict | None, options: dict) -> tuple:
    """The files, the skeleton and its architecture, the weights to compress, the files' names of
    the model's tensors, and every name of the compressed weights."""
    files = SafetensorsFiles.open(path)
    if MANIFEST_KEY in files.metadata:
        raise InputError(f"{path} is already an rpsconvert checkpoint: convert the original model instead")
    model, architecture = skeleton(path, arch, files)
    found = discover(model)
    chosen, _ = choose_weights(model, found, options.get("include"), options.get("exclude"), options.get("min_numel", 1000))
    keys = file_keys(model.state_dict(keep_vars=True), model, files)
    compressed = {alias for name in chosen for alias in found.aliases.get(name, (name,))} | set(chosen)
    return files, model, architecture, chosen, keys, compressed


def _needed(model: nn.Module, files: SafetensorsFiles, chosen: list[str], keys: dict[str, str], compressed: set[str], options: dict) -> int:
    params = dict(model.named_parameters())
    weights = [params[name] for name in chosen]
    count = sum(w.numel() for w in weights)
    pool = parse_bytes(options["budget"]) if options.get("budget") is not None else int(options["ratio"] * count * 4) + 1
    largest = max((w.numel() * (w.dtype.itemsize + 8) for w in weights), default=0)
    dense = _stored_bytes(files, [key for name, key in keys.items() if name not in compressed])
    return pool + largest + 8 * PIECE * 8 + dense


def _stored_bytes(files: SafetensorsFiles, keys) -> int:
    """The bytes of the files' tensors `keys` in their stored dtypes (a key listed twice counts twice)."""
    return sum(files.entries[key].numel * files.entries[key].dtype.itemsize for key in keys)


def streams(source: str, arch: str | dict | None) -> bool:
    """Whether `convert_files` reads `source`: a directory with config.json and safetensors
    weights, or a .safetensors file given with its architecture."""
    path = Path(source)
    if path.is_dir():
        return (path / CONFIG_FILE).is_file() and ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file())
    return path.is_file() and path.suffix == ".safetensors" and arch is not None


def available_memory() -> int:
    """The memory the system can give now without swapping (Linux's MemAvailable), else the total."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def original_weights(path: str | os.PathLike, converted: nn.Module, on_read: Callable[[int], None] | None = None) -> Reader:
    """A Reader of the original compressed weights of `converted` from the files it was converted
    from (`convert_files`), for `weight_errors` without loading the original; `on_read` as there."""
    files = SafetensorsFiles.open(path)
    names = [n for w in find_pool(converted).weights.values() for n in (w.name, *w.aliases)]
    return files.reader(file_keys(names, converted, files), on_read)
