"""Which weights a user's include/exclude patterns name, spelled as the ecosystem spells them.

PEFT, llm-compressor and torchao let a user name layers four ways, and people bring their habits:
an exact parameter name (`encoder.fc.weight`), an fnmatch glob (`encoder.*`), a regular expression
after `re:` (`re:.*\\.(q|v)_proj\\.weight`, matched against the whole name), or a module type
(`Linear`, `Conv2d`: the class of the module holding the weight or any class it derives from, by
name, so `Linear` also selects torch's NonDynamicallyQuantizableLinear inside MultiheadAttention).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from torch import nn

REGEX_PREFIX = "re:"


def patterns_of(patterns: Sequence[str] | str | None) -> list[str]:
    """The patterns as a list (one string is one pattern); a bad regular expression is a ValueError
    that names it, raised before any work is done."""
    listed = [patterns] if isinstance(patterns, str) else list(patterns or [])
    for pattern in listed:
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc}): write re: followed by a Python regex") from None
    return listed


def holder(model: nn.Module, name: str) -> nn.Module:
    """The module that holds the parameter `name` (the model itself for a top-level one)."""
    return model.get_submodule(name.rpartition(".")[0])


def matches(name: str, module: nn.Module, patterns: Sequence[str]) -> bool:
    """Whether any pattern names the parameter `name` held by `module` (see the module docstring)."""
    classes = {cls.__name__ for cls in type(module).__mro__}
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            if re.fullmatch(pattern[len(REGEX_PREFIX):], name):
                return True
        elif pattern == name or pattern in classes or fnmatch.fnmatchcase(name, pattern):
            return True
    return False
