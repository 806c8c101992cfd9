"""The model zoo of the conformance suite (tests/test_zoo.py) and of docs/coverage.md.

Every torchvision classification model, timm models across its families (some of which plain
torch.fx cannot trace) and Hugging Face BERT, GPT-2, ViT and T5 from tiny configs, all with random
weights (nothing is downloaded). `conform` runs the four promises of issue 13 on one of them and
returns what the coverage table shows.

CI runs `CI_SAMPLE`, one small member of each family; RPSCONVERT_ZOO=all (`make zoo`) runs all.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rpsconvert import RPSWarning, convert, decompress, load, report, save

RUN_ALL = os.environ.get("RPSCONVERT_ZOO") == "all"


@dataclass(frozen=True)
class ZooModel:
    name: str  # "library:model"
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple | dict]  # positional arguments, or keyword arguments of forward


def _images(size: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(**names: int) -> Callable[[], dict]:
    """Keyword arguments of token ids, each a (1, 8) tensor below its vocabulary size."""
    def inputs() -> dict:
        gen = torch.Generator().manual_seed(0)
        return {name: torch.randint(0, vocab, (1, 8), generator=gen) for name, vocab in names.items()}

    return inputs


# torchvision models whose default input (64x64) does not fit: keyword arguments and input size
_TORCHVISION_SIZES = {"inception_v3": ({}, 80), "maxvit_t": ({"input_size": (224, 224)}, 224)}


def _torchvision(name: str) -> ZooModel:
    import torchvision

    if name.startswith("vit_"):  # a ViT takes any image size that is a whole number of patches
        patch = int(name.rsplit("_", 1)[1])
        kwargs, size = {"image_size": 2 * patch}, 2 * patch
    else:
        kwargs, size = _TORCHVISION_SIZES.get(name, ({}, 64))
    build = lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)  # noqa: E731
    return ZooModel(f"torchvision:{name}", build, _images(size))


def _timm(name: str) -> ZooModel:
    import timm

    build = lambda: timm.create_model(name, pretrained=False, num_classes=10)  # noqa: E731
    size = timm.get_pretrained_cfg(name).input_size[-1] if timm.get_pretrained_cfg(name) else 224
    return ZooModel(f"timm:{name}", build, _images(size))


TIMM_MODELS = (
    # convolutional
    "resnet18", "resnetv2_50x1_bit", "cspresnet50", "res2net50_14w_8s", "resnest14d", "skresnet18", "nf_resnet26",
    "densenet121", "dla34", "vgg11", "repvgg_a0", "mobileone_s0", "hrnet_w18_small", "inception_v3", "regnetx_002",
    "ese_vovnet19b_slim", "gernet_s", "hgnetv2_b0", "convnext_atto", "fastvit_t8",
    # mobile
    "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_100", "lcnet_050", "rexnet_100",
    # vision transformers and hybrids (several plain torch.fx cannot trace)
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
    "crossvit_tiny_240", "tiny_vit_5m_224", "mobilevitv2_050", "efficientvit_b0", "levit_128s", "pit_ti_224",
    "convit_tiny", "coat_lite_tiny", "pvt_v2_b0", "twins_svt_small", "swin_tiny_patch4_window7_224", "nest_tiny",
    "hiera_tiny_224", "edgenext_xx_small", "efficientformer_l1", "visformer_tiny", "coatnet_nano_rw_224",
    "maxvit_nano_rw_256", "halonet26t", "botnet26t_256", "poolformer_s12",
    # MLPs and recurrent
    "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "sequencer2d_s",
)


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(config)  # decoder tied to the word embeddings


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)  # Conv1D layers, lm_head tied to wte


def _vit() -> nn.Module:
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=10)
    return transformers.ViTForImageClassification(config)


def _t5() -> nn.Module:
    import transformers

    config = transformers.T5Config(vocab_size=500, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)  # encoder-decoder, lm_head tied to the shared embedding


HUGGING_FACE = (
    ZooModel("transformers:BertForMaskedLM", _bert, _tokens(input_ids=500)),
    ZooModel("transformers:GPT2LMHeadModel", _gpt2, _tokens(input_ids=500)),
    ZooModel("transformers:ViTForImageClassification", _vit, _images(32)),
    ZooModel("transformers:T5ForConditionalGeneration", _t5, _tokens(input_ids=500, decoder_input_ids=500)),
)

# One small member of each family: what CI runs (the whole zoo takes far longer than CI allows).
CI_SAMPLE = {
    "torchvision:squeezenet1_1", "torchvision:shufflenet_v2_x0_5",
    "timm:mobilevitv2_050", "timm:efficientvit_b0", "timm:levit_128s",  # fx cannot trace these; LeViT caches in forward
    *(m.name for m in HUGGING_FACE),
}


def zoo() -> list[ZooModel]:
    """Every model of the zoo, in table order."""
    import torchvision

    return [
        *(_torchvision(name) for name in torchvision.models.list_models(module=torchvision.models)),
        *(_timm(name) for name in TIMM_MODELS),
        *HUGGING_FACE,
    ]


def _output(model: nn.Module, inputs: tuple | dict) -> torch.Tensor:
    """The model's main output tensor (logits), whatever structure forward returns."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    while not isinstance(out, torch.Tensor):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out


