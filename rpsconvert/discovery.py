"""Which parameters are weights: a torch.fx pass over the model, with a module scan as fallback.

A weight is a parameter that reaches the weight operand of a linear, convolution, embedding or
matmul-like op only through other parameters (reshapes, standardization, products of factors...),
never through the input. That definition finds weights used through modules and through
functional calls alike (`F.linear(x, self.w)`, `x @ self.w.t()`), and leaves positional embeddings,
class tokens and scales that are added or multiplied elementwise alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# Function -> positions of its weight operands. None: any operand that does not depend on the input.
_WEIGHT_FUNCTIONS: dict[object, tuple[int, ...] | None] = {
    F.linear: (1,),
    F.bilinear: (2,),
    torch.conv1d: (1,),
    torch.conv2d: (1,),
    torch.conv3d: (1,),
    torch.conv_transpose1d: (1,),
    torch.conv_transpose2d: (1,),
    torch.conv_transpose3d: (1,),
    F.embedding: (1,),
    torch.embedding: (0,),
    F.embedding_bag: (1,),
    torch.embedding_bag: (0,),
    torch.matmul: None,
    torch.mm: None,
    torch.bmm: None,
    torch.addmm: (1, 2),
    torch.einsum: None,
    operator.matmul: None,
}
_WEIGHT_METHODS = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}

# Module types whose listed parameters are weights (used for fx leaf modules and by the module scan).
_MODULE_WEIGHTS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.Linear, ("weight",)),
    (nn.Bilinear, ("weight",)),
    (nn.modules.conv._ConvNd, ("weight",)),
    (nn.Embedding, ("weight",)),
    (nn.EmbeddingBag, ("weight",)),
    (nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")),
)


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


def _module_weights(module: nn.Module, prefix: str) -> list[str]:
    found = []
    for sub_name, sub in module.named_modules(prefix=prefix):
        for cls, attrs in _MODULE_WEIGHTS:
            if isinstance(sub, cls):
                found += [f"{sub_name}.{a}" if sub_name else a for a in attrs if getattr(sub, a, None) is not None]
        if isinstance(sub, nn.RNNBase):
            found += [f"{sub_name}.{n}" if sub_name else n for n, _ in sub.named_parameters(recurse=False) if n.startswith("weight")]
    return found


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
    if node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS:
        positions = _WEIGHT_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _WEIGHT_METHODS:
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
            found += _module_weights(model.get_submodule(node.target), node.target)
        for operand in _weight_operands(node):
            found += sorted(_param_sources(operand, params, memo) or ())
    return found


def discover(model: nn.Module) -> Discovery:
    """Find the weight parameters of `model`, by torch.fx when it traces, else by a module scan."""
    try:
        found, method, reason = _fx_weights(model), "fx", None
    except Exception as exc:  # any tracing failure: the fallback below says why
        found, method = _module_weights(model, ""), "module-scan"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    names_of = parameter_names(model)
    canonical_of = {name: names[0] for names in names_of.values() for name in names}
    found_canonical = {canonical_of[name] for name in found if name in canonical_of}
    groups = [names for names in names_of.values() if names[0] in found_canonical]
    return Discovery(
        weights=[g[0] for g in groups], method=method, fallback_reason=reason, aliases={g[0]: g for g in groups}
    )
