"""A model directory's checkpoint beyond its shard size is written as shards and an index
(format/shards.py): it loads back bit for bit, its budget counts every byte of every shard and of
the index, a bad or incomplete set of shards is one clear line, and the same model gives the same
bytes, sharded or not."""

import json
import os

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rpsconvert import CheckpointError, convert, decompress, load, save
from rpsconvert.cli import app
from rpsconvert.format.checkpoint import checkpoint_bytes, read
from rpsconvert.format.manifest import DIGEST_KEY, MANIFEST_KEY
from rpsconvert.format.shards import INDEX_FILE, SHARD_KEY, reserve, shard_name

SHARD = 1000  # bytes: the small models below take several shards (their pool, larger, one of its own)


def many_tensors():
    """Eight layers and their norms: 24 stored tensors, so the index and shard headers are not negligible."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32)) for _ in range(8)))


def fp32_bytes(model: nn.Module) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


def shards_of(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".rps.safetensors"))


def test_a_checkpoint_beyond_the_shard_size_is_cut_into_shards_that_load_back_bit_for_bit(tmp_path):
    converted = convert(many_tensors(), ratio=0.5)
    save(converted, f"{tmp_path}/out/", max_shard_size=SHARD)
    shards = shards_of(tmp_path / "out")
    assert shards == [shard_name(k, len(shards)) for k in range(1, len(shards) + 1)] and len(shards) >= 3
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    stored = read(tmp_path / "out").tensors
    assert set(index["weight_map"].values()) == set(shards) and len(index["weight_map"]) == len(stored) + 1  # and the pool
    for shard in shards:  # every shard within the size, or one tensor larger than it
        held = [name for name, file in index["weight_map"].items() if file == shard]
        assert sum(read_bytes(tmp_path / "out", name) for name in held) <= SHARD or len(held) == 1
    loaded = load(tmp_path / "out", model=many_tensors())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), converted.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(decompress(tmp_path / "out").values(), decompress(save(converted, tmp_path / "one.rps.safetensors")).values()))


def read_bytes(directory, name: str) -> int:
    ckpt = read(directory)
    tensor = ckpt.tensors.get(name, ckpt.pool.tensors.get(name))
    return sum(t.numel() * t.element_size() for t in ckpt.pool.stored().values()) if tensor is None else tensor.numel() * tensor.element_size()


def test_the_manifest_and_digest_are_the_single_files_and_the_same_model_gives_the_same_bytes(tmp_path):
    converted = convert(many_tensors(), ratio=0.5)
    single = read(save(converted, tmp_path / "one.rps.safetensors"))
    for name in ("a", "b"):
        save(converted, f"{tmp_path}/{name}/", max_shard_size=SHARD)
    assert read(tmp_path / "a").manifest == single.manifest
    first = _header(tmp_path / "a" / shard_name(1, len(shards_of(tmp_path / "a"))))["__metadata__"]
    assert first[DIGEST_KEY] == _header(tmp_path / "one.rps.safetensors")["__metadata__"][DIGEST_KEY]
    for file in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def _header(file) -> dict:
    data = file.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def test_a_budget_with_a_shard_size_counts_every_shard_and_the_index(tmp_path):
    model = many_tensors()
    budget = fp32_bytes(model) // 2
    sharded = convert(model, budget=budget, shard_size=SHARD)
    save(sharded, f"{tmp_path}/out/")  # the model's own shard size
    assert len(shards_of(tmp_path / "out")) >= 3
    assert checkpoint_bytes(tmp_path / "out") <= budget
    # without the shard size the same budget fills one file, and its shards would exceed it
    unsharded = convert(model, budget=budget)
    save(unsharded, f"{tmp_path}/over/", max_shard_size=SHARD)
    assert checkpoint_bytes(tmp_path / "over") > budget
    assert checkpoint_bytes(tmp_path / "over") - budget <= reserve(list(read(tmp_path / "over").tensors) + ["rps_pool", "rps_pool.scales"])


def test_a_checkpoint_within_the_shard_size_stays_one_file(tmp_path):
    save(convert(many_tensors(), ratio=0.5), f"{tmp_path}/out/", max_shard_size="1MB")
    assert shards_of(tmp_path / "out") == ["model.rps.safetensors"]


def test_a_lone_or_missing_shard_and_a_corrupt_one_are_one_clear_error(tmp_path):
    save(convert(many_tensors(), ratio=0.5), f"{tmp_path}/out/", max_shard_size=SHARD)
    shards = shards_of(tmp_path / "out")
    with pytest.raises(CheckpointError, match="one shard of a sharded checkpoint: read its directory"):
        read(tmp_path / "out" / shards[1])
    last = tmp_path / "out" / shards[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 1
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its content does not match its sha256"):
        read(tmp_path / "out")
    last.unlink()
    with pytest.raises(CheckpointError, match=f"lacks the shard {shards[-1]} that {INDEX_FILE} names"):
        read(tmp_path / "out")


def test_a_tensor_the_index_places_in_another_shard_is_refused(tmp_path):
    save(convert(many_tensors(), ratio=0.5), f"{tmp_path}/out/", max_shard_size=SHARD)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    name = next(iter(index["weight_map"]))
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    (tmp_path / "out" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"holds {name}, which {INDEX_FILE} places elsewhere"):
        read(tmp_path / "out")


def test_every_shard_names_its_index_and_only_the_first_holds_the_manifest(tmp_path):
    save(convert(many_tensors(), ratio=0.5), f"{tmp_path}/out/", max_shard_size=SHARD)
    headers = [_header(tmp_path / "out" / shard)["__metadata__"] for shard in shards_of(tmp_path / "out")]
    assert all(h[SHARD_KEY] == INDEX_FILE for h in headers)
    assert [MANIFEST_KEY in h for h in headers] == [True] + [False] * (len(headers) - 1)


def test_replacing_a_sharded_directory_leaves_no_old_shard(tmp_path):
    converted = convert(many_tensors(), ratio=0.5)
    save(converted, f"{tmp_path}/out/", max_shard_size=SHARD)
    save(converted, f"{tmp_path}/out/", max_shard_size=2 * SHARD, overwrite=True)
    shards = shards_of(tmp_path / "out")
    assert all(name.endswith(f"-of-{len(shards):05d}.rps.safetensors") for name in shards)
    save(converted, f"{tmp_path}/out/", overwrite=True)  # one file again: index and shards gone
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "model.rps.safetensors"]


def test_shards_need_a_directory(tmp_path):
    with pytest.raises(ValueError, match="shards go into a model directory"):
        save(convert(many_tensors(), ratio=0.5), tmp_path / "one.rps.safetensors", max_shard_size=SHARD)


def test_the_command_streams_a_hugging_face_directory_into_shards_within_its_budget(tmp_path):
    pytest.importorskip("transformers")
    from test_streaming import llama_directory

    directory = llama_directory(tmp_path / "llama")
    result = CliRunner().invoke(app, [str(directory), "--budget", "60kB", "--shard-size", "20kB", "-o", f"{tmp_path / 'out'}/", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["file_bytes"] == checkpoint_bytes(tmp_path / "out") <= 60_000 and len(shards_of(tmp_path / "out")) >= 2
    info = CliRunner().invoke(app, ["info", str(tmp_path / "out"), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["file_bytes"] == report["file_bytes"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["checkpoint"] == INDEX_FILE
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # transformers reads the index itself
    tokens = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, load(tmp_path / "out").eval()(tokens).logits)


def test_the_golden_sharded_directory_is_cut_as_the_spec_says():
    """docs/format.md: tensors in data order (widest dtype first, then by name), a new shard when
    the next tensor would push the data past the shard size (1500 bytes for this file)."""
    from golden import checkpoint

    directory = checkpoint("golden-sharded-v3-randomfold-int4")
    index = json.loads((directory / INDEX_FILE).read_text())
    widths = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1}
    entries = {}  # name -> (element size, data bytes)
    for shard in shards_of(directory):
        data = (directory / shard).read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        header.pop("__metadata__")
        entries.update({name: (widths[e["dtype"]], e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()})
    expected, shard, used = {}, 1, 0
    for name in sorted(entries, key=lambda n: (-entries[n][0], n)):
        size = entries[name][1]
        if used and used + size > 1500:
            shard, used = shard + 1, 0
        expected[name], used = shard, used + size
    count = max(expected.values())
    assert count == 3 and index["weight_map"] == {name: shard_name(k, count) for name, k in expected.items()}
    assert index["metadata"]["total_size"] == sum(size for _, size in entries.values())


def test_an_interrupted_sharded_save_leaves_nothing(tmp_path, monkeypatch):
    from rpsconvert.format import files

    written = []
    real = files._write_synced

    def fail_on_the_second_shard(path, data):
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(files, "_write_synced", fail_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        save(convert(many_tensors(), ratio=0.5), f"{tmp_path}/out/", max_shard_size=SHARD)
    assert written[1].startswith("model-00002") and os.listdir(tmp_path) == []
