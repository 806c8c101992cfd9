"""Data-aware projection (convert(..., calibration=batches)) and calibration files."""

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from digits import batches, digits_data, trained_mlp
from rpsconvert import convert, report
from rpsconvert.quality.batches import load_calibration
from rpsconvert.engine.kinds import grouped, kind_of
from rpsconvert.quality.calibration import calibrate
from rpsconvert.quality.fidelity import fidelity
from rpsconvert.engine.modules import find_pool


def test_at_ratio_one_calibration_keeps_the_conversion_lossless():
    model = trained_mlp()
    converted = convert(model, ratio=1.0, calibration=batches("calib"))
    x = torch.cat(batches("heldout"))
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_data_aware_projection_brings_back_what_weight_space_projection_loses():
    model = trained_mlp()
    weight_space = fidelity(convert(model, ratio=1 / 4), model, batches("heldout"))
    data_aware = fidelity(convert(model, ratio=1 / 4, calibration=batches("calib")), model, batches("heldout"))
    assert weight_space.relative_error > 0.95 and weight_space.top1_agreement < 0.7  # measured: 0.98, 62 %
    assert data_aware.relative_error < 0.45 and data_aware.top1_agreement > 0.9  # measured: 0.39, 93 %


def test_layers_are_solved_in_forward_order_each_cutting_its_calibration_error():
    model = trained_mlp()
    converted = convert(model, ratio=1 / 4)
    fits = calibrate(converted, model, batches("calib"), quiet=True)
    assert [f.name for f in fits] == ["0.weight", "2.weight", "4.weight"]
    assert all(f.after < 0.5 * f.before for f in fits)
    assert all(0 < f.iterations <= 50 for f in fits)


