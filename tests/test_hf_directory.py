"""A converted Hugging Face model as a model directory (model.rps.safetensors, config.json and the
tokenizer files), written whole or not at all, read back by load and from_pretrained, from Python
and from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpsconvert import CheckpointError, OutputExistsError, convert, from_pretrained, load, save
from rpsconvert.format import files

transformers = pytest.importorskip("transformers")
RPSCONVERT = Path(sys.executable).parent / "rpsconvert"  # the installed console script
TOKENS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def hugging_face_directory(path: Path) -> Path:
    """A tiny BERT saved as transformers saves it, with a WordPiece tokenizer beside it."""
    tiny_bert().save_pretrained(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return path


def outputs(model):
    with torch.no_grad():
        return model.eval()(TOKENS).last_hidden_state


def test_a_directory_round_trip_gives_identical_outputs(tmp_path):
    converted = convert(tiny_bert(), ratio=0.5)
    written = save(converted, f"{tmp_path}/bert-rps/")
    assert written == tmp_path / "bert-rps"
    assert sorted(os.listdir(written)) == ["README.md", "config.json", "model.rps.safetensors"]
    assert transformers.AutoConfig.from_pretrained(written).architectures == ["BertModel"]
    loaded = from_pretrained(written)  # no architecture recorded by convert(): config.json names it
    assert type(loaded) is transformers.BertModel and not loaded.training
    assert torch.equal(outputs(loaded), outputs(converted))
    assert torch.equal(outputs(load(written)), outputs(converted))


def test_an_existing_empty_directory_is_filled_and_tokenizer_files_are_copied(tmp_path):
    source = hugging_face_directory(tmp_path / "bert")
    (tmp_path / "out").mkdir()
    save(convert(tiny_bert(), ratio=0.5), tmp_path / "out", tokenizer_from=source)
    copied = sorted(set(os.listdir(tmp_path / "out")) - {"README.md", "config.json", "model.rps.safetensors"})
    assert copied and set(copied) <= set(os.listdir(source))
    assert all((tmp_path / "out" / name).read_bytes() == (source / name).read_bytes() for name in copied)


def test_a_model_directory_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    converted = convert(tiny_bert(), ratio=0.5)
    first = save(converted, f"{tmp_path}/out/")
    with pytest.raises(OutputExistsError, match="already exists"):
        save(converted, f"{tmp_path}/out/")
    before = {name: (first / name).read_bytes() for name in os.listdir(first)}

    def full_disk(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save(converted, f"{tmp_path}/out/", overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        save(converted, f"{tmp_path}/new/")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written directory, no temporary one left
    assert {name: (first / name).read_bytes() for name in os.listdir(first)} == before
    assert save(converted, f"{tmp_path}/out/", overwrite=True) == first


def test_a_directory_of_other_files_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"holds files rpsconvert does not write \(notes.txt\)"):
        save(convert(tiny_bert(), ratio=0.5), tmp_path, overwrite=True)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_from_pretrained_reads_directories_only(tmp_path):
    path = save(convert(tiny_bert(), ratio=0.5), tmp_path / "bert.rps.safetensors")
    with pytest.raises(CheckpointError, match="is not a directory"):
        from_pretrained(path)


def test_the_command_line_writes_a_model_directory_that_loads_back(tmp_path):
    source = hugging_face_directory(tmp_path / "bert")
    command = [RPSCONVERT, "bert", "--ratio", "0.5", "-o", "outdir/", "--quiet"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "outdir"
    tokenizer = sorted(name for name in os.listdir(source) if name.startswith(("tokenizer", "vocab", "special")))
    assert sorted(os.listdir(out)) == sorted(["README.md", "config.json", "model.rps.safetensors", *tokenizer])
    assert transformers.AutoTokenizer.from_pretrained(out)("the cat sat")["input_ids"] == [2, 5, 6, 7, 3]
    loaded = from_pretrained(out)
    in_process = convert(transformers.BertModel.from_pretrained(source), ratio=0.5)
    assert torch.allclose(outputs(loaded), outputs(in_process), atol=1e-5)
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "outdir already exists" in again.stderr
    shown = subprocess.run([RPSCONVERT, "info", "outdir", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert json.loads(shown.stdout)["file_bytes"] == (out / "model.rps.safetensors").stat().st_size  # the file's size, not the folder's
