"""The checkpoint loader under fuzzing: a few hundred mutated files (random bytes, truncations,
bit flips, mutated headers, bogus manifests with and without a recomputed sha256) are each either
loaded or refused with CheckpointError; benchmarks/fuzz_loader.py runs the same with 10,000 cases."""

import json
from pathlib import Path

import pytest
import safetensors.torch

from benchmarks.fuzz_loader import check, fuzz, seed_file, split
from rpsconvert.format.manifest import DIGEST_KEY, MANIFEST_KEY, digest


def test_three_hundred_mutated_files_are_loaded_or_refused_with_checkpoint_error_only():
    outcomes = fuzz(300, derandomize=True)  # any other exception or a hang fails inside
    assert sum(outcomes.values()) == 300 and outcomes["refused"] > 200


def test_the_unmutated_seed_file_loads(tmp_path):
    seed = seed_file(tmp_path)
    assert check(seed, tmp_path / "case.rps.safetensors") == "ok"


@pytest.mark.parametrize("shape", [[2**40], [-1, 32], [2**31, 2**31]])
def test_an_absurd_weight_shape_with_a_recomputed_digest_is_refused_before_any_allocation(tmp_path, shape):
    seed = seed_file(tmp_path)
    tensors = safetensors.torch.load(seed)
    manifest = json.loads(split(seed)[0]["__metadata__"][MANIFEST_KEY])
    manifest["weights"][0]["shape"] = shape
    text = json.dumps(manifest)
    data = safetensors.torch.save(tensors, metadata={MANIFEST_KEY: text, DIGEST_KEY: digest(text, tensors)})
    assert check(data, Path(tmp_path, "case.rps.safetensors")) == "refused"
