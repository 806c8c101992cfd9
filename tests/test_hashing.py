"""The hash functions are part of the file format: these vectors are pinned forever."""

import pytest
import torch

from rpsconvert.engine.hashing import fmix32, hash32, signs, stream_key
from rpsconvert.engine.mapping import HashedNet, RandomFold, RoastTile

X = torch.tensor([0, 1, 2, 3, 2**32 - 1, 2**32, 2**40 + 7, 2**62 + 5])


def test_fmix32_matches_murmur3_finalizer():
    assert fmix32(torch.tensor([0, 1, 2, 3, 2**32 - 1])).tolist() == [0, 1364076727, 821347078, 2247144487, 2180083513]


def test_stream_keys_are_pinned():
    assert [stream_key(0, s) for s in (1, 2, 3, 4)] == [2856213345, 2571116460, 2639213232, 1192922879]
    assert stream_key(12345, 4) == 631700874


def test_hash_of_64_bit_indices_is_pinned():
    assert hash32(X, 0).tolist() == [0, 804215951, 3050591713, 3918329826, 3807975093, 1364076727, 4249519463, 1418497628]
    assert hash32(X, stream_key(7, 4)).tolist() == [
        1379467749, 3854192353, 3649637747, 2342282222, 2583996080, 545739815, 2356880054, 2968328825,
    ]


def test_signs_are_pinned_and_balanced():
    assert signs(0, 10, 0).tolist() == [-1, 1, -1, 1, 1, -1, 1, -1, 1, -1]
    many = signs(2**40, 2**40 + 1_000_000, 3).double()
    assert abs(many.mean().item()) < 0.005


def test_mappings_are_pinned():
    assert RandomFold().slots(0, 12, 5, 0).tolist() == [2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 4, 0]
    assert RandomFold().slots(2**40, 2**40 + 4, 1000, 9).tolist() == [264, 265, 266, 267]
    big = 2**33 + 7  # more slots than a hash word has values (a 7B model at ratio 1): across the fold at 2 * big
    assert RandomFold().slots(2 * big - 3, 2 * big + 3, big, 0).tolist() == [3231473669, 3231473670, 3231473671, 2550364134, 2550364135, 2550364136]
    assert HashedNet().slots(0, 8, 1000, 0).tolist() == [943, 662, 393, 97, 434, 819, 798, 244]
    assert RoastTile().slots(1020, 1030, 100, 0).tolist() == [72, 73, 74, 75, 96, 97, 98, 99, 0, 1]


def test_signs_do_not_depend_on_where_a_range_is_cut():
    whole = signs(1000, 1200, 5)
    assert torch.equal(torch.cat([signs(1000, 1033, 5), signs(1033, 1200, 5)]), whole)


def test_seed_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="seed"):
        stream_key(2**32, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_hashes_are_identical():
    assert torch.equal(hash32(X.cuda(), 123).cpu(), hash32(X, 123))
    assert torch.equal(signs(2**40, 2**40 + 4096, 1, "cuda").cpu(), signs(2**40, 2**40 + 4096, 1))
