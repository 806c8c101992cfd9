"""The digits classifier of the recovery tests: examples/digits.py's data, MLP and training, seen as
the tests use them (flattened images, parts by name, a cached trained model)."""

from functools import lru_cache

import torch
from torch import nn

from examples import digits as shared
from rpsconvert.quality.batches import split

mlp = shared.digits_mlp  # 64->128->128->10


@lru_cache(maxsize=1)
def digits_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images (flattened, in [0, 1]) and labels of each part: train (1,000) / calib (400) / heldout (397)."""
    return {name: (part.flat, part.labels) for name, part in shared.digits_split().items()}


def batches(part: str, batch_size: int = 100) -> list[torch.Tensor]:
    return split(digits_data()[part][0], batch_size)


@lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    model = shared.train(mlp, *digits_data()["train"])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_mlp() -> nn.Module:
    """A fresh copy of the trained classifier (about 96 % held-out accuracy)."""
    model = mlp()
    model.load_state_dict(_trained_state())
    return model.eval()


def accuracy(model: nn.Module, part: str = "heldout") -> float:
    return shared.accuracy(model, *digits_data()[part])
