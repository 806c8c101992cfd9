"""Memory per process of recover() under torchrun: DDP against FSDP (docs/benchmarks.md, "Sharded recovery"),
the pool replicated against sharded, and the teacher built whole against read into its shards from
its files (docs/recovery.md).

    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_memory.py --strategy ddp
    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_memory.py --strategy fsdp
    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_memory.py --strategy fsdp --pool sharded --ratio 0.5 --steps 5

    python benchmarks/sharded_memory.py --write DIR        # the model as a Hugging Face directory, once
    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_memory.py --strategy fsdp --from DIR
    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_memory.py --strategy fsdp --from DIR --lazy

Every process builds a BERT-base-sized encoder (random weights, float32: transformers' BertConfig
defaults), converts it to 1/8 of its weights' bytes and recovers it for a few steps on random
tokens. A thread samples the process's resident memory (RSS, /proc) every 2 ms while recover()
runs; rank 0 prints every process's RSS when recover() starts (both models whole, as the caller
built them), its peak up to the last optimizer step (training), its peak including the end of
recover() (where FSDP gathers both models back whole into the caller's), and the bytes of the tensors
the process holds for training (parameters, gradients and Adam's moments, counted at the last
step: the process's share of a sharded tensor, the whole of a replicated one), and the mean
seconds of the optimizer steps after the first (which also initializes FSDP and the pool's
gradient scaling). `--pool` is recover's shard_pool: "auto" (its rule), "replicated" or "sharded".

With `--from DIR` the model is read from the directory `--write` made: by default loaded whole
(from_pretrained) and converted, as a caller does today; with `--lazy` the student is converted
from the files (convert_files) and the teacher given to recover as the directory, so that each
process reads only its shares of it and no process builds it whole. Rank 0 then also prints each
process's peak RSS over its whole life (getrusage), before recover() and in all.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from rpsconvert import convert  # noqa: E402
from rpsconvert.format.lazy_weights import SafetensorsFiles  # noqa: E402
from rpsconvert.quality.recovery import recover  # noqa: E402
from rpsconvert.streaming import convert_files  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
SHARD_POOL = {"auto": "auto", "replicated": False, "sharded": True}  # --pool: recover's shard_pool


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


def lifetime_peak() -> int:
    """The process's peak RSS so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=("ddp", "fsdp"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=1 / 8)
    parser.add_argument("--write", type=Path, help="write the model to this directory and stop (no torchrun)")
    parser.add_argument("--from", dest="directory", type=Path, help="read the model from the directory --write made")
    parser.add_argument("--lazy", action="store_true", help="with --from: the teacher read into its shards (strategy fsdp)")
    parser.add_argument("--pool", choices=tuple(SHARD_POOL), default="auto", help="with --strategy fsdp: the pool replicated or sharded (recover's shard_pool)")
    args = parser.parse_args()
    if not (args.write or args.strategy):
        parser.error("pass --strategy (under torchrun), or --write DIR")
    if args.lazy and not (args.directory and args.strategy == "fsdp"):
        parser.error("--lazy reads the teacher into its shards: pass --strategy fsdp --from DIR")
    if args.pool != "auto" and args.strategy != "fsdp":
        parser.error("--pool chooses how strategy fsdp holds the pool: pass --strategy fsdp")
    import transformers

    torch.set_num_threads(1)
    if args.write:
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig()).save_pretrained(args.write)
        return
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    if args.lazy:
        model, teacher = convert_files(args.directory, ratio=args.ratio), args.directory
    else:
        teacher = (transformers.BertModel.from_pretrained(args.directory) if args.directory else transformers.BertModel(transformers.BertConfig())).eval()
        model = convert(teacher, ratio=args.ratio)
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 30522, (8, 64), generator=generator)} for _ in range(args.steps)]
    held = {}
    steps: list[float] = []  # when each optimizer step ended

    def count(optimizer, *_):  # the training tensors, and the peak so far, at the last step
        steps.append(time.perf_counter())
        held["peak"] = peak.peak
        held["bytes"] = sum(
            local_bytes(p) + local_bytes(p.grad) + sum(local_bytes(s) for s in optimizer.state[p].values() if torch.is_tensor(s) and s.dim())
            for group in optimizer.param_groups for p in group["params"]
        )

    start, before = rss(), lifetime_peak()
    peak = Peak()
    peak.start()
    handle = register_optimizer_step_post_hook(count)
    options = {"shard_pool": SHARD_POOL[args.pool]} if args.strategy == "fsdp" else {}
    history = recover(model, teacher, data, steps=args.steps, lr=1e-4, quiet=True, strategy=args.strategy, **options)
    peak.running = False
    peak.join()
    handle.remove()
    step_seconds = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
    row = torch.tensor([start, held["peak"], held["bytes"], peak.peak, before, lifetime_peak(), step_seconds], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    if dist.get_rank() == 0:
        teacher_from = "" if args.directory is None else f", teacher {'read into its shards' if args.lazy else 'loaded whole'} from {args.directory}"
        whole = (e.numel for e in SafetensorsFiles.open(args.directory).entries.values()) if args.lazy else (p.numel() for p in teacher.parameters())
        pool = "" if history.pool_sharded is None else f", the pool {'sharded' if history.pool_sharded else 'replicated'}"
        print(f"{args.strategy}: {sum(whole) / 1e6:.0f} M parameters, {dist.get_world_size()} processes{teacher_from}, ratio {args.ratio:g}{pool}")
        for rank, (begin, top, tensors, end, first, life, seconds) in enumerate(r.tolist() for r in rows):
            print(f"  rank {rank}: RSS at start {begin / 2**20:.0f} MiB, peak in training {top / 2**20:.0f} MiB "
                  f"(+{(top - begin) / 2**20:.0f}), with the models gathered back {end / 2**20:.0f} MiB, "
                  f"training tensors {tensors / 2**20:.0f} MiB, peak before recover {first / 2**20:.0f} MiB, in all {life / 2**20:.0f} MiB, "
                  f"{seconds:.2f} s a step")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