def test_only_statistics_of_the_calibration_data_matter_so_memory_does_not_grow_with_it():
    model = trained_mlp()
    once, twice = convert(model, ratio=1 / 4), convert(model, ratio=1 / 4)
    calibrate(once, model, batches("calib"), holdout=0, quiet=True)
    calibrate(twice, model, batches("calib") * 2, holdout=0, quiet=True)  # the same samples twice: same X^T X / ||Y||^2
    torch.testing.assert_close(find_pool(once).pool, find_pool(twice).pool, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2),
        nn.Conv2d(4, 6, (3, 1), groups=2, padding="same"),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(4, 8, 5, groups=4, padding=2, padding_mode="circular"),
    ],
    ids=["conv1d", "strided-dilated", "grouped-same", "reflect", "depthwise-circular"],
)
def test_input_patches_times_the_weight_are_the_convolution(conv):
    x = torch.randn(2, 4, *([9] if isinstance(conv, nn.Conv1d) else [9, 7]))
    with torch.no_grad():
        expected = conv(x) - conv.bias.view(-1, *[1] * (x.ndim - 2))
        p = kind_of(conv).patches(conv, x)  # (rows, groups, d)
        y = torch.einsum("ngd,god->ngo", p, grouped(conv.weight, conv.groups)).reshape(-1, conv.out_channels)
    positions = expected.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    torch.testing.assert_close(y, positions, rtol=1e-5, atol=1e-5)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(64 * 16, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def test_a_cnn_with_grouped_convolutions_is_calibrated():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    weight_space = fidelity(convert(model, ratio=1 / 4, min_numel=200), model, batches("heldout"))
    data_aware = fidelity(convert(model, ratio=1 / 4, min_numel=200, calibration=batches("calib")), model, batches("heldout"))
    assert data_aware.relative_error < 0.6 * weight_space.relative_error


def test_a_transformer_is_calibrated_from_dict_batches():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    tokens = torch.randint(0, 200, (96, 12), generator=torch.Generator().manual_seed(0))
    calib = [{"input_ids": tokens[i : i + 16], "attention_mask": torch.ones(16, 12, dtype=torch.long)} for i in range(0, 64, 16)]
    heldout = [{"input_ids": tokens[64:], "attention_mask": torch.ones(32, 12, dtype=torch.long)}]
    weight_space = convert(model, ratio=1 / 4, min_numel=500)  # found by torch.export: fx cannot trace BERT
    data_aware = convert(model, ratio=1 / 4, min_numel=500, calibration=calib)
    assert report(data_aware).discovery == "export"
    before, after = fidelity(weight_space, model, heldout), fidelity(data_aware, model, heldout)
    assert after.relative_error < 0.7 * before.relative_error


def test_calibration_needs_the_original_as_reference():
    model = trained_mlp()
    with pytest.raises(ValueError, match="original model"):
        convert(model, ratio=1 / 4, inplace=True, calibration=batches("calib"))
    with pytest.raises(ValueError, match="at least one batch"):
        convert(trained_mlp(), ratio=1 / 4, calibration=[])


# Calibration files: what the command line's --calibrate reads


def test_a_safetensors_file_of_named_inputs_gives_dict_batches_split_for_a_heldout_report(tmp_path):
    path = tmp_path / "inputs.safetensors"
    ids = torch.arange(50 * 4).view(50, 4)
    safetensors.torch.save_file({"input_ids": ids, "attention_mask": torch.ones(50, 4, dtype=torch.long)}, str(path))
    calib, heldout = load_calibration(path, holdout=0.2, batch_size=16)
    assert [len(b["input_ids"]) for b in calib] == [16, 16, 8] and [len(b["input_ids"]) for b in heldout] == [10]
    rows = torch.cat([b["input_ids"] for b in calib + heldout])
    assert sorted(rows[:, 0].tolist()) == ids[:, 0].tolist()  # every sample once: disjoint and complete


def test_npy_and_tensor_only_pt_files_are_read(tmp_path):
    x = digits_data()["heldout"][0][:40]
    np.save(tmp_path / "x.npy", x.numpy())
    torch.save((x, x.sum(1)), tmp_path / "x.pt")
    calib, heldout = load_calibration(tmp_path / "x.npy", holdout=0.25)
    assert sum(len(b) for b in calib) == 30 and sum(len(b) for b in heldout) == 10
    calib, _ = load_calibration(tmp_path / "x.pt", holdout=0.25, seed=1)
    assert isinstance(calib[0], tuple) and torch.equal(calib[0][0].sum(1), calib[0][1])  # samples stay paired


class NotATensor:
    pass


def test_files_that_are_not_plain_tensors_are_refused(tmp_path):
    torch.save({"x": NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        load_calibration(tmp_path / "pickle.pt")
    torch.save({"a": torch.zeros(5, 2), "b": torch.zeros(4, 2)}, tmp_path / "ragged.pt")
    with pytest.raises(ValueError, match="number of samples"):
        load_calibration(tmp_path / "ragged.pt")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="safetensors, .npy or .pt"):
        load_calibration(tmp_path / "x.csv")


# Cost linear in depth: a chain of blocks is calibrated block by block


class Block(nn.Module):
    """A residual MLP block that counts its forward calls (those of every copy, in every model)."""

    calls = 0

    def __init__(self, width: int = 16):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x, scale=1.0):
        Block.calls += 1
        return x + scale * self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, depth: int, chained: bool = True):
        super().__init__()
        self.embed, self.blocks, self.head = nn.Linear(64, 16), nn.ModuleList(Block() for _ in range(depth)), nn.Linear(16, 10)
        self.chained = chained

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, scale=0.5) if self.chained else block(h.clone(), scale=0.5)
        return self.head(h)


def _calibrated_stack(depth: int, chained: bool = True, **options) -> tuple[int, list]:
    """(block calls during calibration, fits) of a random Stack of `depth` blocks at ratio 1/4."""
    torch.manual_seed(depth)
    model = Stack(depth, chained).eval()
    converted = convert(model, ratio=1 / 4, min_numel=100)
    Block.calls = 0
    fits = calibrate(converted, model, batches("calib")[:3], quiet=True, holdout=0, **options)  # the solves alone
    return Block.calls, fits


def test_calibration_runs_each_block_a_number_of_times_linear_in_depth():
    calls = {depth: _calibrated_stack(depth, iterations=2)[0] for depth in (2, 4, 8)}  # counts, not fits
    assert calls[4] == 2 * calls[2] and calls[8] == 2 * calls[4]
    # each block: 3 forwards to find the chain (converted, its dense copy, original); per batch, per
    # model, once for each of its 2 layers and once to pass its output on; and the head's full
    # forwards, per batch and model. Re-running the prefix for every layer would be quadratic.
    assert calls[2] == 2 * (3 + 3 * 2 * (2 + 1) + 3 * 2)


