"""Calibrating a model from its safetensors files, block by block (quality/streaming_calibration.py):
it lowers the error as calibrating the loaded model does, holds one block at a time, spills its
activations to disk beyond its cap with the same result, and undoes itself when it does not help."""

import sys

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from rpsconvert import convert, report
from rpsconvert.cli import app
from rpsconvert.cli.inputs import read_model
from rpsconvert.format.checkpoint import encode
from rpsconvert.quality import streaming_calibration
from rpsconvert.quality.batches import run
from rpsconvert.quality.streaming_calibration import calibrate_files
from rpsconvert.streaming import convert_files

transformers = pytest.importorskip("transformers")
BUDGET = "60kB"  # the tiny Llama's per-layer plan at ratio 1: mixed int4 24% + int3 76%, every weight in slots of its own


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, vocab_size=300)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    return path


def token_batches(count, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 300, (rows, length), generator=g)} for _ in range(count)]


def logit_error(model, original, batches):
    with torch.no_grad():
        errors = [(run(model, b).logits.float() - run(original, b).logits.float()).square().sum() / run(original, b).logits.float().square().sum()
                  for b in batches]
    return float(sum(errors) / len(errors))


def test_calibrating_from_files_lowers_the_held_out_error_near_calibrating_the_loaded_model(llama):
    """Measured: relative logit error 0.093 as converted, 0.079 calibrated from the files, 0.068
    calibrated loaded whole (which also solves the head; from the files it keeps its weight-space
    solution). Margins of 10 % and 25 % stand far above float differences between machines."""
    batches, held = token_batches(20, 8, 32, seed=1), token_batches(3, 4, 16, seed=2)
    original = read_model(str(llama)).model.eval()
    converted = convert_files(llama, budget=BUDGET)
    uncalibrated = logit_error(converted, original, held)
    fits = calibrate_files(converted, llama, batches, quiet=True)
    assert len(fits) == 14 and all(f.kept and f.after < f.before for f in fits)  # 7 layers a block, each fitted better
    assert report(converted).notes[-1].startswith("calibration kept")
    streamed = logit_error(converted, original, held)
    whole = logit_error(convert(read_model(str(llama)).model, budget=BUDGET, calibration=batches, quiet=True), original, held)
    assert streamed < 0.9 * uncalibrated
    assert streamed < 1.25 * whole


def test_activations_spilled_to_disk_give_the_same_bytes_and_one_block_is_resident(llama, monkeypatch):
    batches = token_batches(6, 4, 16, seed=3)
    resident, spilled = [], []
    targets, save = streaming_calibration._targets, streaming_calibration.save_file

    def watched_targets(reference, *args):
        blocks = reference.model.layers
        resident.append(sum(any(p.device.type != "meta" for p in block.parameters()) for block in blocks))
        return targets(reference, *args)

    monkeypatch.setattr(streaming_calibration, "_targets", watched_targets)
    monkeypatch.setattr(streaming_calibration, "save_file", lambda tensors, file: (spilled.append(file), save(tensors, file)))
    in_memory = convert_files(llama, budget=BUDGET)
    calibrate_files(in_memory, llama, batches, quiet=True)
    assert not spilled and resident == [1] * 14
    on_disk = convert_files(llama, budget=BUDGET)
    calibrate_files(on_disk, llama, batches, activation_memory=0, quiet=True)
    assert len(spilled) > 0
    assert encode(on_disk) == encode(in_memory)


def test_a_calibration_that_does_not_help_on_held_out_batches_is_undone_to_the_same_bytes(llama):
    """Five batches of 64 tokens overfit: the held-out error of the last block's output rose from
    0.060 to 0.087 (measured), so the pool goes back to the converted bytes."""
    converted = convert_files(llama, budget=BUDGET)
    before = encode(converted)
    fits = calibrate_files(converted, llama, token_batches(5, 4, 16, seed=1), quiet=True)
    assert not any(f.kept for f in fits)
    assert report(converted).notes[-1].startswith("calibration undone")
    assert encode(converted) == before


def test_a_shared_pool_is_refused_with_what_to_do(llama):
    converted = convert_files(llama, ratio=0.3)
    with pytest.raises(ValueError, match="needs every weight in slots of its own .* this pool has 0.3 slots a weight"):
        calibrate_files(converted, llama, token_batches(2, 2, 8, seed=1), quiet=True)


def test_the_command_calibrates_from_the_files_when_the_model_does_not_fit_whole(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["rpsconvert.cli.app"], "whole_load_bytes", lambda *args, **kwargs: 1 << 50)  # a model too large to load
    tokens = torch.cat([b["input_ids"] for b in token_batches(20, 8, 32, seed=1)])
    safetensors.torch.save_file({"input_ids": tokens}, tmp_path / "calibration.safetensors")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(llama), "--budget", BUDGET, "-o", f"{out}/", "--calibrate", str(tmp_path / "calibration.safetensors")])
    assert result.exit_code == 0, result.output
    assert "calibration kept" in result.output, result.output
    shared = CliRunner().invoke(app, [str(llama), "--ratio", "0.3", "-o", f"{tmp_path / 'shared'}/", "--calibrate", str(tmp_path / "calibration.safetensors")])
    assert shared.exit_code == 1 and shared.output.count("\n") == 1, shared.output
    assert "calibrate it loaded whole" in shared.output and not (tmp_path / "shared").exists()
    monkeypatch.setattr(sys.modules["rpsconvert.cli.app"], "memory_needed", lambda *args: 1 << 40)
    refused = CliRunner().invoke(app, [str(llama), "--budget", BUDGET, "-o", f"{tmp_path / 'big'}/", "--calibrate", str(tmp_path / "calibration.safetensors")])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
    assert refused.output.startswith(f"error: calibrating {llama} block by block needs about 1099.51 GB") and not (tmp_path / "big").exists()



def test_rewriting_a_weights_slots_changes_only_the_bytes_of_the_blocks_that_hold_them(llama):
    from rpsconvert.engine.encoding import rewrite
    from rpsconvert.engine.modules import find_pool

    pool = find_pool(convert_files(llama, budget=BUDGET))
    received = {suffix: tensor.clone() for suffix, tensor in pool.stored().items()}
    weight = pool.weights["model.layers.1.mlp.up_proj.weight"]
    pieces = streaming_calibration._pieces(pool, weight)
    for piece in pieces:  # the values a piece holds, encoded again: the same bytes
        rewrite(piece.part, piece.run, piece.first, piece.values)
    assert all(torch.equal(pool.stored()[s], received[s]) for s in received)
    for piece in pieces:
        rewrite(piece.part, piece.run, piece.first, piece.spliced(torch.zeros(weight.numel)))
    with torch.no_grad():
        assert float(pool.weight(weight.name).abs().max()) == 0.0
        others = [name for name in pool.weights if name != weight.name]
        assert all(float(pool.weight(n).abs().sum()) > 0 for n in others)
    changed = (pool.stored()[""] != received[""]).nonzero().squeeze(1)
    codes = pool.stored()[""]
    owned = torch.zeros(len(codes), dtype=torch.bool)
    for piece in pieces:  # the bytes of each piece's slots, within the pool's codes
        start = piece.run[""].storage_offset() - codes.storage_offset()
        codes_per, bytes_per = piece.part.group
        first = start + piece.first // codes_per * bytes_per
        owned[first : first + -(-len(piece.values) // codes_per) * bytes_per] = True
    assert len(changed) > 0 and bool(owned[changed].all())
