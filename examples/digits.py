"""The built-in example: a small CNN trained on scikit-learn's digits in a few seconds, offline.

The model is an nn.Sequential of torch.nn layers only, so its pickle loads through the safe
allowlist (no --trust-pickle), like a user's torchvision model. Everything is seeded: the same
seed gives the same weights and accuracy on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Digits:
    """scikit-learn's 1,797 8x8 digit images, scaled to [0, 1], in a fixed train/test split."""

    x_train: torch.Tensor  # (1397, 1, 8, 8)
    y_train: torch.Tensor
    x_test: torch.Tensor  # (400, 1, 8, 8)
    y_test: torch.Tensor


def load_digits(test_size: int = 400, seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return Digits(x[train], y[train], x[test], y[test])


def digits_cnn() -> nn.Sequential:
    """Two 3x3 convolutions and two linear layers: 71,754 parameters (287 kB in fp32)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def train_digits_cnn(data: Digits, steps: int = 300, seed: int = 0) -> nn.Sequential:
    """A digits_cnn trained with Adam on minibatches of 128 (about 98 % test accuracy).

    Training runs on one thread: a model this small gains nothing from more, and on a busy machine
    their synchronization made it 70 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = digits_cnn()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        batches = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(data.y_train), (128,), generator=batches)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()
