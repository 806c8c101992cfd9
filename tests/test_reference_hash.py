"""An independent pure-Python reading of docs/format.md (the benchmark's naive baseline) agrees
with the vectorised hashes, element by element."""

import importlib.util
from pathlib import Path

import pytest

from rpsconvert.engine.hashing import signs
from rpsconvert.engine.mapping import RandomFold

_spec = importlib.util.spec_from_file_location("convert_speed", Path(__file__).parents[1] / "benchmarks" / "convert_speed.py")
convert_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_speed)


@pytest.mark.parametrize("m, seed", [(1, 0), (5, 0), (97, 7), (1000, 2**32 - 1), (70_000, 3)])
def test_pure_python_reference_matches_vectorised_slots_and_signs(m, seed):
    n = 20_000
    slots, sign = convert_speed.naive_slots_and_signs(n, m, seed)
    assert RandomFold().slots(0, n, m, seed).tolist() == slots
    assert signs(0, n, seed).tolist() == sign


@pytest.mark.parametrize("m", [2**32, 2**33 + 7, 3 * 2**32 + 1])
def test_pure_python_reference_matches_pools_beyond_two_to_the_32_slots(m):
    start = 2 * m - 10_000  # the second fold ends inside the range: its last slots, then the third fold's first
    slots, sign = convert_speed.naive_slots_and_signs(20_000, m, 5, start)
    assert RandomFold().slots(start, start + 20_000, m, 5).tolist() == slots
    assert signs(start, start + 20_000, 5).tolist() == sign


def test_pure_python_hash_of_a_high_index_matches():
    i = 2**40 + 12_345
    key = convert_speed._key(9, 4)
    expected = 1 - 2 * ((convert_speed._h(i >> 5, key) >> (i & 31)) & 1)
    assert signs(i, i + 1, 9).item() == expected
