"""rpsconvert: shrink a trained PyTorch model to a memory budget with randomized parameter sharing."""

__version__ = "0.1.0"

from rpsconvert.budget import BudgetError, parse_bytes  # noqa: E402
from rpsconvert.checkpoint import CheckpointError, decompress, load, save  # noqa: E402
from rpsconvert.convert import RPSWarning, convert  # noqa: E402
from rpsconvert.layers import RPSPool, clear_cache, materialize  # noqa: E402
from rpsconvert.report import ConversionReport, report  # noqa: E402

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ConversionReport",
    "RPSPool",
    "RPSWarning",
    "clear_cache",
    "convert",
    "decompress",
    "load",
    "materialize",
    "parse_bytes",
    "report",
    "save",
]
