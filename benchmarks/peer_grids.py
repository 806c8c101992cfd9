"""Why a peer's grid can beat the plan's at the same bits: the weight error of each grid, per weight.

    python benchmarks/peer_grids.py [--bits 3 4]    # pretrained MobileNetV2; docs/benchmarks.md, "Against the peers"

Every grid rounds the same weights (the ones rpsconvert compresses) in groups of 32 of a row
(peers.as_matrix), to the nearest level: the plan's own symmetric grid (PoolStorage.snap: 2**b - 1
levels around zero, a float16 scale per block, its clipping search), torchao's asymmetric one
(2**b levels from the group's min to its max, a float16 scale and an int8 zero point) and HQQ's
(the same levels, a float16 scale and zero point fitted by its half-quadratic proximal solver),
and one the plan could store at its own bytes: symmetric, but with 2**b levels at half steps
(+-scale/2, +-3 scale/2, ...) and no level at zero.
Each is measured on the weights as they are and with random signs, as a lossless RPS pool stores
them (`W[i] = scale * sign(i) * pool[slot(i)]`), which makes every group symmetric on average.
Printed: bits per weight, the mean over weights of the relative squared error (the plan's
criterion), and how many weights each grid rounds best.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
import peers  # noqa: E402
from pretrained import mobilenet_v2  # noqa: E402
from rpsconvert.engine.storage import PoolStorage  # noqa: E402

GROUP = 32


def plan_grid(bits: int, matrix: torch.Tensor) -> torch.Tensor:
    groups = matrix.reshape(-1, GROUP)
    return PoolStorage(torch.float16, bits=bits, block=GROUP).snap(groups.flatten()).view_as(matrix)


def half_step_grid(bits: int, matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric without a level at zero: 2**b levels (k + 1/2) * scale, k in [-2**(b-1), 2**(b-1) - 1],
    the group's peak on the outermost level, a float16 scale; no clipping search."""
    groups = matrix.reshape(-1, GROUP)
    top = 2 ** (bits - 1)
    scale = (groups.abs().amax(1, keepdim=True) / (top - 0.5)).half().float().clamp(min=1e-12)
    k = (groups / scale).floor().clamp(-top, top - 1)
    return ((k + 0.5) * scale).view_as(matrix)


def torchao_grid(bits: int, matrix: torch.Tensor) -> torch.Tensor:
    return peers.torchao(bits, GROUP)(matrix).weight


def hqq_grid(bits: int, matrix: torch.Tensor) -> torch.Tensor:
    return peers.hqq(bits, GROUP)(matrix).weight


GRIDS = {  # name -> (rounding, bits per weight beyond the codes' b)
    "plan (symmetric, 2^b-1 levels, fp16 scale)": (plan_grid, 16 / GROUP),
    "half steps (symmetric, 2^b levels, no zero level, fp16 scale)": (half_step_grid, 16 / GROUP),
    "torchao (min-max, fp16 scale, int8 zero)": (torchao_grid, 24 / GROUP),
    "HQQ (proximal, fp16 scale and zero)": (hqq_grid, 32 / GROUP),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    teacher = mobilenet_v2()
    params = dict(teacher.named_parameters())
    matrices = [peers.as_matrix(params[n].detach()) for n in baselines.compressed_names(teacher)]
    signs = [torch.randint(0, 2, m.shape, generator=torch.Generator().manual_seed(i)).float() * 2 - 1 for i, m in enumerate(matrices)]
    print(f"MobileNetV2, {len(matrices)} weights, groups of {GROUP}\n")
    print("| b | grid | bits per weight (codes at b bits) | rel. sq. error, as they are | best on (of weights) | with random signs | best on |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for bits in args.bits:
        rows = {}
        for name, (grid, extra) in GRIDS.items():
            for signed in (False, True):
                errors = []
                for m, s in zip(matrices, signs):
                    x = m * s if signed else m
                    errors.append(float((grid(bits, x) - x).square().sum() / x.square().sum()))
                rows[name, signed] = torch.tensor(errors)
        for name, (_, extra) in GRIDS.items():
            cells = []
            for signed in (False, True):
                others = torch.stack([rows[n, signed] for n in GRIDS])
                wins = int((others.argmin(0) == list(GRIDS).index(name)).sum())
                cells += [f"{float(rows[name, signed].mean()):.4g}", f"{wins}/{len(matrices)}"]
            print(f"| {bits} | {name} | {bits + extra:.3g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
