"""The quality benchmark: its quick run produces the table and plot, and its byte accounting is right."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import baselines  # noqa: E402
import quality  # noqa: E402


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.slow
def test_quick_run_writes_every_method_into_its_own_section(tmp_path):
    docs, png = tmp_path / "benchmarks.md", tmp_path / "quality.png"
    docs.write_text("# Benchmarks\n\n## Speed\n\nsomeone else's section\n")
    command = [sys.executable, str(BENCHMARKS / "quality.py"), "--quick", "--docs", str(docs), "--plot", str(png)]
    done = subprocess.run(command + ["--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    text = docs.read_text()
    assert "someone else's section" in text
    assert text.count(quality.START) == text.count(quality.END) == 1
    headers = [line for line in text.splitlines() if line.startswith("| budget | bytes |")]
    assert len(headers) == 3  # digits CNN, digits MLP, stdlib LM (--quick leaves MobileNetV2 out)
    for header in headers:
        assert [c.strip() for c in header.strip("|").split("|")][2:] == list(quality.METHODS)
    rows = [line for line in text.splitlines() if line.startswith("| 1/")]
    assert [r.split("|")[1].strip() for r in rows] == list(quality.QUICK_BUDGETS) * 3
    assert all(len(r.strip("|").split("|")) == 2 + len(quality.METHODS) for r in rows)
    assert "n/a: SVD + recovery at 1/1000" in text  # infeasible cells say why
    assert "n/a: int4 at 1/64, 1/1000: int4 needs 4.5/32 of the weight bytes" in text
    assert "The plan's pools: 1/2: " in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_section_replaces_only_its_span(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# Benchmarks\n\nbefore\n\n{quality.START}\nold\n{quality.END}\n\nafter\n")
    quality.write_section(path, "new")
    quality.write_section(path, "newer")
    assert path.read_text() == f"# Benchmarks\n\nbefore\n\n{quality.START}\nnewer\n{quality.END}\n\nafter\n"


def test_sparse_bytes_take_the_cheapest_index():
    # 1,000 of 256 x 1024: values 4,000 + CSR (int16 columns 2,000 + int32 row pointers 1,028)
    assert baselines.sparse_bytes((256, 1024), 1000) == 4000 + 2000 + 4 * 257
    # dense enough for a bitmask: values 3,600 + 1,000 / 8 bits
    assert baselines.sparse_bytes((10, 100), 900) == 3600 + 125
    # too many columns for int16: values + int32 flat index
    assert baselines.sparse_bytes((2, 100_000), 10) == 40 + 40


def test_pruning_bytes_count_values_and_indices():
    model = _mlp()
    names = baselines.compressed_names(model)
    budget = 4 * sum(dict(model.named_parameters())[n].numel() for n in names) // 20
    pruned, size = baselines.prune(model, names, budget)
    kept = [(tuple(w.shape), int((w != 0).sum())) for w in (pruned.get_submodule(n.rpartition(".")[0]).weight for n in names)]
    assert size == sum(baselines.sparse_bytes(shape, k) for shape, k in kept) <= budget
    assert size > 4 * sum(k for _, k in kept)  # the positions are paid for
    assert baselines.prune(model, names, 4) is None


def test_low_rank_bytes_count_both_factors():
    model = _mlp()
    names = baselines.compressed_names(model)
    budget = 20_000
    factored, size = baselines.low_rank(model, names, budget)
    factors = [p for n, p in factored.named_parameters() if n.endswith(("left", "right"))]
    assert size == 4 * sum(p.numel() for p in factors) <= budget
    assert baselines.low_rank(model, names, 100) is None  # rank 1 of every weight does not fit


def test_quantized_bytes():
    model = _mlp()
    names = baselines.compressed_names(model)
    weights = [dict(model.named_parameters())[n] for n in names]
    numel = sum(w.numel() for w in weights)
    assert baselines.fp16(model, names)[1] == 2 * numel
    assert baselines.int8(model, names)[1] == numel + 4 * sum(w.shape[0] for w in weights)  # one scale per row
    # int4: half a byte per weight, one fp16 scale per 32 weights of a row (every row here is a multiple of 32)
    assert baselines.int4(model, names)[1] == numel // 2 + 2 * numel // 32


def test_int4_rounds_each_group_of_a_row_to_its_own_grid():
    torch.manual_seed(0)
    w = torch.randn(3, 40) * torch.tensor([1.0, 10.0, 100.0])[:, None]
    model = nn.Sequential(nn.Linear(40, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    quantized, size = baselines.int4(model, ["0.weight"])
    q = quantized[0].weight.detach()
    assert size == 60 + 2 * 3 * 2  # 120 codes of 4 bits, two groups (32 + 8 weights) a row
    for row, qrow in zip(w, q):
        for group, qgroup in ((row[:32], qrow[:32]), (row[32:], qrow[32:])):
            scale = (group.abs().max() / 7).half().float()
            assert torch.equal(qgroup, (group / scale).round().clamp(-7, 7) * scale)


def test_kept_bytes_count_every_other_tensor_buffers_included():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 8, 8))
    names = ["0.weight", "3.weight"]
    # conv bias, BatchNorm weight, bias, running mean and var (fp32), its int64 batch count, linear bias
    assert baselines.kept_bytes(model, names) == 4 * (64 + 4 * 64 + 10) + 8


def test_small_width_is_the_widest_that_fits():
    def build(width):
        return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

    budget = 20_000
    width = baselines.small_width(build, 128, budget)
    assert baselines.parameter_bytes(build(width)) <= budget < baselines.parameter_bytes(build(width + 1))
    assert width == math.floor((budget / 4 - 10) / (64 + 1 + 10))
    assert baselines.small_width(build, 128, 10) is None
