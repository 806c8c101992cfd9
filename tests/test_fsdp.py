"""recover(strategy="fsdp"): FSDP2-sharded recovery gives the single-process result (quality/sharding.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpsconvert import convert
from rpsconvert.quality.recovery import recover

HERE = Path(__file__).resolve().parent


def _torchrun(out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE / "fsdp_recover.py"), str(out), *args]
    run = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"torchrun exited with {run.returncode}:\n{run.stderr[-4000:]}"
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("bits, auto", [(None, False), (8, True)], ids=["float32 pool", "8-bit pool, lr auto, hidden"])
def test_two_sharded_processes_give_the_single_process_result(tmp_path, bits, auto):
    """gloo, 2 processes, each holding half of every dense tensor and the whole (replicated) pool:
    the losses, the gradients and the recovered model equal one process's run on the same global
    batches (the 8-bit pool trains straight-through, as in one process; lr="auto"'s trials and
    the blocks' outputs, hooked on the sharded blocks, too)."""
    from fsdp_recover import Stack, case

    sharded = _torchrun(tmp_path / "fsdp.pt", *([] if bits is None else [str(bits)]), *(["auto"] if auto else []))
    model, teacher, history, first, _ = case("ddp", bits, auto)  # one process: no DDP, no FSDP

    # The same optimization up to float rounding: each process sums its half of the batch and the
    # halves are averaged, where one process sums the whole (measured 2e-6 relative on the loss,
    # 1e-7 on the gradients, 2e-7 on the parameters; lr="auto" tried the same rates).
    assert sharded["loss"] == pytest.approx(history.loss, rel=1e-4)
    assert sharded["after"] == pytest.approx(history.after.relative_error, rel=1e-4)
    assert sharded["best_step"] == history.best_step
    assert [rate for rate, _ in sharded["lr_probe"]] == [rate for rate, _ in history.lr_probe]
    assert [value for _, value in sharded["lr_probe"]] == pytest.approx([value for _, value in history.lr_probe], rel=1e-4)
    # The gradients the optimizer stepped on, not multiplied by the world size (the known gloo
    # averaging slip); Adam's updates are blind to a gradient's scale, so the losses alone would
    # not show it. The first one is the pool's: replicated and averaged by sharding.py.
    assert len(sharded["grads"]) == len(first)
    for ours, single in zip(sharded["grads"], first):
        assert (ours - single).norm() <= 1e-5 * single.norm()
    # each process held the whole pool's gradient, and half of every other one
    assert sharded["held"][0] == first[0].numel()
    assert all(2 * held == grad.numel() for held, grad in zip(sharded["held"][1:], first[1:]))
    # The recovered model, gathered whole on rank 0, is the single-process one; 1e-4 leaves room
    # for Adam's division by sqrt(v), which makes a rounding-level difference in a near-zero
    # gradient a visible step (measured 2e-7 after 10 steps). The pool did move, by far more.
    torch.manual_seed(0)
    start = convert(Stack().eval(), ratio=1 / 4, bits=bits).state_dict()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert (sharded["state"][name] - tensor).norm() <= 1e-4 * tensor.norm().clamp(min=1e-12), name
        else:
            assert torch.equal(sharded["state"][name], tensor), name  # a packed pool's codes
    moved = next(name for name in ("rps_pool", "rps_pool_packed") if start[name].numel())
    assert not torch.equal(sharded["state"][moved], start[moved])
    # the teacher comes back whole and untouched
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(sharded["teacher"][name], tensor), name


def test_fsdp_needs_torchrun_and_refuses_checkpoints_and_unknown_strategies(tmp_path):
    from fsdp_recover import Stack, data

    teacher = Stack().eval()
    model = convert(teacher, ratio=1 / 4)
    with pytest.raises(ValueError, match="torchrun"):
        recover(model, teacher, data("train"), steps=1, lr=1e-3, quiet=True, strategy="fsdp")
    with pytest.raises(ValueError, match="does not checkpoint"):
        recover(model, teacher, data("train"), steps=1, lr=1e-3, quiet=True, strategy="fsdp", checkpoint=tmp_path / "run.pt")
    with pytest.raises(ValueError, match="unknown strategy"):
        recover(model, teacher, data("train"), steps=1, lr=1e-3, quiet=True, strategy="zero")
