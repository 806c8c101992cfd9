"""recover(strategy="fsdp") under torchrun: `torchrun --standalone --nproc_per_node=2 tests/fsdp_recover.py OUT.pt [BITS [auto]] [pool] [resume | lazy]`.

Every process builds the same converted model and teacher and passes the same global batches;
recover() shards both models with FSDP2 (per block and on the root; the pool replicated, or with
`pool` sharded with the root: shard_pool=True) and rank 0 saves the recovered state, the loss curve and the gradients of the first optimizer step (and how much of each it held), for the
test to compare with a single-process run of the same case (`case(strategy="ddp")`).

With `resume`, the processes also run the case killed after INTERRUPT_AFTER batches while saving
a sharded checkpoint every 3 steps (beside OUT.pt), then resume it: rank 0 saves both runs, the
name of the folder the checkpoint held when the run was killed, and what the checkpoint's
directory held.

With `lazy`, the processes run each case twice, the teacher given as a model and as its
safetensors files (quality/sharding.py's shard_files): the Stack (a state dict and its skeleton
on the meta device) and a tiny Llama (a Hugging Face directory of shards, its student converted
from the files too, so no process ever builds it whole); rank 0 saves both runs of each and every
process's elements of each teacher parameter read from the files.
"""

import sys
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
import torch.nn.functional as F
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from rpsconvert import convert  # noqa: E402
from rpsconvert.cli.inputs import read_model  # noqa: E402
from rpsconvert.quality import sharding  # noqa: E402
from rpsconvert.quality.recovery import TeacherFiles, recover  # noqa: E402
from rpsconvert.streaming import convert_files  # noqa: E402
from interrupted import Interrupted  # noqa: E402

STEPS = 10
INTERRUPT_AFTER = 9  # batches: lr="auto"'s trials train on 3, then the run's skip of those 3 and 3 more steps


class Block(nn.Module):
    """A pre-norm residual MLP block: what fully_shard wraps one at a time."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    """An input layer, a chain of 3 repeated blocks and a classifier head (tied to nothing)."""

    def __init__(self, inputs: int = 16, width: int = 32, depth: int = 3, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def data(part: str) -> list[torch.Tensor]:
    """Batches of 32 random inputs (16 per process), the same on every process."""
    generator = torch.Generator().manual_seed({"train": 1, "heldout": 2}[part])
    return list(torch.randn(96 if part == "train" else 64, 16, generator=generator).split(32))


def case(strategy: str, bits: int | None = None, auto: bool = False, train: list | None = None, teacher_file: Path | None = None, **options):
    """The converted Stack (1/4 of its weights' bytes, a `bits`-bit pool or float32), its
    original, a recovery run (`auto`: lr="auto" and the blocks' outputs distilled too; on `train`,
    by default data("train"); with `teacher_file`, the teacher given to recover as that
    safetensors state dict and a skeleton; `options` go to recover), the gradients of the run's
    first optimizer step (whole) and the elements of each that this process held."""
    torch.manual_seed(0)
    teacher = Stack().eval()
    model = convert(teacher, ratio=1 / 4, bits=bits)
    given = teacher
    if teacher_file is not None:
        if torch.distributed.get_rank() == 0:
            safetensors.torch.save_file(teacher.state_dict(), teacher_file)
        torch.distributed.barrier()
        with torch.device("meta"):
            given = TeacherFiles(teacher_file, skeleton=Stack())
    first: list[torch.Tensor] = []
    held: list[int] = []  # the elements of each gradient this process held (a share, when sharded)

    def record(optimizer, args, kwargs):  # after the step: the gradients the step used
        if not first:
            for param in optimizer.param_groups[0]["params"]:
                grad = param.grad
                held.append((grad.to_local() if hasattr(grad, "to_local") else grad).numel())
                first.append((grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone())

    handle = register_optimizer_step_post_hook(record)
    try:
        history = recover(
            model, given, data("train") if train is None else train, steps=STEPS, lr="auto" if auto else 1e-3,
            eval_data=data("heldout"), eval_every=5, hidden=auto, quiet=True, strategy=strategy, **options,
        )
    finally:
        handle.remove()
    return model, teacher, history, first, held


def _summary(model, history) -> dict:
    return {"state": model.state_dict(), "loss": history.loss, "lr": history.lr, "after": history.after.relative_error,
            "best_step": history.best_step, "lr_probe": history.lr_probe, "probe_steps": history.probe_steps}


def llama_directory(path: Path) -> Path:
    """A tiny Llama (random weights, float32, its embeddings tied to its head) in shards of at
    most 60 KB with their index; an odd vocabulary, so the processes' shares of the embedding
    differ (150 and 149 rows)."""
    import transformers

    if torch.distributed.get_rank() == 0:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=32, vocab_size=299, tie_word_embeddings=True)
        transformers.LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    torch.distributed.barrier()
    return path


def llama_case(directory: Path, lazy: bool):
    """The tiny Llama converted to 1/4 and recovered for STEPS steps on random tokens; `lazy`: the
    student converted from the files (convert_files) and the teacher given as its directory."""
    if lazy:
        model, teacher = convert_files(directory, ratio=1 / 4), directory
    else:
        source = read_model(str(directory))
        model, teacher = convert(source.model, architecture=source.architecture, ratio=1 / 4), source.model
    generator = torch.Generator().manual_seed(3)
    tokens = [{"input_ids": torch.randint(0, 299, (4, 8), generator=generator)} for _ in range(5)]
    history = recover(model, teacher, tokens[:3], steps=STEPS, lr=1e-3, eval_data=tokens[3:], eval_every=5, quiet=True, strategy="fsdp")
    return model, history


def read_shares(run):
    """`run()`, and this process's elements of every parameter of the teacher read from its files
    (name: (held, whole shape)), as shard_files built it."""
    built = sharding.shard_files
    shares = {}

    def spy(*args, **kwargs):
        twin = built(*args, **kwargs)
        shares.update({name: (p.to_local().numel(), tuple(p.shape)) for name, p in twin.named_parameters()})
        return twin

    sharding.shard_files = spy
    try:
        return run(), shares
    finally:
        sharding.shard_files = built


def gathered(shares: dict) -> list[dict]:
    """Every process's `shares`, in rank order."""
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, shares)
    return every


