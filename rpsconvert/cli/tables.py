"""Tables of tensors that fit the terminal: `info`'s tensors and `convert --dry-run`'s plan per layer.

Tensor names are the widest cells (`model.encoder.layers.11.self_attn.out_proj.weight`), and a name
folded over three lines can be neither read nor grepped. So every other cell stays whole and a name
too wide for what is left is shortened in the middle, where both informative ends survive (the
block and the parameter); --json keeps the full names.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

from rpsconvert.engine.budget import format_bytes
from rpsconvert.engine.report import ConversionReport

ELLIPSIS = "…"
# A cell that may be long besides the name (why a tensor stays dense, the tensor a tied name
# shares) wraps at this width, so that names keep their room.
WRAP_WIDTH = 20
MIN_NAME = 16  # below this a name says nothing: a narrower terminal wraps the table instead


def shorten(text: str, width: int) -> str:
    """`text` in at most `width` characters: its middle replaced by an ellipsis when too long."""
    if len(text) <= width:
        return text
    head = width // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def tensor_table(title: str, columns: list[tuple[str, str, int | None]], rows: list[list[str]], width: int) -> Table:
    """A table whose first column is tensor names, shortened to fit `width` characters; `columns`
    are the others' (header, justify, wrap width): a cell wider than its wrap width wraps (words,
    such as the reason a tensor stays dense), a column without one never does."""
    others = [min(max(len(header), *(len(row[i + 1]) for row in rows)), wrap or width) for i, (header, _, wrap) in enumerate(columns)]
    # each column is padded by a space on either side, and the box draws one character between
    # columns and at either edge
    room = max(MIN_NAME, width - sum(others) - 3 * (len(columns) + 1) - 1)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    for header, justify, wrap in columns:
        table.add_column(header, justify=justify, no_wrap=wrap is None, max_width=wrap)
    for name, *cells in rows:
        table.add_row(shorten(name, room), *cells)
    return table


def plan_table(rep: ConversionReport, width: int) -> Table:
    """What a conversion would do to each tensor: kept in the pool or dense (and why), the pool
    slots a compressed weight reads, and its bytes before."""
    rows = [
        [w.name, "x".join(map(str, w.shape)) or "scalar", f"{w.slots_used:,}" if w.compressed else "",
         format_bytes(w.bytes_before), "pool" if w.compressed else f"dense: {w.reason}"]
        for w in rep.weights
    ]
    columns = [("shape", "left", None), ("slots read", "right", None), ("bytes", "right", None), ("stored", "left", WRAP_WIDTH)]
    table = tensor_table("plan per tensor", columns, rows, width)
    table.caption = f"pool: {rep.pool_slots:,} {rep.pool_dtype} slots, {format_bytes(rep.pool_bytes)}"
    return table
