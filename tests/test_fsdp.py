"""recover(strategy="fsdp") and `--strategy fsdp`: FSDP2-sharded recovery gives the single-process result and resumes exactly (quality/sharding.py, quality/resume.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from rpsconvert import convert, load
from rpsconvert.cli import app
from rpsconvert.quality.recovery import recover

HERE = Path(__file__).resolve().parent


def _torchrun(out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE / "fsdp_recover.py"), str(out), *args]
    run = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"torchrun exited with {run.returncode}:\n{run.stderr[-4000:]}"
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("pool", [False, True], ids=["replicated", "sharded"])
@pytest.mark.parametrize("bits, auto", [(None, False), (8, True)], ids=["float32 pool", "8-bit pool, lr auto, hidden"])
def test_two_sharded_processes_give_the_single_process_result(tmp_path, bits, auto, pool):
    """gloo, 2 processes, each holding half of every dense tensor and the whole (replicated) pool
    or half of it (sharded with the root, gathered whole once a step): the losses, the gradients
    and the recovered model equal one process's run on the same global batches (the 8-bit pool
    trains straight-through, as in one process; lr="auto"'s trials and the blocks' outputs, hooked
    on the sharded blocks, too)."""
    from fsdp_recover import Stack, case

    words = [*([] if bits is None else [str(bits)]), *(["auto"] if auto else []), *(["pool"] if pool else [])]
    sharded = _torchrun(tmp_path / "fsdp.pt", *words)
    model, teacher, history, first, _ = case("ddp", bits, auto)  # one process: no DDP, no FSDP
    assert sharded["pool_sharded"] is pool and history.pool_sharded is None  # what the run reports

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
    # not show it. The first one is the pool's: averaged by sharding.py when replicated, by FSDP's
    # reduce-scatter when sharded, after STABLE-RPS's per-slot scaling either way.
    assert len(sharded["grads"]) == len(first)
    for ours, single in zip(sharded["grads"], first):
        assert (ours - single).norm() <= 1e-5 * single.norm()
    # each process held the whole pool's gradient (replicated) or half of it (3072 slots: 1536
    # each), and half of every other one
    assert sharded["held"][0] == first[0].numel() // (2 if pool else 1) and first[0].numel() == 3072
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


@pytest.mark.slow
@pytest.mark.parametrize("pool", [False, True], ids=["replicated pool", "sharded pool"])
def test_a_resumed_sharded_recovery_ends_exactly_where_an_uninterrupted_one_does(tmp_path, pool):
    """The 8-bit pool with lr="auto" and hidden=True, replicated or sharded, killed after its 6th
    step on both processes and resumed from the sharded checkpoint (every 3 steps): the same
    losses, rates, trials, best step and every recovered tensor as the uninterrupted sharded run,
    bit for bit, as tests/test_resume.py asks of one process: the same processes redo the same
    arithmetic on the same shares, so any difference would be state the checkpoint lost (a
    sharded pool's Adam moments are each process's half, written by DCP)."""
    run = _torchrun(tmp_path / "fsdp.pt", "8", "auto", *(["pool"] if pool else []), "resume")
    assert run["killed_at"].startswith("step-6-")  # the last save before the kill
    resumed = run["resumed"]
    assert resumed["loss"] == run["loss"] and resumed["lr"] == run["lr"]
    assert resumed["lr_probe"] == run["lr_probe"] and len(run["lr_probe"]) >= 2  # saved, not tried again
    assert resumed["probe_steps"] == run["probe_steps"] > 0
    assert resumed["best_step"] == run["best_step"] and resumed["after"] == run["after"]
    for name, tensor in run["state"].items():
        assert torch.equal(resumed["state"][name], tensor), name
    # the resumed run saved again at 6 (into a new folder: never over the one it resumed from) and
    # at 9; that one is all that is left: `latest`, its folder with each process's shares
    (folder,) = {name.split("/")[0] for name in run["files"]} - {"latest"}
    assert folder.startswith("step-9-")
    assert {name for name in run["files"] if "distcp" in name} == {f"{folder}/__0_0.distcp", f"{folder}/__1_0.distcp"}
    assert {f"{folder}/.metadata", f"{folder}/state.pt"} <= set(run["files"])


@pytest.mark.slow
def test_a_teacher_read_from_its_files_into_its_shards_gives_the_eager_teachers_run(tmp_path):
    """The teacher given to recover(strategy="fsdp") as its safetensors files (the Stack as a
    state dict and its skeleton on the meta device; a tiny Llama as a Hugging Face directory of
    shards with its index, its student converted from the files too) gives the same run as the
    teacher given as a model, bit for bit: every process holds the same values in the same shares
    and does the same arithmetic, so any difference would be a value read from the wrong place.
    Each process read its torch.chunk share of every tensor and no more (half of every Stack
    tensor; the Llama's odd vocabulary of 299 rows cut 150 / 149): 6821 of the Stack's 13642
    elements each, 14096 and 14064 of the Llama's 28160."""
    run = _torchrun(tmp_path / "lazy.pt", "lazy")
    for model in ("stack", "llama"):
        eager, lazy = run[model]["eager"], run[model]["lazy"]
        assert lazy["loss"] == eager["loss"] and lazy["after"] == eager["after"] and lazy["best_step"] == eager["best_step"], model
        assert lazy["state"].keys() == eager["state"].keys()
        for name, tensor in eager["state"].items():
            assert torch.equal(lazy["state"][name], tensor), (model, name)
    for model, each in (("stack", [6821, 6821]), ("llama", [14096, 14064])):  # elements of the teacher's parameters held
        shares = run[model]["shares"]
        for name, (_, shape) in shares[0].items():
            pieces = [piece.numel() for piece in torch.empty(shape, device="meta").chunk(2)]
            assert [held[name][0] for held in shares] == pieces + [0] * (2 - len(pieces)), (model, name)
        assert [sum(n for n, _ in mine.values()) for mine in shares] == each, model  # half each, but for one row of 32
    assert [held["model.embed_tokens.weight"] for held in run["llama"]["shares"]] == [(150 * 32, (299, 32)), (149 * 32, (299, 32))]


def _state(step: int) -> dict:
    return {"step": step, "steps": 10, "model": {"w": torch.arange(4.0) * step}, "optimizer": {"m": torch.ones(2) * step}, "best_state": None, "loss": [0.5] * step}


def _shares() -> dict:
    return {"model": {"w": torch.zeros(4)}, "optimizer": {"m": torch.zeros(2)}}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as recover never runs it
@pytest.mark.parametrize("killed_in", ["the shares", "the commit"])
def test_a_sharded_save_killed_midway_leaves_the_previous_state(tmp_path, monkeypatch, killed_in):
    """A save that fails while DCP writes the shares (before its .metadata) or just before
    `latest` is renamed over (a full disk, a kill): the previous state loads whole, and the next
    save clears what the failure left."""
    import torch.distributed.checkpoint.filesystem as filesystem
    from torch.distributed.checkpoint.api import CheckpointException

    from rpsconvert.quality import resume
    from rpsconvert.quality.resume import Checkpointer

    saver = Checkpointer(tmp_path / "run", sharded=True)
    saver.save(_state(3))
    write = resume._write_atomic

    def killed(*args, **kwargs):
        raise OSError("disk full")

    if killed_in == "the shares":
        monkeypatch.setattr(filesystem.FileSystemWriter, "finish", killed)
    else:
        monkeypatch.setattr(resume, "_write_atomic", lambda path, data: killed() if path.name == "latest" else write(path, data))
    with pytest.raises((OSError, CheckpointException), match="disk full"):  # DCP wraps what its writer raised
        saver.save(_state(6))
    assert len(list((tmp_path / "run").glob("step-*"))) == 2  # the half-written folder is there
    loaded = saver.load(10, _shares())
    assert loaded["step"] == 3 and loaded["loss"] == [0.5] * 3 and loaded["best_state"] is None
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0) * 3) and torch.equal(loaded["optimizer"]["m"], torch.ones(2) * 3)
    monkeypatch.undo()
    saver.save(_state(9))
    assert saver.load(10, _shares())["step"] == 9
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "run").glob("step-*")) == ["9"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_state_is_resumed_only_by_the_strategy_that_wrote_it(tmp_path):
    from rpsconvert.quality.resume import Checkpointer, discard, saved

    Checkpointer(tmp_path / "one.pt").save(_state(3))
    Checkpointer(tmp_path / "sharded", sharded=True).save(_state(3))
    assert saved(tmp_path / "one.pt") and saved(tmp_path / "sharded") and not saved(tmp_path / "none")
    with pytest.raises(ValueError, match="not sharded: resume it with strategy='ddp'"):
        Checkpointer(tmp_path / "one.pt", sharded=True).load(10, _shares())
    with pytest.raises(ValueError, match="sharded recovery: resume it with strategy='fsdp'"):
        Checkpointer(tmp_path / "sharded").load(10)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Checkpointer(tmp_path / "none", sharded=True).load(10, _shares())
    with pytest.raises(ValueError, match="pass the same steps"):
        Checkpointer(tmp_path / "sharded", sharded=True).load(12, _shares())
    discard(tmp_path / "one.pt"), discard(tmp_path / "sharded")
    assert not (tmp_path / "one.pt").exists() and not (tmp_path / "sharded").exists()


def test_fsdp_needs_torchrun_and_unknown_strategies_are_refused():
    from fsdp_recover import Stack, data

    teacher = Stack().eval()
    model = convert(teacher, ratio=1 / 4)
    with pytest.raises(ValueError, match="torchrun"):
        recover(model, teacher, data("train"), steps=1, lr=1e-3, quiet=True, strategy="fsdp")
    with pytest.raises(ValueError, match="unknown strategy"):
        recover(model, teacher, data("train"), steps=1, lr=1e-3, quiet=True, strategy="zero")
    with pytest.raises(ValueError, match="shard_pool must be True, False or 'auto', got 'yes'"):
        recover(model, teacher, data("train"), steps=1, lr=1e-3, quiet=True, strategy="fsdp", shard_pool="yes")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_pool_is_sharded_from_the_threshold_and_the_run_says_so(monkeypatch, capsys):
    """shard_pool="auto" shards a latent pool of at least SHARD_POOL_BYTES and
    replicates a smaller one, True and False force either; RecoveryHistory.pool_sharded and the
    line recover prints say which. In a job of one process, on the Stack's pool (3072 float32
    slots, 12288 bytes), the threshold moved to either side of it."""
    from fsdp_recover import Stack, data

    from rpsconvert.quality import sharding

    assert sharding.SHARD_POOL_BYTES == 64 * 2**20
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        for threshold, choice, sharded in [(12288, "auto", True), (12289, "auto", False), (12289, True, True), (0, False, False)]:
            monkeypatch.setattr(sharding, "SHARD_POOL_BYTES", threshold)
            torch.manual_seed(0)
            teacher = Stack().eval()
            history = recover(convert(teacher, ratio=1 / 4), teacher, data("train"), steps=1, lr=1e-3, strategy="fsdp", shard_pool=choice)
            assert history.pool_sharded is sharded, (threshold, choice)
            said = "sharded over 1 processes, gathered whole once a step" if sharded else "replicated on each of 1 processes, its gradient all-reduced"
            assert f"strategy='fsdp': the pool (3072 slots, 12288 bytes) is {said}" in capsys.readouterr().err
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_teacher_given_as_files_that_do_not_fit_is_one_line(tmp_path):
    """In a job of one process (every share is the whole tensor): a torchvision state dict with
    its architecture is read into the sharded teacher whole, batch-norm statistics (buffers the
    file stores) included. Files are read into shards only under strategy='fsdp'; a skeleton with
    real parameters, a file without one of the teacher's tensors, or with one in another shape,
    or without a buffer the skeleton has only on the meta device, is refused in one line, as is a
    converted checkpoint."""
    from fsdp_recover import Stack, data

    import rpsconvert
    from rpsconvert.errors import InputError
    from rpsconvert.quality.recovery import TeacherFiles
    from rpsconvert.quality.sharding import device_mesh, shard_files

    torchvision = pytest.importorskip("torchvision")
    teacher = Stack().eval()
    with pytest.raises(ValueError, match="a teacher given as its files is read into its shards: pass strategy='fsdp'"):
        recover(convert(teacher, ratio=1 / 4), tmp_path, data("train"), steps=1, lr=1e-3, quiet=True)
    state = teacher.state_dict()
    safetensors.torch.save_file({k: v for k, v in state.items() if k != "head.bias"}, tmp_path / "lacking.safetensors")
    safetensors.torch.save_file({**state, "head.bias": torch.zeros(3)}, tmp_path / "shape.safetensors")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        mesh = device_mesh(torch.device("cpu"))
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18().eval()
        resnet.layer1[0].bn1.running_mean.uniform_()  # statistics that init would not make
        safetensors.torch.save_file(resnet.state_dict(), tmp_path / "resnet18.safetensors")
        read = shard_files(TeacherFiles(tmp_path / "resnet18.safetensors", arch="torchvision:resnet18"), mesh)
        for name, tensor in resnet.state_dict().items():
            value = read.state_dict()[name]
            assert torch.equal(value.full_tensor() if hasattr(value, "full_tensor") else value, tensor), name
        with torch.device("meta"):
            skeleton, bare = Stack(), torchvision.models.resnet18()
        safetensors.torch.save_file({k: v for k, v in resnet.state_dict().items() if k != "bn1.running_mean"}, tmp_path / "stats.safetensors")
        with pytest.raises(InputError, match="does not store the teacher's buffer bn1.running_mean, and the skeleton's is on the meta device"):
            shard_files(TeacherFiles(tmp_path / "stats.safetensors", skeleton=bare), mesh)
        rpsconvert.save(convert(teacher, ratio=1 / 4), tmp_path / "converted.rps.safetensors")
        with pytest.raises(InputError, match="converted.rps.safetensors is an rpsconvert checkpoint: the teacher is the original model"):
            shard_files(TeacherFiles(tmp_path / "converted.rps.safetensors", skeleton=skeleton), mesh)
        with pytest.raises(InputError, match="skeleton must have its parameters on the meta device"):
            shard_files(TeacherFiles(tmp_path / "lacking.safetensors", skeleton=teacher), mesh)
        with pytest.raises(InputError, match="lacking.safetensors does not fit the teacher: it lacks head.bias$"):
            shard_files(TeacherFiles(tmp_path / "lacking.safetensors", skeleton=skeleton), mesh)
        with pytest.raises(InputError, match=r"does not fit the teacher: head.bias has shape \(3,\), the teacher \(10,\)$"):
            shard_files(TeacherFiles(tmp_path / "shape.safetensors", skeleton=skeleton), mesh)
    finally:
        torch.distributed.destroy_process_group()


def _digits_files(folder: Path) -> list[str]:
    """The digits MLP and 100 calibration inputs in `folder`; the command's arguments for them."""
    from digits import digits_data, trained_mlp

    torch.save(trained_mlp(), folder / "mlp.pt")
    safetensors.torch.save_file({"x": digits_data()["calib"][0][:100]}, folder / "calib.safetensors")
    return ["mlp.pt", "--ratio", "0.1", "--calibrate", "calib.safetensors", "--recover-steps", "12", "--recover-lr", "1e-3", "--json", "-q"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, state", [("fsdp", "fsdp.rps.safetensors.recovery"), ("ddp", "ddp.rps.safetensors.recovery.pt")])
def test_the_command_recovers_under_torchrun_as_one_process_does(tmp_path, strategy, state):
    """`torchrun --nproc_per_node 2 -m rpsconvert ... --strategy fsdp` (or ddp; gloo on the CPU,
    saving its state every 5 steps: a directory of shards under fsdp) writes the file one process
    writes, within float rounding (measured 3e-8 in norm under both: the halves of each batch are
    summed apart), from rank 0 alone."""
    from digits import trained_mlp

    args = _digits_files(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # both runs calibrate on one thread: the same pool before recovery
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rpsconvert"]
    sharded = subprocess.run(
        [*torchrun, *args, "--strategy", strategy, "--checkpoint-every", "5", "-o", f"{strategy}.rps.safetensors"], cwd=tmp_path, env=env, timeout=300,
        capture_output=True, text=True,
    )
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    one = subprocess.run([sys.executable, "-m", "rpsconvert", *args, "-o", "one.rps.safetensors"], cwd=tmp_path, env=env, timeout=300, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-4000:]
    report = json.loads(sharded.stdout)  # one report: rank 1 printed nothing
    assert report["output"] == f"{strategy}.rps.safetensors" and not (tmp_path / state).exists()  # done: the state is gone
    ours, single = report["quality"]["after recovery"], json.loads(one.stdout)["quality"]["after recovery"]
    assert ours["relative_error"] == pytest.approx(single["relative_error"], rel=1e-6)
    assert ours["top1_agreement"] == single["top1_agreement"]
    a, b = load(tmp_path / f"{strategy}.rps.safetensors", trained_mlp()).state_dict(), load(tmp_path / "one.rps.safetensors", trained_mlp()).state_dict()
    for name, tensor in b.items():
        assert (a[name] - tensor).norm() <= 1e-6 * tensor.norm(), name


def test_the_command_refuses_fsdp_outside_torchrun_and_work_torchrun_cannot_share(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _digits_files(tmp_path)
    runner = CliRunner()
    outside = runner.invoke(app, [*args, "--strategy", "fsdp"])
    assert outside.exit_code == 1
    assert outside.stderr == "error: --strategy fsdp shards recovery over the processes of a torchrun job: launch the command as torchrun --nproc_per_node N -m rpsconvert ...\n"
    monkeypatch.setattr(torch.distributed, "is_torchelastic_launched", lambda: True)  # as under torchrun, refused before the group forms
    alone = runner.invoke(app, ["mlp.pt", "--ratio", "0.1"])
    assert alone.exit_code == 1 and "under torchrun the processes share one recovery: pass one --budget or --ratio and --recover-steps N" in alone.stderr
    fresh = runner.invoke(app, [*args, "--strategy", "fsdp", "--checkpoint-every", "5", "--resume"])
    assert fresh.exit_code == 1 and "nothing to resume: mlp.rps.safetensors.recovery does not exist" in fresh.stderr
