"""Budgets in bytes and ratios, and how many pool slots they buy."""

from __future__ import annotations

import re
from typing import Callable

from rpsconvert.errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(budget: str | int | float) -> int:
    """`"1MB"` -> 1_000_000, `"1.5 MiB"` -> 1_572_864, `"123456"` -> 123456 (SI and IEC units).

    Units are read as Hugging Face reads them (`5GB` is 5e9 bytes, `5GiB` 5 * 2**30). A unit that
    mixes an uppercase prefix with a lowercase b (`1Mb`, `1Kib`) is the usual spelling of bits, and a
    budget off by a factor of eight is worse than an error, so it is refused with the byte spellings;
    an all-lowercase unit (`1mb`) is how people type bytes and is read as bytes.
    """
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value, unit = float(budget), ""
    else:
        match = _BUDGET.match(str(budget))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read the budget {budget!r}: write a number of bytes with an optional unit, "
                "such as 500kB, 1MB, 1.5MiB or 123456"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
        if match.group(2).endswith("b") and match.group(2) != unit:  # "1Mb", "1Kib": the b of bits
            as_bytes = f"{match.group(1)}{match.group(2)[:-1]}B"
            raise ValueError(
                f"the budget {budget!r} is in bits (lowercase b): write {as_bytes} for {int(value * _UNITS[unit]):,} bytes, "
                f"or {int(value * _UNITS[unit]) // 8} for the {int(value * _UNITS[unit]) // 8:,} bytes that {budget} holds"
            )
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"the budget must be a positive number of bytes, got {budget!r}")
    return size


def check_ratio(ratio: float) -> float:
    """A ratio is the fraction of compressible weight memory kept, in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio != ratio:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if ratio > 1:
        raise ValueError(
            f"ratio must be in (0, 1] (the fraction of weight memory kept), got {ratio}; "
            f"for a model {ratio:g} times smaller, pass ratio={1 / ratio:.6g}"
        )
    if ratio <= 0:
        raise ValueError(f"ratio must be in (0, 1] (the fraction of weight memory kept), got {ratio}")
    return float(ratio)


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def slots_for_budget(
    budget: int, fixed_bytes: int, pool_bytes: Callable[[int], int], largest_dense: list[tuple[str, int]]
) -> int:
    """The most pool slots whose bytes (`pool_bytes(slots)`, exact) fit in `budget` once the fixed
    part of the file (dense tensors, header) is paid.

    Raises BudgetError naming the minimum feasible budget when not even one slot fits.
    """
    room = budget - fixed_bytes
    if room < pool_bytes(1):
        biggest = ", ".join(f"{name} ({format_bytes(size)})" for name, size in largest_dense[:3])
        raise BudgetError(
            f"a budget of {format_bytes(budget)} is too small: the tensors kept dense and the file header "
            f"alone take {format_bytes(fixed_bytes)}, so the minimum budget is {fixed_bytes + pool_bytes(1)} bytes"
            + (f"; the largest dense tensors are {biggest} (weights among them can be compressed with a lower min_numel or a wider include; 1-D tensors always stay dense)" if biggest else "")
        )
    low, high = 1, 8 * room + 1  # pool_bytes grows at least a bit per slot: high never fits
    while high - low > 1:  # pool_bytes is monotone: bisect for the last slot count that fits
        middle = (low + high) // 2
        low, high = (middle, high) if pool_bytes(middle) <= room else (low, middle)
    return low
