"""rpsconvert: shrink a trained PyTorch model to a memory budget with randomized parameter sharing.

Everything a user needs is importable from here (`from rpsconvert import convert, recover`). The
parts behind it (docs/architecture.md):

- `rpsconvert.engine`: hashing, mappings, the pool operator, RPS weights inside modules,
  discovery, projection, budgets, the conversion report;
- `rpsconvert.format`: the checkpoint file (manifest, sizing, atomic writes, architectures);
- `rpsconvert.quality`: calibration, recovery by distillation, fidelity measurement;
- `rpsconvert.cli`: the `rpsconvert` command.
"""

from rpsconvert.version import __version__  # noqa: F401  (rpsconvert.__version__)

import importlib as _importlib
import sys as _sys

from rpsconvert.errors import (
    ArchitectureError,
    BudgetError,
    CheckpointError,
    InputError,
    MemoryLimitError,
    OutputExistsError,
    RPSError,
    RPSWarning,
)
from rpsconvert.engine.budget import parse_bytes
from rpsconvert.engine.discovery import register_weight_function
from rpsconvert.engine.kinds import LayerKind, register_layer_kind
from rpsconvert.engine.mapping import HashedNet, RandomFold, RoastTile, register_mapping
from rpsconvert.engine.modules import clear_cache, densify, is_converted, materialize, set_mode
from rpsconvert.engine.pool import RPSPool
from rpsconvert.engine.storage import PoolStorage
from rpsconvert.engine.report import ConversionReport, WeightReport, report, resident_bytes
from rpsconvert.format.checkpoint import decompress, from_pretrained, load, save
from rpsconvert.format.onnx_export import check_onnx, export_onnx
from rpsconvert.quality.batches import load_calibration
from rpsconvert.quality.calibration import LayerFit, calibrate
from rpsconvert.quality.fidelity import Fidelity, fidelity, layer_errors, weight_errors
from rpsconvert.quality.recovery import RecoveryHistory, TeacherFiles, recover
from rpsconvert.quality.verification import Verification, random_inputs, verify
from rpsconvert.conversion import convert
from rpsconvert.streaming import convert_files, memory_needed
from rpsconvert.format.transformers_loading import register_when_imported as _register_with_transformers

__all__ = [
    # convert, run, save and load
    "convert",
    "convert_files",
    "memory_needed",
    "report",
    "resident_bytes",
    "save",
    "load",
    "from_pretrained",
    "decompress",
    "export_onnx",
    "check_onnx",
    "is_converted",
    "densify",
    "materialize",
    "clear_cache",
    "set_mode",
    "parse_bytes",
    # get the quality back, and measure it
    "load_calibration",
    "calibrate",
    "recover",
    "TeacherFiles",
    "fidelity",
    "layer_errors",
    "weight_errors",
    "verify",
    "random_inputs",
    # result types
    "ConversionReport",
    "WeightReport",
    "LayerFit",
    "RecoveryHistory",
    "Fidelity",
    "Verification",
    "RPSPool",
    "PoolStorage",
    # extension points
    "register_mapping",
    "register_layer_kind",
    "register_weight_function",
    "LayerKind",
    "RandomFold",
    "HashedNet",
    "RoastTile",
    # errors and warnings
    "RPSError",
    "ArchitectureError",
    "BudgetError",
    "CheckpointError",
    "InputError",
    "MemoryLimitError",
    "OutputExistsError",
    "RPSWarning",
]

# Module paths of 0.1, before the engine/format/quality layout, stay importable
# (`from rpsconvert.recovery import recover` keeps working).
for _old, _new in {
    "recovery": "quality.recovery",
    "calibration": "quality.calibration",
    "batches": "quality.batches",
    "checkpoint": "format.checkpoint",
    "architectures": "format.architectures",
    "mapping": "engine.mapping",
    "hashing": "engine.hashing",
    "budget": "engine.budget",
    "discovery": "engine.discovery",
    "projection": "engine.projection",
}.items():
    _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(f"{__name__}.{_new}")

# transformers' from_pretrained loads rpsconvert's directories once its loader is imported (not here: import stays fast)
_register_with_transformers()
