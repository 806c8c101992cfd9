"""`--calibrate lines.txt`: a text model calibrated on sentences, tokenized by its own tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rpsconvert.errors import InputError
from rpsconvert.format.checkpoint import read
from rpsconvert.quality.batches import load_calibration, tokenize_lines

transformers = pytest.importorskip("transformers")

RPSCONVERT = Path(sys.executable).parent / "rpsconvert"  # the installed console script
WORDS = "the a cat dog sat ran on under mat big small red blue and quickly home".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer(tmp_path: Path):
    """A BERT word-piece tokenizer over a vocabulary of 21 tokens, built offline."""
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    return transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"))


def bert_directory(tmp_path: Path, with_tokenizer: bool = True) -> Path:
    """A tiny BertModel saved as a Hugging Face directory, with its tokenizer files or without."""
    config = transformers.BertConfig(vocab_size=len(SPECIAL + WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    directory = tmp_path / ("tiny-bert" if with_tokenizer else "bare-bert")
    transformers.BertModel(config).eval().save_pretrained(directory)
    if with_tokenizer:
        tokenizer(tmp_path).save_pretrained(directory)
    return directory


def sentences(n: int, seed: int = 0) -> list[str]:
    """n lines of 2 to 20 words (the longest beyond the model's 16 positions: truncation is needed)."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(2, 21, (1,), generator=g)),), generator=g))
            for _ in range(n)]


def rpsconvert(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([RPSCONVERT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_a_text_file_becomes_tokenized_batches_each_cut_to_its_longest_line(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(sentences(50)) + "\n\n   \n", encoding="utf-8")  # blank lines are not examples
    calibration, heldout = load_calibration(lines, holdout=0.2, batch_size=16, tokenizer=tokenizer(tmp_path), max_length=12)
    assert [b["input_ids"].shape[0] for b in calibration] == [16, 16, 8] and [b["input_ids"].shape[0] for b in heldout] == [10]
    for batch in calibration + heldout:
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
        assert len({t.shape for t in batch.values()}) == 1 and batch["input_ids"].shape[1] <= 12  # truncated
        assert batch["attention_mask"][:, -1].any()  # no column that is padding in every row
        assert torch.equal(batch["input_ids"][:, 0], torch.full_like(batch["input_ids"][:, 0], SPECIAL.index("[CLS]")))
        assert (batch["input_ids"][batch["attention_mask"].bool()] != SPECIAL.index("[UNK]")).all()  # every word is known
    every = tokenize_lines(lines, tokenizer(tmp_path), max_length=12)
    assert every["input_ids"].shape == (50, 12)  # padded to the longest line, before the split


def test_a_tokenizer_without_a_padding_token_pads_with_its_end_of_text_token_and_is_left_as_it_was(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat\nthe cat sat\n", encoding="utf-8")
    gpt2_like = tokenizer(tmp_path)
    gpt2_like.pad_token, gpt2_like.eos_token = None, "[SEP]"
    encoded = tokenize_lines(lines, gpt2_like)
    assert encoded["input_ids"][0].tolist() == [2, 5, 7, 3, 3] and encoded["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    assert gpt2_like.pad_token is None
    gpt2_like.eos_token = None
    with pytest.raises(InputError, match="^lines.txt needs padding to batch lines of different lengths, and the tokenizer has no padding"):
        tokenize_lines(lines, gpt2_like)


def test_a_text_file_without_a_tokenizer_or_in_another_encoding_or_empty_is_refused(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sat\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"^lines.txt is text: pass tokenizer="):
        load_calibration(lines)
    lines.write_bytes("the cat sat on the mat\n".encode("utf-16"))
    with pytest.raises(InputError, match=r"^lines.txt is not UTF-8 text \(byte 0xff at offset 0\): save it as UTF-8, one example per line$"):
        load_calibration(lines, tokenizer=tokenizer(tmp_path))
    lines.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match=r"^lines.txt holds no text: write one example per line$"):
        load_calibration(lines, tokenizer=tokenizer(tmp_path))


def test_the_command_calibrates_a_hugging_face_model_on_a_text_file_and_verify_reads_one_too(tmp_path):
    directory = bert_directory(tmp_path)
    (tmp_path / "lines.txt").write_text("\n".join(sentences(80)) + "\n", encoding="utf-8")
    result = rpsconvert(directory.name, "--ratio", "0.5", "--calibrate", "lines.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fidelity to tiny-bert on 16 held-out inputs" in result.stdout  # a fifth of the 80 lines
    made_by = read(tmp_path / "tiny-bert.rps.safetensors").manifest["provenance"]
    assert made_by["call"]["calibration"] is True and made_by["call"]["calibration_batches"] == 2  # 64 lines, 32 a batch
    assert made_by["fidelity"]["on"] == "converted" and made_by["fidelity"]["cosine"] > 0.5
    checked = rpsconvert("verify", "tiny-bert.rps.safetensors", "--against", directory.name, "--data", "lines.txt", "--json", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["inputs"] == "80 held-out inputs"


@pytest.mark.parametrize("case", ["no tokenizer", "not a directory", "not UTF-8", "empty"])
def test_a_text_calibration_file_the_command_cannot_use_is_one_line_and_writes_nothing(tmp_path, case):
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sat on the mat\n", encoding="utf-8")
    if case == "not a directory":
        torch.save(nn.Sequential(nn.Linear(8, 40)), tmp_path / "mlp.pt")
        model = "mlp.pt"
    else:
        model = bert_directory(tmp_path, with_tokenizer=case != "no tokenizer").name
    if case == "not UTF-8":
        lines.write_bytes("the cat sat on the mat\n".encode("latin-1") + b"caf\xe9\n")
    if case == "empty":
        lines.write_text("")
    result = rpsconvert(model, "--ratio", "0.5", "--calibrate", "lines.txt", cwd=tmp_path)
    expected = {
        "no tokenizer": "error: lines.txt is text, and bare-bert has no tokenizer: pass tensors saved with torch.save/safetensors, "
                        "or a Hugging Face directory with its tokenizer files\n",
        "not a directory": "error: lines.txt is text, and mlp.pt has no tokenizer: pass tensors saved with torch.save/safetensors, "
                           "or a Hugging Face directory with its tokenizer files\n",
        "not UTF-8": "error: lines.txt is not UTF-8 text (byte 0xe9 at offset 26): save it as UTF-8, one example per line\n",
        "empty": "error: lines.txt holds no text: write one example per line\n",
    }[case]
    assert result.returncode == 1 and result.stdout == "" and result.stderr == expected
    assert not list(tmp_path.glob("*.rps.safetensors"))
