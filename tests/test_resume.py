"""Resumable recovery: an interrupted run, resumed from its saved state, ends where an uninterrupted
run ends.

Every comparison here is exact, on purpose: the resumed run restores the parameters, Adam's
moments, the schedule and the random generator bit for bit and feeds the same batches in the same
order, in the same process with the same thread count, so it performs the very same floating-point
operations as the uninterrupted run. Any difference at all would mean some state was not saved.
"""

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from digits import batches, digits_data, trained_mlp
from interrupted import Interrupted
from rpsconvert import convert, load, recover
from rpsconvert.cli import app
from rpsconvert.quality.resume import Checkpointer, parse_interval

STEPS = 12


def _recover(data, **kwargs):
    teacher = trained_mlp()
    small = convert(teacher, ratio=0.1, seed=1)
    history = recover(small, teacher, data, steps=STEPS, eval_data=batches("heldout", 100)[:1], eval_every=4, quiet=True, **kwargs)
    return small, history


def test_a_resumed_recovery_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    train = batches("calib", 50)[:5]  # the run goes round them twice: resuming finds its place in the cycle
    state = tmp_path / "state.pt"
    whole, whole_history = _recover(train)
    with pytest.raises(KeyboardInterrupt):
        _recover(Interrupted(train, after=10), checkpoint=state, checkpoint_every=3)  # lr="auto" trials train on 3
    assert torch.load(state, weights_only=True)["step"] == 6  # the last save before the kill
    resumed, history = _recover(train, checkpoint=state, resume=True)
    assert history.loss == whole_history.loss and history.lr == whole_history.lr
    assert history.lr_probe == whole_history.lr_probe and len(history.lr_probe) >= 2  # saved, not tried again
    assert history.best_step == whole_history.best_step and history.after == whole_history.after
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_a_state_of_another_run_and_a_missing_one(tmp_path):
    state = tmp_path / "state.pt"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        _recover(batches("calib", 50), checkpoint=state, resume=True)
    Checkpointer(state).save({"steps": STEPS + 1})
    with pytest.raises(ValueError, match="pass the same steps"):
        _recover(batches("calib", 50), checkpoint=state, resume=True)


@pytest.mark.parametrize("text, expected", [("50", (50, None)), ("90s", (None, 90.0)), ("5min", (None, 300.0)), ("1h", (None, 3600.0))])
def test_checkpoint_intervals_are_steps_or_durations(text, expected):
    assert parse_interval(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "5 days", "min", "0s"])
def test_nonsense_intervals_are_refused(text):
    with pytest.raises(ValueError, match="interval"):
        parse_interval(text)


def test_the_command_resumes_an_interrupted_recovery(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(trained_mlp(), "mlp.pt")
    safetensors.torch.save_file({"x": digits_data()["calib"][0][:100]}, "calib.safetensors")  # small: 3 calibrations
    args = ["mlp.pt", "--ratio", "0.1", "--calibrate", "calib.safetensors", "--recover-steps", str(STEPS), "-q"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "-o", "whole.rps.safetensors"]).exit_code == 0

    save = Checkpointer.save

    def save_then_die(self, state):  # killed right after the first save, as a preempted job would be
        save(self, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    killed = runner.invoke(app, [*args, "--checkpoint-every", "5"])
    assert killed.exit_code == 130 and "rerun the same command with --resume" in killed.stderr
    assert (tmp_path / "mlp.rps.safetensors.recovery.pt").exists() and not (tmp_path / "mlp.rps.safetensors").exists()
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = runner.invoke(app, [*args, "--checkpoint-every", "5", "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert not (tmp_path / "mlp.rps.safetensors.recovery.pt").exists()  # done: nothing left to resume
    whole, again = load("whole.rps.safetensors", trained_mlp()), load("mlp.rps.safetensors", trained_mlp())
    for (name, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_command_refuses_resume_without_a_saved_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(trained_mlp(), "mlp.pt")
    safetensors.torch.save_file({"x": digits_data()["calib"][0]}, "calib.safetensors")
    result = CliRunner().invoke(app, ["mlp.pt", "--ratio", "0.1", "--calibrate", "calib.safetensors", "--recover-steps", "5", "--resume"])
    assert result.exit_code == 1 and "nothing to resume: mlp.rps.safetensors.recovery.pt does not exist" in result.stderr
