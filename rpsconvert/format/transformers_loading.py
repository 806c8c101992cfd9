"""A converted model directory loads with transformers' own `from_pretrained`.

transformers lets a package outside it add a loading method (`register_quantization_config`,
`register_quantizer`): a directory whose config.json carries a `quantization_config` with that
`quant_method` is loaded through the registered quantizer, as VPTQ, AQLM or BitNet models are. So
a directory rpsconvert writes names `"quant_method": "rps"`, and `import rpsconvert` registers the
config and the quantizer: transformers builds the model from config.json, loads the dense tensors
of `model.rps.safetensors`, and the quantizer installs the pool from the same file (`load`), in
lean mode.

Without `import rpsconvert`, transformers skips an unknown `quant_method` with a warning and would
load the file as a plain state dict, every compressed weight left at its random initialisation.
So config.json names, in `transformers_weights` (the 5.x loader's way to name the weights file), a
name that is not a safetensors file and says what to do: transformers refuses it in one line that
tells the user to import rpsconvert. The registered quantizer puts the real file name back before
the loader reads it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import warnings
from pathlib import Path

from torch import nn

from rpsconvert.errors import RPSWarning

QUANT_METHOD = "rps"
# What config.json names as the weights file: not a *.safetensors name, so that transformers
# without rpsconvert refuses the directory with this text instead of loading random weights.
NEEDS_RPSCONVERT = "model.rps.safetensors holds rpsconvert's format: run `import rpsconvert` (pip install rpsconvert) before from_pretrained"
LOADER_KEYS = ("quantization_config", "transformers_weights")  # what config.json holds for the loader, not for the model


def quantization_config(manifest: dict, checkpoint: str) -> dict:
    """config.json's `quantization_config` for a checkpoint with this manifest: the method, the
    format version and what rebuilds the layers (the mapping, the seed, the pool's storage and the
    compressed weights by name; their offsets and scales are in the checkpoint, which is read whole)."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": manifest["format_version"],
        "checkpoint": checkpoint,
        "hash": manifest["hash"],
        "mapping": manifest["mapping"],
        "mapping_params": manifest.get("mapping_params", {}),
        "seed": manifest["seed"],
        "pool": manifest["pool"],
        "weights": [w["name"] for w in manifest["weights"]],
    }


def register() -> None:
    """Register the `rps` quantization config and quantizer with transformers (once; `import
    rpsconvert` does it when transformers is installed), and let `save_pretrained` of a converted
    model write rpsconvert's directory."""
    from transformers.quantizers import auto

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    config_class, quantizer_class = _classes()
    auto.register_quantization_config(QUANT_METHOD)(config_class)
    auto.register_quantizer(QUANT_METHOD)(quantizer_class)
    _route_save_pretrained()


def _classes() -> tuple[type, type]:
    """The config and quantizer classes, made here because their bases are transformers'."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from rpsconvert.format.checkpoint import CHECKPOINT_FILE, load

    class RPSConfig(QuantizationConfigMixin):
        """The `quantization_config` of an rpsconvert directory (`quantization_config` above)."""

        def __init__(self, **fields):
            self.quant_method = QUANT_METHOD
            fields.pop("quant_method", None)
            self.checkpoint = fields.pop("checkpoint", CHECKPOINT_FILE)
            for key, value in fields.items():
                setattr(self, key, value)

        def to_dict(self) -> dict:
            return dict(self.__dict__)

    class RPSQuantizer(HfQuantizer):
        """Loads an rpsconvert directory: transformers builds the model and loads the dense
        tensors; the pool and every compressed weight then come from the checkpoint (`load`)."""

        requires_calibration = True  # only a converted directory loads this way, never a dense model

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.checkpoint: str | None = None

        def update_attn_implementation(self, config):
            # the one hook that sees the config before the weights file is looked up: the real
            # name replaces the one that stops transformers without rpsconvert (module docstring)
            config.transformers_weights = self.quantization_config.checkpoint
            return config

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            self.checkpoint = Path(checkpoint_files[0]).parent  # its directory: a checkpoint may be sharded
            # the compressed weights are not in the file, the pool is not a model tensor yet
            model._keys_to_ignore_on_load_missing = {*(model._keys_to_ignore_on_load_missing or ()),
                                                    *(rf"^{name}$" for name in self.quantization_config.weights)}
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()), r"^rps_pool"}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            model.config.__dict__.pop("transformers_weights", None)
            return load(self.checkpoint, model)

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    return RPSConfig, RPSQuantizer


def _route_save_pretrained() -> None:
    """`save_pretrained` of a converted model writes rpsconvert's directory (`save_directory`):
    transformers' own would write the generated weights' state dict, which nothing could load."""
    PreTrainedModel = sys.modules[LOADER_MODULE].PreTrainedModel

    from rpsconvert.engine.modules import is_converted
    from rpsconvert.format.checkpoint import save_directory

    original = PreTrainedModel.save_pretrained

    @functools.wraps(original)
    def save_pretrained(self: nn.Module, save_directory_: str | os.PathLike, *args, **kwargs):
        if not is_converted(self):
            return original(self, save_directory_, *args, **kwargs)
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) of a converted model: save it, then upload the directory with huggingface_hub's upload_folder")
        return save_directory(self, Path(save_directory_), overwrite=True)

    PreTrainedModel.save_pretrained = save_pretrained


def register_when_imported() -> None:
    """`register` as soon as transformers' model loader exists: now if it is imported, else right
    after `transformers.modeling_utils` is (an import hook), so that `import rpsconvert` stays fast
    and never imports transformers itself."""
    if LOADER_MODULE in sys.modules:
        register()
    elif not any(isinstance(finder, _AfterLoaderImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterLoaderImport())


LOADER_MODULE = "transformers.modeling_utils"  # defines from_pretrained, after the quantizer registry


class _AfterLoaderImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of LOADER_MODULE so that `register` runs once
    the module has run, then leaves sys.meta_path."""

    def find_spec(self, name, path, target=None):
        if name != LOADER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_and_register(module):
            run(module)
            try:
                register()
            except Exception as exc:  # a transformers whose extension point changed: it still works without us
                warnings.warn(f"rpsconvert could not register its loader with transformers ({exc}): load with rpsconvert.from_pretrained", RPSWarning)

        spec.loader.exec_module = run_and_register
        return spec
