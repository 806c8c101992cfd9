"""Which parameters are weights: a torch.fx pass over the model, else a torch.export graph of it on
example inputs, else a module scan.

A weight is a parameter that reaches the weight operand of a linear, convolution, embedding or
matmul-like op only through other parameters (reshapes, standardization, products of factors...),
never through the input. That definition finds weights used through modules and through
functional calls alike (`F.linear(x, self.w)`, `x @ self.w.t()`), and leaves positional embeddings,
class tokens and scales that are added or multiplied elementwise alone.

torch.fx traces without inputs but cannot follow Python control flow on tensors, which Hugging Face
models are full of. torch.export runs the forward on fake tensors shaped like example inputs (the
first calibration batch, or a Hugging Face model's own dummy inputs), so it follows that control flow
and sees every op, down to the aten linear/addmm/convolution/embedding calls that take the weights.
Only without example inputs, or when export fails too, are weights found by scanning for known layers.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from rpsconvert.engine.kinds import kind_of, weight_names
from rpsconvert.errors import RPSWarning

MOSTLY_DENSE = 0.5  # share of parameter bytes in matrices not found as weights that makes discover warn

# Function -> positions of its weight operands. None: any operand that does not depend on the input.
WEIGHT_FUNCTIONS: dict[object, tuple[int, ...] | None] = {}
WEIGHT_METHODS: set[str] = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}


def register_weight_function(function: object, positions: tuple[int, ...] | None) -> None:
    """Declare that `function` (a Python function, or an aten op packet such as torch.ops.aten.mm
    for export graphs) takes weights at argument `positions` (None: at any argument that does not
    depend on the input), so discovery finds weights used through it."""
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
    # the aten ops of a torch.export graph (matched by packet, so every overload counts)
    (torch.ops.aten.linear, (1,)),
    (torch.ops.aten.bilinear, (2,)),
    (torch.ops.aten.addmm, (1, 2)),
    (torch.ops.aten.mm, None),
    (torch.ops.aten.bmm, None),
    (torch.ops.aten.matmul, None),
    (torch.ops.aten.einsum, None),
    (torch.ops.aten.convolution, (1,)),
    (torch.ops.aten.conv1d, (1,)),
    (torch.ops.aten.conv2d, (1,)),
    (torch.ops.aten.conv3d, (1,)),
    (torch.ops.aten.conv_transpose1d, (1,)),
    (torch.ops.aten.conv_transpose2d, (1,)),
    (torch.ops.aten.conv_transpose3d, (1,)),
    (torch.ops.aten.embedding, (0,)),
    (torch.ops.aten.embedding_bag, (0,)),
    (torch.ops.aten._embedding_bag, (0,)),
    # recurrent layers take their weights and biases in one list; the biases are 1-D, so they stay dense
    (torch.ops.aten.lstm, None),
    (torch.ops.aten.gru, None),
    (torch.ops.aten.rnn_tanh, None),
    (torch.ops.aten.rnn_relu, None),
):
    register_weight_function(_function, _positions)


@dataclass
class Discovery:
    """Weights found in a model, each a set of names that share one Parameter (tied weights)."""

    weights: list[str]  # canonical name of each weight parameter, in model.named_parameters order
    method: str  # "fx", "export" or "module-scan"
    fallback_reason: str | None = None
    aliases: dict[str, list[str]] = field(default_factory=dict)  # canonical name -> every name


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> all names it is reachable under, the first being its canonical name."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _param_sources(graph: torch.fx.Graph, leaves: dict[torch.fx.Node, set[str]]) -> dict[torch.fx.Node, set[str] | None]:
    """The parameters each node is computed from, or None where it depends on the input or on a
    module call. `leaves` holds the nodes that read parameters or constants (fx's get_attr, export's
    lifted placeholders); any other placeholder is input. Graphs list their nodes in topological
    order, so one pass sees every argument before its users, however deep the graph."""
    sources: dict[torch.fx.Node, set[str] | None] = {}
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            inputs = [sources[arg] for arg in node.all_input_nodes]
            sources[node] = None if None in inputs else set().union(*inputs)
        else:  # placeholder, get_attr, call_module, output
            sources[node] = leaves.get(node)
    return sources


def _weight_operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph nodes in the weight slots of a linear/conv/embedding/matmul-like call."""
    target = getattr(node.target, "overloadpacket", node.target)  # aten.mm.default -> aten.mm
    if node.op == "call_function" and target in WEIGHT_FUNCTIONS:
        positions = WEIGHT_FUNCTIONS[target]
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


def _graph_weights(graph: torch.fx.Graph, leaves: dict[torch.fx.Node, set[str]]) -> list[str]:
    """The parameters that reach a weight operand only through other parameters: the one definition
    of a weight, shared by the fx and the export graphs."""
    sources = _param_sources(graph, leaves)
    return [name for node in graph.nodes for operand in _weight_operands(node) for name in sorted(sources[operand] or ())]


def _fx_weights(model: nn.Module) -> list[str]:
    graph = torch.fx.symbolic_trace(model).graph
    params = dict(model.named_parameters(remove_duplicate=False))
    leaves = {node: {node.target} & params.keys() for node in graph.nodes if node.op == "get_attr"}
    in_leaf_modules = [
        name for node in graph.nodes if node.op == "call_module" for name in weight_names(model.get_submodule(node.target), node.target)
    ]
    return in_leaf_modules + _graph_weights(graph, leaves) + _untraced_layers(model, graph)