def conform(entry: ZooModel) -> dict:
    """Run the conformance checks on one model; an AssertionError names the one that failed.

    1. ratio 1.0 is lossless: the decompressed file equals the original state dict bit for bit,
       and loads into the architecture with strict=True;
    2. a budget of a fifth of the model gives a file of at most that many bytes;
    3. save -> load gives a model whose outputs equal the saved model's exactly: the file
       regenerates the same weights bit for bit, and in one process the same kernels on the same
       values and input give the same output;
    4. `decompress` gives a plain state dict that loads with strict=True, whose outputs match the
       converted model's to 1e-5 (relative to the output's norm): the weights are the same values,
       only a kernel may sum them in another order for another memory layout.

    Returns the discovery method, the share of the model's bytes compressed, and what stayed dense.
    """
    torch.manual_seed(0)
    model = entry.build().eval()
    inputs = entry.inputs()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RPSWarning)
        lossless_path, small_path = Path(tmp, "lossless.rps.safetensors"), Path(tmp, "small.rps.safetensors")
        lossless = convert(model, ratio=1.0)
        save(lossless, lossless_path)
        rep = report(lossless)
        del lossless
        state, original = decompress(lossless_path), model.state_dict()
        assert state.keys() == original.keys(), "decompress gives other names than the original state dict"
        changed = [k for k in original if not torch.equal(state[k], original[k])]
        assert not changed, f"ratio 1.0 changed {len(changed)} tensors, such as {changed[0]}"
        copy.deepcopy(model).load_state_dict(state, strict=True)
        del state

        budget = rep.original_bytes // 5
        small = convert(model, budget=budget)
        save(small, small_path)
        file_bytes = small_path.stat().st_size
        assert file_bytes <= budget, f"the file takes {file_bytes} bytes, over the budget of {budget}"
        reference = _output(small, inputs)
        del small
        loaded = load(small_path, copy.deepcopy(model)).eval()
        assert torch.equal(_output(loaded, inputs), reference), "save -> load changed the outputs"
        del loaded
        plain = copy.deepcopy(model)
        plain.load_state_dict(decompress(small_path), strict=True)
        error = (_output(plain, inputs) - reference).norm() / reference.norm().clamp_min(1e-12)
        assert error <= 1e-5, f"the decompressed model's outputs differ by {error:.2e} (relative)"
    compressed = sum(w.bytes_before for w in rep.weights if w.compressed)
    dense: dict[str, list] = {}
    for w in rep.weights:
        if not w.compressed:
            names, size = dense.setdefault(w.reason, [[], 0])
            names.append(w.name)
            dense[w.reason][1] = size + w.bytes_before
    return {
        "discovery": rep.discovery,
        "fallback_reason": rep.fallback_reason,
        "original_bytes": rep.original_bytes,
        "compressed_share": compressed / max(rep.original_bytes, 1),
        "dense": {reason: {"names": names, "bytes": size} for reason, (names, size) in dense.items()},
        "budget_file_bytes": file_bytes,
        "warnings": sorted({str(w.message) for w in caught if issubclass(w.category, RPSWarning)}),
    }
