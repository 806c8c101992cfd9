"""Layer kinds: the module types whose parameters are weights RPS can generate.

A kind names a module type, which of its parameters are weights, and, when the layer is a matrix
product of its weight with rows built from its input (Linear, Conv1d, Conv2d), how to build those
rows: that is what lets data-aware calibration solve the layer from its inputs. The module scan,
fx leaf modules and calibration all read this registry, so supporting a new layer is one call:

    register_layer_kind(MyLinear, weights=("weight",), patches=my_patches)

The most specific registered class in a module's MRO wins, so a kind for nn.Conv2d refines the
one for all convolutions.

A layer of an optional library (Hugging Face's `Conv1D`) is registered by its qualified class name,
`"transformers.pytorch_utils.Conv1D"`, and matched against the names of the classes in a module's MRO
when a model is scanned: registering it imports nothing, so rpsconvert imports, and every other
model converts, without that library installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

Patches = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerKind:
    module_type: type[nn.Module] | str  # a class, or the qualified name of a class of an optional library
    weights: Callable[[nn.Module], Iterable[str]]  # the attribute names of a module's weights
    patches: Patches | None = None  # input -> (rows, groups, d): rows that multiply the grouped weight


LAYER_KINDS: dict[type[nn.Module], LayerKind] = {}
NAMED_KINDS: dict[str, LayerKind] = {}  # "module.QualName" of a class of an optional library -> its kind


def register_layer_kind(
    module_type: type[nn.Module] | str,
    weights: tuple[str, ...] | Callable[[nn.Module], Iterable[str]] = ("weight",),
    patches: Patches | None = None,
) -> LayerKind:
    """Declare the weights of `module_type` (a class, or the qualified name of a class whose library
    need not be installed) as attribute names or a function of the module giving them, and,
    optionally, its `patches` function for data-aware calibration."""
    names = weights if callable(weights) else (lambda module, attrs=tuple(weights): [a for a in attrs if getattr(module, a, None) is not None])
    kind = LayerKind(module_type, names, patches)
    if isinstance(module_type, str):
        NAMED_KINDS[module_type] = kind
    else:
        LAYER_KINDS[module_type] = kind
    return kind


def kind_of(module: nn.Module) -> LayerKind | None:
    """The registered kind of `module`: the one of the most specific class in its MRO, registered
    by class or by qualified name."""
    for cls in type(module).__mro__:
        kind = LAYER_KINDS.get(cls) or NAMED_KINDS.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    return None


def weight_names(module: nn.Module, prefix: str) -> list[str]:
    """The full names of the weights of `module` and of every module inside it."""
    found = []
    for name, sub in module.named_modules(prefix=prefix):
        kind = kind_of(sub)
        if kind is not None:
            found += [f"{name}.{attr}" if name else attr for attr in kind.weights(sub)]
    return found


def grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A weight as (groups, out per group, d), the layout `patches` multiplies."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def _linear_patches(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, x.shape[-1])


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches (im2col) each output position multiplies with the weight."""
    pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=pad_mode)
    if isinstance(module, nn.Conv1d):  # a Conv1d is a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (n, C*k, L), channel-major columns
    return cols.transpose(1, 2).reshape(-1, module.groups, cols.shape[1] // module.groups)


def _rnn_weights(module: nn.RNNBase) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False) if name.startswith("weight")]


register_layer_kind(nn.Linear, patches=_linear_patches)
register_layer_kind(nn.Bilinear)
register_layer_kind(nn.modules.conv._ConvNd)
register_layer_kind(nn.Conv1d, patches=_conv_patches)
register_layer_kind(nn.Conv2d, patches=_conv_patches)
register_layer_kind(nn.Embedding)
register_layer_kind(nn.EmbeddingBag)
register_layer_kind(nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"))
register_layer_kind(nn.RNNBase, _rnn_weights)
# GPT-2's (and OpenAI GPT's, ImageGPT's) transposed linear, used through torch.addmm: no patches, since
# its weight is (in, out), not the (out, in) that `grouped` lays out
register_layer_kind("transformers.pytorch_utils.Conv1D")
register_layer_kind("torchvision.ops.deform_conv.DeformConv2d")  # a Module, not a _ConvNd
register_layer_kind("timm.layers.cond_conv2d.CondConv2d")  # (experts, out*in*k*k), mixed per input
