"""A small classifier trained on scikit-learn's digits (offline, seconds): the subject of recovery tests."""

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from rpsconvert.quality.batches import split


@lru_cache(maxsize=1)
def digits_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images (flattened, in [0, 1]) and labels, split into train / calibration / held-out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return {"train": (x[:1000], y[:1000]), "calib": (x[1000:1400], y[1000:1400]), "heldout": (x[1400:], y[1400:])}


def batches(part: str, batch_size: int = 100) -> list[torch.Tensor]:
    return split(digits_data()[part][0], batch_size)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp()
    x, y = digits_data()["train"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        i = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_mlp() -> nn.Module:
    """A fresh copy of the trained classifier (about 97 % held-out accuracy)."""
    model = mlp()
    model.load_state_dict(_trained_state())
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, part: str = "heldout") -> float:
    x, y = digits_data()[part]
    return (model(x).argmax(-1) == y).float().mean().item()