def _untraced_layers(model: nn.Module, graph: torch.fx.Graph) -> list[str]:
    """The weights of known layers that the traced forward never reaches, neither by calling them
    nor by reading their parameters: branches that run only in training, such as GoogLeNet's
    auxiliary classifiers (the trace follows eval mode). A layer's weight is its weight whichever
    branch calls it, so these are found as the module scan finds them, rather than kept dense."""
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    used = set()  # every module called or read from, and every module above one
    for target in called | {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"}:
        parts = target.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        inside_called = any(".".join(parts[:i]) in called for i in range(1, len(parts)))
        kind = kind_of(module)
        if name and kind is not None and name not in used and not inside_called:
            found += [f"{name}.{attr}" for attr in kind.weights(module)]
    return found


class _Tensors(nn.Module):
    """A model that returns only the tensors of its output. Export refuses outputs of types it does
    not know (Hugging Face's key-value caches), and discovery needs the graph, not the output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [t for t in tree_leaves(self.model(*args, **kwargs)) if isinstance(t, torch.Tensor)]


def _export_weights(model: nn.Module, batch: Any) -> list[str]:
    """Weights in the torch.export graph of `model` called on `batch` (a tensor, a tuple or list of
    arguments, or a dict of keyword arguments), its parameter placeholders mapped back to names."""
    device = next(model.parameters(), torch.empty(0)).device
    batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
    if isinstance(batch, dict):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own deprecation notices, not the user's business
        exported = torch.export.export(_Tensors(model), args, kwargs, strict=False)
    signature, graph = exported.graph_signature, exported.graph
    placeholders = {node.name: node for node in graph.nodes if node.op == "placeholder"}
    leaves = {placeholders[p]: {name.removeprefix("model.")} for p, name in signature.inputs_to_parameters.items()}
    constants = (*signature.inputs_to_buffers, *signature.inputs_to_lifted_tensor_constants)
    leaves.update({placeholders[p]: set() for p in constants})
    leaves.update({node: set() for node in graph.nodes if node.op == "get_attr"})
    return _graph_weights(graph, leaves)


def _hugging_face_inputs(model: nn.Module) -> dict | None:
    """A Hugging Face model's own dummy inputs (token ids: the attention mask and the rest have
    defaults), when they hold the input its forward reads first; a vision model's are token ids too.
    The class is recognized by name, so transformers is never imported here."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(model).__mro__}
    if "transformers.modeling_utils.PreTrainedModel" not in names:
        return None
    inputs = dict(model.dummy_inputs)
    return inputs if model.main_input_name in inputs else None


def _structure_copy(model: nn.Module) -> nn.Module:
    """A copy of the model's modules and Python state sharing every tensor with it, to trace.

    Tracing runs the forward on proxies, and a forward that caches something (timm's LeViT keeps
    attention biases in a dict) leaves proxies in the model: a later deepcopy of it then breaks.
    Tracing a copy keeps the user's model as it was, at the cost of its Python objects only.
    A model that cannot be copied is traced as it is. A model with parameters on the meta device
    (the skeleton of a model converted from its files, rpsconvert/streaming.py) is traced with
    every tensor on meta: a forward mixing meta and real tensors fails where one on meta runs.
    """
    tensors = (*model.parameters(), *model.buffers())
    memo = {id(t): t for t in tensors}
    if any(t.device.type == "meta" for t in tensors):
        memo = {id(t): nn.Parameter(t.to("meta"), t.requires_grad) if isinstance(t, nn.Parameter) else t.to("meta") for t in tensors}
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # an attribute deepcopy cannot handle (a lock, a file)
        return model


def discover(model: nn.Module, example_inputs: Any = None) -> Discovery:
    """Find the weight parameters of `model`: by torch.fx when it traces; else by torch.export on
    `example_inputs` (one batch: a tensor, a tuple of arguments or a dict of keyword arguments; a
    Hugging Face model's dummy inputs when none are given); else by a module scan. Both tracers run
    on a structure copy, so the model is left as it was."""
    try:
        found, method, reason = _fx_weights(_structure_copy(model)), "fx", None
    except Exception as exc:  # any tracing failure: export or the module scan follow
        found, method, reason = _export_or_scan(model, example_inputs, _reason(exc))
    names_of = parameter_names(model)
    canonical_of = {name: names[0] for names in names_of.values() for name in names}
    found_canonical = {canonical_of[name] for name in found if name in canonical_of}
    groups = [names for names in names_of.values() if names[0] in found_canonical]
    found = Discovery(
        weights=[g[0] for g in groups], method=method, fallback_reason=reason, aliases={g[0]: g for g in groups}
    )
    _warn_if_mostly_dense(model, found)
    return found


def _export_or_scan(model: nn.Module, example_inputs: Any, fx_failure: str) -> tuple[list[str], str, str | None]:
    """The weights of a model torch.fx cannot trace, the method that found them, and, when it is the
    module scan, why neither tracer could be used."""
    try:
        batch = _hugging_face_inputs(model) if example_inputs is None else example_inputs
        if batch is not None:
            return _export_weights(_structure_copy(model), batch), "export", None  # a fresh copy: fx may have left proxies in the first
        reason = fx_failure
    except Exception as exc:  # any export failure: the module scan follows, and says why
        reason = f"{fx_failure}; torch.export: {_reason(exc)}"
    return weight_names(model, ""), "module-scan", reason


def _reason(exc: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


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
