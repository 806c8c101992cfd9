"""Memory per process of recover() under torchrun: DDP against FSDP (docs/benchmarks.md, "Sharded recovery").

    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_memory.py --strategy ddp
    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_memory.py --strategy fsdp

Every process builds a BERT-base-sized encoder (random weights, float32: transformers' BertConfig
defaults), converts it to 1/8 of its weights' bytes and recovers it for a few steps on random
tokens. A thread samples the process's resident memory (RSS, /proc) every 2 ms while recover()
runs; rank 0 prints every process's RSS when recover() starts (both models whole, as the caller
built them), its peak up to the last optimizer step (training), its peak including the end of
recover() (where FSDP gathers both models back whole into the caller's), and the bytes of the tensors
the process holds for training (parameters, gradients and Adam's moments, counted at the last
step: the process's share of a sharded tensor, the whole of a replicated one).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from rpsconvert import convert  # noqa: E402
from rpsconvert.quality.recovery import recover  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak(threading.Thread):
    """The highest RSS seen while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)


def local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=1 / 8)
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    teacher = transformers.BertModel(transformers.BertConfig()).eval()
    model = convert(teacher, ratio=args.ratio)
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 30522, (8, 64), generator=generator)} for _ in range(args.steps)]
    held = {}

    def count(optimizer, *_):  # the training tensors, and the peak so far, at the last step
        held["peak"] = peak.peak
        held["bytes"] = sum(
            local_bytes(p) + local_bytes(p.grad) + sum(local_bytes(s) for s in optimizer.state[p].values() if torch.is_tensor(s) and s.dim())
            for group in optimizer.param_groups for p in group["params"]
        )

    start = rss()
    peak = Peak()
    peak.start()
    handle = register_optimizer_step_post_hook(count)
    recover(model, teacher, data, steps=args.steps, lr=1e-4, quiet=True, strategy=args.strategy)
    peak.running = False
    peak.join()
    handle.remove()
    row = torch.tensor([start, held["peak"], held["bytes"], peak.peak], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    if dist.get_rank() == 0:
        print(f"{args.strategy}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.0f} M parameters, {dist.get_world_size()} processes")
        for rank, (begin, top, tensors, end) in enumerate(r.tolist() for r in rows):
            print(f"  rank {rank}: RSS at start {begin / 2**20:.0f} MiB, peak in training {top / 2**20:.0f} MiB "
                  f"(+{(top - begin) / 2**20:.0f}), with the models gathered back {end / 2**20:.0f} MiB, "
                  f"training tensors {tensors / 2**20:.0f} MiB")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
