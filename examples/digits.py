"""scikit-learn's handwritten digits, offline: the data, models, training and metric shared by the
demo (examples/demo.py), the tests (tests/digits.py) and the quality benchmark (benchmarks/tasks.py).

Import it as `examples.digits` with the repository root on sys.path (tests/conftest.py,
benchmarks/tasks.py and examples/demo.py put it there). It is not part of the rpsconvert package:
scikit-learn is a dev dependency only.

The models are nn.Sequential of torch.nn layers only, so their pickles load through the safe
allowlist (no --trust-pickle), like a user's torchvision model. Everything is seeded: the same seed
gives the same split, weights and accuracy on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
SIZES = {"train": 1000, "calib": 400}  # and the remaining 397 images are "heldout"


@dataclass(frozen=True)
class Part:
    """Some of the digits: images scaled to [0, 1] and their labels."""

    images: torch.Tensor  # (n, 1, 8, 8) float32, for CNNs
    labels: torch.Tensor  # (n,) int64

    @property
    def flat(self) -> torch.Tensor:
        """The images as (n, 64) rows, for MLPs (a view: no copy)."""
        return self.images.flatten(1)

    def __len__(self) -> int:
        return len(self.labels)


@lru_cache(maxsize=1)
def digits_split() -> dict[str, Part]:
    """The 1,797 images in one fixed random order, split into "train" (1,000: fit the dense model),
    "calib" (400: calibrate and recover the converted one) and "heldout" (397: score both).

    Users take the parts they need: the benchmark trains on train + calib and scores on heldout.
    The tensors are shared between callers (cached): do not modify them in place.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    images, labels = images[order], labels[order]
    parts, start = {}, 0
    for name, size in (*SIZES.items(), ("heldout", len(labels) - sum(SIZES.values()))):
        parts[name] = Part(images[start : start + size], labels[start : start + size])
        start += size
    return parts


def digits_cnn(width: int = 16) -> nn.Sequential:
    """Conv 1->width, max-pool to 4x4, conv width->2*width, fc (32*width)->(8*width)->10.

    width=16 (the demo's): 71,754 parameters, 287 kB in fp32; width=32 (the benchmark's): 283,786.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(2 * width * 16, 8 * width), nn.ReLU(),
        nn.Linear(8 * width, 10),
    )  # fmt: skip


def digits_mlp(width: int = 128) -> nn.Sequential:
    """64->width->width->10 on flattened images (Part.flat). width=128 (the tests'): 26,122
    parameters; width=384 (the benchmark's): 176,650."""
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def train(
    build: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """A model from `build()`, initialized and trained from `seed`: Adam on random minibatches of
    (x, y) with cross-entropy. It comes back in eval mode.

    Training runs on one thread: a model this small gains nothing from more, and on a busy machine
    their synchronization made it 70 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = build()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        batches = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            i = torch.randint(0, len(y), (batch_size,), generator=batches)
            loss = F.cross_entropy(model(x[i]), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of `x` that `model` labels as `y` (in [0, 1])."""
    return (model(x).argmax(dim=1) == y).float().mean().item()
