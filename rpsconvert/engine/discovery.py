"""Which parameters are weights: a torch.fx pass over the model, with a module scan as fallback.

A weight is a parameter that reaches the weight operand of a linear, convolution, embedding or
matmul-like op only through other parameters (reshapes, standardization, products of factors...),
never through the input. That definition finds weights used through modules and through
functional calls alike (`F.linear(x, self.w)`, `x @ self.w.t()`), and leaves positional embeddings,
class tokens and scales that are added or multiplied elementwise alone.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from rpsconvert.engine.kinds import weight_names
from rpsconvert.errors import RPSWarning

MOSTLY_DENSE = 0.5  # share of parameter bytes in matrices not found as weights that makes discover warn

# Function -> positions of its weight operands. None: any operand that does not depend on the input.
WEIGHT_FUNCTIONS: dict[object, tuple[int, ...] | None] = {}
WEIGHT_METHODS: set[str] = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}


def register_weight_function(function: object, positions: tuple[int, ...] | None) -> None:
    """Declare that `function` takes weights at argument `positions` (None: at any argument that
    does not depend on the input), so fx discovery finds weights used through it."""
    WEIGHT_FUNCTIONS[function] = positions


for _function, _positions in (
    (F.linear, (1,)),
    (F.bilinear, (2,)),
    (torch.conv1d, (1,)),
    (torch.conv2d, (1,)),
    (torch.conv3d, (1,)),
    (torch.conv_transpose1d, (1,)),
    (torch.conv_transpose2d, (1,)),
    (torch.conv_transpose3d, (1,)),
    (F.embedding, (1,)),
    (torch.embedding, (0,)),
    (F.embedding_bag, (1,)),
    (torch.embedding_bag, (0,)),
    (torch.matmul, None),
    (torch.mm, None),
    (torch.bmm, None),
    (torch.addmm, (1, 2)),
    (torch.einsum, None),
    (operator.matmul, None),
):
    register_weight_function(_function, _positions)


@dataclass
class Discovery:
    """Weights found in a model, each a set of names that share one Parameter (tied weights)."""

    weights: list[str]  # canonical name of each weight parameter, in model.named_parameters order
    method: str  # "fx" or "module-scan"
    fallback_reason: str | None = None
    aliases: dict[str, list[str]] = field(default_factory=dict)  # canonical name -> every name


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> all names it is reachable under, the first being its canonical name."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _param_sources(node: torch.fx.Node, params: dict[str, nn.Parameter], memo: dict) -> set[str] | None:
    """Parameters a node is computed from, or None if it depends on the input or on a module call."""
    if node in memo:
        return memo[node]
    if node.op == "get_attr":
        result = {node.target} if node.target in params else set()
    elif node.op in ("call_function", "call_method"):
        result = set()
        for arg in node.all_input_nodes:
            sources = _param_sources(arg, params, memo)
            if sources is None:
                result = None
                break
            result |= sources
    else:  # placeholder, call_module, output
        result = None
    memo[node] = result
    return result


def _weight_operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph nodes in the weight slots of a linear/conv/embedding/matmul-like call."""
    if node.op == "call_function" and node.target in WEIGHT_FUNCTIONS:
        positions = WEIGHT_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in WEIGHT_METHODS:
        positions = None
    else:
        return []
    if positions is None:
        operands = list(node.args)
    else:
        operands = [node.args[i] for i in positions if i < len(node.args)]
        operands += [node.kwargs["weight"]] if "weight" in node.kwargs else []
    flat = [a for arg in operands for a in (arg if isinstance(arg, (list, tuple)) else [arg])]  # einsum's list
    return [a for a in flat if isinstance(a, torch.fx.Node)]


def _fx_weights(model: nn.Module) -> list[str]:
    graph = torch.fx.symbolic_trace(model).graph
    params = dict(model.named_parameters(remove_duplicate=False))
    found: list[str] = []
    memo: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            found += weight_names(model.get_submodule(node.target), node.target)
        for operand in _weight_operands(node):
            found += sorted(_param_sources(operand, params, memo) or ())
    return found


def _structure_copy(model: nn.Module) -> nn.Module:
    """A copy of the model's modules and Python state sharing every tensor with it, to trace.

    Tracing runs the forward on proxies, and a forward that caches something (timm's LeViT keeps
    attention biases in a dict) leaves proxies in the model: a later deepcopy of it then breaks.
    Tracing a copy keeps the user's model as it was, at the cost of its Python objects only.
    A model that cannot be copied is traced as it is.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # an attribute deepcopy cannot handle (a lock, a file)
        return model


def discover(model: nn.Module) -> Discovery:
    """Find the weight parameters of `model`, by torch.fx when it traces, else by a module scan."""
    try:
        found, method, reason = _fx_weights(_structure_copy(model)), "fx", None
    except Exception as exc:  # any tracing failure: the fallback below says why
        found, method = weight_names(model, ""), "module-scan"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    names_of = parameter_names(model)
    canonical_of = {name: names[0] for names in names_of.values() for name in names}
    found_canonical = {canonical_of[name] for name in found if name in canonical_of}
    groups = [names for names in names_of.values() if names[0] in found_canonical]
    found = Discovery(
        weights=[g[0] for g in groups], method=method, fallback_reason=reason, aliases={g[0]: g for g in groups}
    )
    _warn_if_mostly_dense(model, found)
    return found


def undiscovered(model: nn.Module, found: Discovery) -> tuple[list[str], float]:
    """The parameters of two or more dimensions that are not weights (largest first), and the share
    of the model's parameter bytes they hold: what a conversion can never shrink."""
    params = dict(model.named_parameters())
    nbytes = {name: p.numel() * p.element_size() for name, p in params.items()}
    dense = sorted((n for n, p in params.items() if p.ndim >= 2 and n not in found.aliases), key=lambda n: -nbytes[n])
    return dense, sum(nbytes[n] for n in dense) / max(sum(nbytes.values()), 1)


def _warn_if_mostly_dense(model: nn.Module, found: Discovery) -> None:
    """Say loudly when most of a model's bytes are matrices that are not weights: they usually are
    weights of a layer discovery does not know (register its kind), and a conversion that leaves them
    dense barely shrinks the model."""
    dense, share = undiscovered(model, found)
    if share > MOSTLY_DENSE:
        shown = ", ".join(dense[:3]) + (f" and {len(dense) - 3} more" if len(dense) > 3 else "")
        warnings.warn(
            f"{share:.0%} of the bytes of {type(model).__name__} are in matrices that are not used as weights of a known "
            f"layer, so they stay dense: {shown}; if they are weights, register their layer with register_layer_kind",
            RPSWarning,
            stacklevel=3,
        )
