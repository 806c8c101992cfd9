"""Converting a model from its safetensors files without loading it (rpsconvert/streaming.py): the
same file, byte for byte, as converting the loaded model, in a fraction of its memory, and one clear
line for a bad input."""

import json
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import torchvision
from typer.testing import CliRunner

from rpsconvert import convert, load
from rpsconvert.cli import app
from rpsconvert.cli.inputs import read_model
from rpsconvert.engine import encoding, plan
from rpsconvert.engine.mapping import RandomFold
from rpsconvert.engine.operator import CompressedWeight, PoolOperator
from rpsconvert.engine.report import slots_used
from rpsconvert.errors import InputError
from rpsconvert.format.architectures import normalize
from rpsconvert.format.checkpoint import encode
from rpsconvert.format.lazy_weights import SafetensorsFiles
from rpsconvert.format.serialized import serialize
from rpsconvert.quality.fidelity import weight_errors
from rpsconvert.streaming import convert_files

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))


def llama_directory(path, dtype=torch.bfloat16, shard="60KB", tied=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, vocab_size=300, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def in_memory(path, **options):
    source = read_model(str(path))
    return convert(source.model, architecture=source.architecture, **options)


@pytest.mark.parametrize("options", [
    {"budget": "60kB"},  # the per-layer mixed plan at ratio 1
    {"budget": "25kB"},  # a shared pool: the plan scores every storage
    {"ratio": 0.3},
    {"ratio": 1.0, "bits": 3},
], ids=["mixed-plan", "shared-pool", "ratio", "int3"])
def test_sharded_bf16_directory_converts_to_the_same_bytes_as_the_loaded_model(tmp_path, options):
    directory = llama_directory(tmp_path / "llama")
    assert (directory / "model.safetensors.index.json").is_file()
    assert encode(convert_files(directory, **options)) == encode(in_memory(directory, **options))


def test_pieces_smaller_than_every_weight_give_the_same_bytes(tmp_path, monkeypatch):
    directory = llama_directory(tmp_path / "llama", dtype=torch.float32, shard="10GB")
    whole = encode(in_memory(directory, budget="30kB"))
    monkeypatch.setattr(encoding, "PIECE", 1000)  # not a multiple of a block: pieces round down to whole blocks
    monkeypatch.setattr(plan, "PIECE", 777)
    assert encode(convert_files(directory, budget="30kB")) == whole


def test_a_tied_fp32_model_streams_and_runs_like_the_loaded_one(tmp_path):
    directory = llama_directory(tmp_path / "tied", dtype=torch.float32, shard="10GB", tied=True)
    streamed, loaded = convert_files(directory, ratio=0.5), in_memory(directory, ratio=0.5)
    assert encode(streamed) == encode(loaded)
    with torch.no_grad():
        torch.testing.assert_close(streamed(TOKENS).logits, loaded(TOKENS).logits, rtol=0, atol=0)  # the same weights, the same ops


def test_a_state_dict_file_with_its_architecture_streams(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    file = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(model.state_dict(), file)
    arch = {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}
    assert encode(convert_files(file, arch=arch, budget="400kB")) == encode(convert(model, budget="400kB", architecture=normalize(arch)))


def test_converting_from_files_holds_less_than_the_model_and_never_more_than_the_bound(tmp_path):
    """Peak memory of a process converting a 117 MB fp32 model at 1/8 of its bytes, beyond what it
    held before: the pool (14.6 MB, one candidate's at a time while the plan weighs them), one weight in
    float64 (16 MB) and the pieces in flight (PIECE cut to 2**18 slots here), within memory_needed
    (what --max-memory is checked against). Loading the model alone would take 117 MB, and
    projecting it whole a float64 pool twice its size more."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                                      num_key_value_heads=8, vocab_size=4000)
    directory = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="40MB")
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    script = textwrap.dedent(f"""
        import resource, warnings
        warnings.simplefilter("ignore")
        from rpsconvert.engine import encoding, plan
        from rpsconvert.streaming import convert_files, memory_needed
        encoding.PIECE = plan.PIECE = 2**18
        bound = memory_needed({str(directory)!r}, budget={size // 8})  # also warms up: imports, discovery's tracer
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        convert_files({str(directory)!r}, budget={size // 8})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, bound)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    grown, bound = int(out[-2]), int(out[-1])
    assert size > 100e6 and grown < 0.75 * size and grown <= bound, (grown, bound)


def test_a_bad_directory_says_what_is_missing(tmp_path):
    directory = llama_directory(tmp_path / "llama")
    shards = sorted(directory.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(InputError, match="lacks the shard model-0000"):
        convert_files(directory, budget="60kB")
    (directory / "model.safetensors.index.json").unlink()
    with pytest.raises(InputError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        convert_files(directory, budget="60kB")


def test_a_truncated_file_is_refused_before_anything_runs(tmp_path):
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.ones(100, 10)}, file)
    file.write_bytes(file.read_bytes()[:-8])
    with pytest.raises(InputError, match="does not fit its .* bytes: truncated or corrupt"):
        SafetensorsFiles.open(file)


def test_a_checkpoint_is_not_taken_for_a_model(tmp_path):
    directory = llama_directory(tmp_path / "llama", dtype=torch.float32, shard="10GB")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "out" / "model.safetensors").write_bytes(encode(convert_files(directory, ratio=0.5)))
    with pytest.raises(InputError, match="already an rpsconvert checkpoint"):
        convert_files(tmp_path / "out", ratio=0.5)


def test_a_conversion_that_would_not_fit_max_memory_is_refused_before_it_starts(tmp_path):
    directory = llama_directory(tmp_path / "llama")
    with pytest.raises(MemoryError, match=r"needs about .* of memory .* more than the 1.00 MB allowed"):
        convert_files(directory, budget="60kB", max_memory=1_000_000)


def test_reads_are_ranges_of_the_tensors_in_their_file_dtype(tmp_path):
    tensors = {"a": torch.randn(7, 5).to(torch.bfloat16), "b": torch.arange(12, dtype=torch.int64).view(3, 4)}
    safetensors.torch.save_file(tensors, tmp_path / "t.safetensors")
    files = SafetensorsFiles.open(tmp_path / "t.safetensors")
    assert torch.equal(files.read("a", 3, 17), tensors["a"].reshape(-1)[3:17])
    assert torch.equal(files.tensor("b"), tensors["b"])


def test_a_serialized_file_is_safetensors_and_the_same_every_time(tmp_path):
    tensors = {"z": torch.randn(3, 4), "a": torch.arange(5, dtype=torch.uint8), "h": torch.randn(2).half(), "s": torch.tensor(7)}
    metadata = {"b": "2", "a": "1"}
    data = bytes(serialize(tensors, metadata))
    assert data == bytes(serialize(dict(reversed(tensors.items())), dict(reversed(metadata.items()))))
    assert len(serialize(tensors, metadata)) == len(data) and int.from_bytes(data[:8], "little") % 8 == 0
    (tmp_path / "f.safetensors").write_bytes(data)
    with safetensors.safe_open(tmp_path / "f.safetensors", framework="pt") as f:
        assert f.metadata() == metadata
        assert all(torch.equal(f.get_tensor(name), tensor) for name, tensor in tensors.items())


def test_the_command_converts_a_directory_into_a_model_directory_that_loads(tmp_path):
    directory = llama_directory(tmp_path / "llama")
    result = CliRunner().invoke(app, [str(directory), "--budget", "60kB", "-o", f"{tmp_path / 'out'}/", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["file_bytes"] <= 60_000 and (tmp_path / "out" / "config.json").is_file()
    # the weight error the command measured against the files is the loaded model's against the loaded original
    measured = weight_errors(load(tmp_path / "out"), read_model(str(directory)).model)["total"]
    assert 0 < report["quality"]["weight error"] == pytest.approx(measured, rel=1e-9)


def test_the_command_refuses_a_run_above_max_memory_in_one_line_and_writes_nothing(tmp_path):
    directory = llama_directory(tmp_path / "llama")
    result = CliRunner().invoke(app, [str(directory), "--budget", "60kB", "--max-memory", "1MB", "-o", str(tmp_path / "out.rps.safetensors")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "more than the 1.00 MB allowed" in result.output
    assert result.output.startswith(f"error: converting {directory} needs about")  # a user's error, not "MemoryError: ..."
    assert not (tmp_path / "out.rps.safetensors").exists()


@pytest.mark.parametrize("flag", ["--recover-steps", "--verify"])
def test_a_run_that_loads_the_files_whole_is_refused_above_max_memory_in_one_line(tmp_path, flag):
    """Recovery and --verify run the original, so the files are loaded whole: the tiny Llama's
    bf16 tensors are 225 kB (twice that, and 53 bytes a slot, to calibrate), above the 100 kB allowed."""
    directory = llama_directory(tmp_path / "llama")
    safetensors.torch.save_file({"input_ids": TOKENS}, tmp_path / "calibration.safetensors")
    extra = ["--calibrate", str(tmp_path / "calibration.safetensors"), flag, "1"] if flag == "--recover-steps" else [flag]
    out = tmp_path / "out.rps.safetensors"
    result = CliRunner().invoke(app, [str(directory), "--budget", "60kB", "--max-memory", "100kB", "-o", str(out), *extra])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: converting {directory} with {flag} needs about") and "more than the 100.00 kB allowed" in result.output
    assert not out.exists()
    allowed = CliRunner().invoke(app, [str(directory), "--budget", "60kB", "--max-memory", "1GB", "-o", str(out), *extra])
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize("slots", [37, 1000, 5000])
def test_the_slots_a_weight_reads_are_counted_without_a_pool_sized_vector(slots):
    for offset, numel in [(0, 50), (30, 170), (990, 1500), (77, 3000), (5, 20000)]:
        operator = PoolOperator(RandomFold(), slots, 1)
        weight = CompressedWeight("w", (numel,), torch.float32, offset, 1.0)
        assert slots_used(operator, weight) == int((operator.counts([weight]) > 0).sum())


@pytest.mark.parametrize("options, stages", [
    # the scales, the per-layer widths (none fit 25kB), every candidate scored, the chosen one encoded
    ({"budget": "25kB"}, 1 + 1 + 9 + 1),
    ({"budget": "60kB"}, 1 + 1 + 8 + 1),
    ({"ratio": 1.0}, 1 + 1),  # lossless: nothing to choose
], ids=["shared-pool", "mixed-plan", "lossless"])
def test_each_stage_reads_the_passes_it_announces(tmp_path, options, stages):
    """on_stage's passes are what a progress display's ETA rests on: each announced stage reads that
    many times the bytes of the first (the layer scales: one pass over the compressed weights)."""
    directory = llama_directory(tmp_path / "llama")
    read: list[list] = []  # [description, passes, bytes read]
    convert_files(directory, on_stage=lambda description, passes: read.append([description, passes, 0]),
                  on_read=lambda count: read[-1].__setitem__(2, read[-1][2] + count), **options)
    assert len(read) == stages and read[0][:2] == ["layer scales", 1]
    one_pass = read[0][2]
    matrices = sum(p.numel() for p in transformers.LlamaForCausalLM.from_pretrained(directory).parameters() if p.dim() > 1)
    assert one_pass == 2 * matrices  # bfloat16: the compressed weights are the model's matrices
    assert all(count == passes * one_pass for _, passes, count in read if passes is not None), read


def test_the_command_shows_each_stage_with_its_bytes_left_and_time_left():
    """The progress line of a conversion from files: the first stage (one pass) teaches the bytes
    of a pass, so a later stage of 2 passes knows its total, and the time left at its rate."""
    from rpsconvert.cli.app import _Reads

    shown: list[str] = []
    clock = iter([0.0, 0.0, 10.0, 10.0, 15.0, 25.0, 25.0, 30.0])  # each time the line asks
    reads = _Reads(shown.append, clock=lambda: next(clock))
    reads.on_stage("layer scales", 1)
    reads.on_read(1000)  # 1 kB in 10 s: a pass is 1000 bytes
    reads.on_stage("scoring candidate 1 of 2: float32", 2)
    reads.on_read(500)  # 500 B in 5 s of the stage's 2000: 15 s left
    reads.on_read(500)  # 1000 B in 15 s, 1000 left: 15 s left
    reads.on_stage("choosing each layer's width", None)
    reads.on_read(100)
    assert shown == [
        "layer scales",
        "layer scales, 1.00 kB read (100 B/s)",
        "scoring candidate 1 of 2: float32",
        "scoring candidate 1 of 2: float32, 500 B of 2.00 kB read (100 B/s, 15 s left)",
        "scoring candidate 1 of 2: float32, 1.00 kB of 2.00 kB read (66 B/s, 15 s left)",
        "choosing each layer's width",
        "choosing each layer's width, 100 B read (20 B/s)",
    ]
