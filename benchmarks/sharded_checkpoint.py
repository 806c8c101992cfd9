"""Saving recovery's state under torchrun: one file from rank 0 (ddp) against every process's shards (fsdp).

    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_checkpoint.py --strategy ddp
    torchrun --standalone --nproc_per_node=2 benchmarks/sharded_checkpoint.py --strategy fsdp

The model of sharded_memory.py (a BERT-base-sized encoder, random weights, float32, converted to
1/8 of its weights' bytes) recovers for 4 steps with held-out data (so the best parameters are in
the state too), saving its state after every step (3 saves). Each process times its saves, samples
its RSS during each (the rise above the RSS when the save began) and, at the end, counts the bytes
of the state on disk: the file under ddp, each file of the last folder under fsdp. Rank 0 prints
every process's figures (docs/benchmarks.md, "Sharded recovery").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from rpsconvert import convert  # noqa: E402
from rpsconvert.quality.recovery import recover  # noqa: E402
from rpsconvert.quality.resume import LATEST, Checkpointer  # noqa: E402
from sharded_memory import Peak, rss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), required=True)
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    teacher = transformers.BertModel(transformers.BertConfig()).eval()
    model = convert(teacher, ratio=1 / 8)
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 30522, (8, 64), generator=generator)} for _ in range(4)]
    saves: list[tuple[float, int]] = []  # seconds, RSS rise
    save = Checkpointer.save

    def timed(self, state):
        peak = Peak()
        peak.start()
        begin, clock = rss(), time.perf_counter()
        save(self, state)
        seconds = time.perf_counter() - clock
        peak.running = False
        peak.join()
        saves.append((seconds, peak.peak - begin))

    Checkpointer.save = timed
    folder = Path(tempfile.gettempdir()) / f"sharded_checkpoint.{args.strategy}"  # the same on every process
    state = folder / ("state" if args.strategy == "fsdp" else "state.pt")
    recover(model, teacher, data, steps=4, lr=1e-4, eval_data=data[:1], eval_every=1, quiet=True, strategy=args.strategy,
            checkpoint=state, checkpoint_every=1)
    dist.barrier()
    if args.strategy == "fsdp":
        last = state / (state / LATEST).read_text()
        files = {f.name: f.stat().st_size for f in sorted(last.iterdir())}
    else:
        files = {state.name: state.stat().st_size}
    seconds = sum(s for s, _ in saves) / len(saves) if saves else 0.0
    rise = max((r for _, r in saves), default=0)
    mine = [dist.get_rank(), len(saves), seconds, rise]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        print(f"{args.strategy}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.0f} M parameters, {dist.get_world_size()} processes")
        for rank, count, mean, top in everyone:
            if count:
                print(f"  rank {rank}: {count} saves, {mean:.2f} s each, RSS rise during a save up to {top / 2**20:.0f} MiB")
            else:
                print(f"  rank {rank}: saves nothing (rank 0 writes the whole state)")
        for name, size in files.items():
            print(f"  {name}: {size / 2**20:.1f} MiB")
        print(f"  on disk: {sum(files.values()) / 2**20:.1f} MiB")
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(folder)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
