"""Why the plan aligns quantization blocks to rows: one scale for parts of two output channels.

    .venv/bin/python benchmarks/row_alignment.py     # about 3 minutes on one thread; prints a table

Each weight of a pretrained MobileNetV2 (those the pool compresses: 2-D and up, 1,000 elements or
more) is rounded to b-bit codes with a float16 scale per block, then the network runs on 64 crops
of real photos against the original's logits. *flat*: blocks of 32 along the flattened weight at a
random offset, as a pool of one width lays them out (a layer's run starts anywhere); *rows*: each
output channel's row starts a new block (blocks of 32 or 16). No data, no recovery.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrained import Agreement, mobilenet_v2, photo_crops  # noqa: E402
from rpsconvert import PoolStorage  # noqa: E402

LAYOUTS = (("flat", 32), ("rows", 32), ("rows", 16))


def rounded(weight: torch.Tensor, bits: int, block: int, layout: str, shift: int) -> torch.Tensor:
    storage = PoolStorage(torch.float16, bits=bits, block=block)
    if layout == "flat":
        return torch.roll(storage.snap(torch.roll(weight.reshape(-1), shift)), -shift).view_as(weight)
    return torch.stack([storage.snap(row) for row in weight.reshape(weight.shape[0], -1)]).view_as(weight)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, inputs = mobilenet_v2(), photo_crops(64, seed=1)
    with torch.no_grad():
        reference = torch.cat([model(b) for b in inputs.split(32)])
    print("| bits | blocks | top-1 agreement | logit cosine |\n|---|---|---|---|")
    for bits in (8, 7, 6, 4):
        for layout, block in LAYOUTS:
            copied, shifts = copy.deepcopy(model), torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in copied.parameters():
                    if p.ndim >= 2 and p.numel() >= 1000:
                        p.copy_(rounded(p, bits, block, layout, int(torch.randint(0, 1000, (1,), generator=shifts))))
            result = Agreement.measure(copied, reference, inputs)
            print(f"| int{bits} | {layout}, {block} | {result.top1:.3f} | {result.cosine:.4f} |", flush=True)


if __name__ == "__main__":
    main()
