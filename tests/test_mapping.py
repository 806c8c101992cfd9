"""Mappings: load balance, losslessness at m = N, chunk independence."""

import pytest
import torch

from rpsconvert.engine.mapping import CHUNK, MAPPINGS, RandomFold, chunks, get_mapping

N, M = 100_003, 997


def _counts(mapping, n, m, seed=0):
    return torch.bincount(mapping.slots(0, n, m, seed), minlength=m)


def test_randomfold_gives_every_slot_floor_or_ceil_of_n_over_m():
    counts = _counts(RandomFold(), N, M)
    assert set(counts.tolist()) <= {N // M, N // M + 1}


def test_randomfold_is_a_bijection_when_the_pool_is_as_large_as_the_weights():
    assert torch.equal(torch.sort(RandomFold().slots(0, N, N, 3)).values, torch.arange(N))


def test_hashednet_is_unbalanced_where_randomfold_is_not():
    spread = _counts(get_mapping("hashednet"), N, M).double().std() / (N / M)
    assert spread > 0.05  # Poisson-like spread, about 1/sqrt(100) = 0.1
    assert _counts(RandomFold(), N, M).double().std() / (N / M) < 0.01


@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_slots_do_not_depend_on_where_a_range_is_cut(name):
    mapping = get_mapping(name)
    whole = mapping.slots(5000, 9000, 333, 1)
    parts = torch.cat([mapping.slots(5000, 6789, 333, 1), mapping.slots(6789, 9000, 333, 1)])
    assert torch.equal(whole, parts)
    assert int(whole.min()) >= 0 and int(whole.max()) < 333


@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_indices_beyond_2_to_the_40_map_into_the_pool(name):
    slots = get_mapping(name).slots(2**40, 2**40 + 10_000, 4096, 2)
    assert int(slots.min()) >= 0 and int(slots.max()) < 4096
    assert slots.unique().numel() > 2000


def test_chunks_cover_a_large_weight_in_bounded_pieces():
    pieces = list(chunks(RandomFold(), 17, CHUNK + 5, 1000, 0))
    assert [(lo, hi) for lo, hi, _, _ in pieces] == [(0, CHUNK), (CHUNK, CHUNK + 5)]
    assert torch.equal(pieces[1][2], RandomFold().slots(17 + CHUNK, 17 + CHUNK + 5, 1000, 0))