def test_a_sequential_of_blocks_below_the_root_is_a_chain_too():
    # as torchvision's CNNs hold their stages (MobileNetV2's features): calls linear in depth
    def calls(depth):
        torch.manual_seed(depth)
        model = nn.Sequential(nn.Linear(64, 16), nn.Sequential(*(Block() for _ in range(depth))), nn.Linear(16, 10)).eval()
        converted = convert(model, ratio=1 / 4, min_numel=100)
        Block.calls = 0
        calibrate(converted, model, batches("calib")[:3], quiet=True, iterations=2)
        return Block.calls

    counts = {depth: calls(depth) for depth in (2, 4, 8)}
    assert counts[4] == 2 * counts[2] and counts[8] == 2 * counts[4]


def test_blocks_solved_from_cached_activations_cut_every_layer_error_as_full_forwards_do():
    _, fits = _calibrated_stack(3)
    _, unchained = _calibrated_stack(3, chained=False)  # a copy between blocks: no chain, full forwards
    assert [f.name for f in fits] == ["embed.weight", *[f"blocks.{i}.{l}.weight" for i in range(3) for l in ("up", "down")], "head.weight"]
    assert [f.name for f in unchained] == [f.name for f in fits]
    assert all(f.after < 0.5 * f.before for f in fits)
    for block, full in zip(fits, unchained):
        assert block.after < full.after + 0.05  # measured: 0.08-0.26 against 0.08-0.30 (on its own inputs)


def _wrecking(monkeypatch, prefix: str) -> None:
    """Make every solve of a layer under `prefix` add noise to its slots: a calibration that hurts."""
    import rpsconvert.quality.calibration as calibration

    solve, solve_alone = calibration._solve, calibration._solve_alone

    def wreck(pool, weight):
        slots = (pool.operator.counts([weight]) > 0).nonzero().squeeze(1)
        if weight.name.startswith(prefix):
            pool.pool.detach()[slots] += 0.5 * torch.randn(len(slots), generator=torch.Generator().manual_seed(0))
        return slots

    def wrecked(pool, weight, *args):  # a layer sharing its slots
        fit, changed = solve(pool, weight, *args)
        return fit, torch.cat([changed, wreck(pool, weight)])

    def wrecked_alone(pool, weight, *args):  # a layer with slots of its own
        fit = solve_alone(pool, weight, *args)
        wreck(pool, weight)
        return fit

    monkeypatch.setattr(calibration, "_solve", wrecked)
    monkeypatch.setattr(calibration, "_solve_alone", wrecked_alone)


@pytest.mark.parametrize("ratio, bits", [(1.0, 4), (1 / 4, None)])
def test_a_calibration_that_raises_the_held_out_loss_is_undone_and_the_pool_stays_as_it_came(monkeypatch, ratio, bits):
    torch.manual_seed(0)
    model = Stack(3).eval()
    converted = convert(model, ratio=ratio, bits=bits, min_numel=100)
    pool = find_pool(converted)
    received = {name: tensor.clone() for name, tensor in pool.stored().items()}
    _wrecking(monkeypatch, "blocks.1.")
    fits = calibrate(converted, model, batches("calib")[:5], quiet=True)  # the 5th is held out
    assert len(fits) == 8 and not any(fit.kept for fit in fits)
    assert all(torch.equal(pool.stored()[name], tensor) for name, tensor in received.items())  # exactly, codes and scales
    assert any(note.startswith("calibration undone: held-out relative output error") for note in report(converted).notes)


def test_a_calibration_that_helps_is_kept_and_says_by_how_much():
    model = trained_mlp()
    converted = convert(model, ratio=1 / 4)
    fits = calibrate(converted, model, batches("calib"), quiet=True)
    assert len(fits) == 3 and all(fit.kept for fit in fits)
    note = next(note for note in report(converted).notes if note.startswith("calibration"))
    before, after = (float(figure.split()[0]) for figure in note.split("error ")[1].split(", "))
    assert note.startswith("calibration kept") and after < 0.5 * before