def main(out: str, bits: int | None, auto: bool, pool: bool, resume: bool, lazy: bool) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    fsdp = partial(case, "fsdp", bits, auto, shard_pool=pool)
    if lazy:
        folder = Path(out).parent
        eager = fsdp()
        (files, _, history, _, _), stack = read_shares(lambda: fsdp(teacher_file=folder / "stack.safetensors"))
        directory = llama_directory(folder / "llama")
        llama_eager = llama_case(directory, lazy=False)
        llama_lazy, llama = read_shares(lambda: llama_case(directory, lazy=True))
        result = {
            "stack": {"eager": _summary(eager[0], eager[2]), "lazy": _summary(files, history), "shares": gathered(stack)},
            "llama": {"eager": _summary(*llama_eager), "lazy": _summary(*llama_lazy), "shares": gathered(llama)},
        }
    else:
        model, teacher, history, first, held = fsdp()
        result = {**_summary(model, history), "teacher": teacher.state_dict(), "grads": first, "held": held, "pool_sharded": history.pool_sharded}
    if resume:
        state = Path(out).with_suffix(".recovery")
        try:
            fsdp(train=Interrupted(data("train"), INTERRUPT_AFTER), checkpoint=state, checkpoint_every=3)
        except KeyboardInterrupt:
            torch.distributed.barrier()  # rank 0 has committed its last save: a new job would start after the kill
            result["killed_at"] = (state / "latest").read_text()
        again, _, resumed, _, _ = fsdp(checkpoint=state, checkpoint_every=3, resume=True)
        result["resumed"] = _summary(again, resumed)
        result["files"] = sorted(str(f.relative_to(state)) for f in state.rglob("*"))
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)
    sharding.final_barrier()  # as ddp_recover.py: both ranks tear gloo down together
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    words = sys.argv[2:]
    bits = int(words.pop(0)) if words and words[0].isdigit() else None
    main(sys.argv[1], bits, "auto" in words, "pool" in words, "resume" in words, "lazy" in words)
