"""The pool lives in memory as it is stored: a converted model runs in the bytes it was given.

A quantized (or half-precision) pool is held as its codes and block scales; generation reads them
with the same bits as the float path; a float latent pool exists only while the pool trains.
"""

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from digits import batches, trained_mlp
from rpsconvert import calibrate, convert, load, recover, resident_bytes, save, set_mode
from rpsconvert.engine.mapping import RoastTile
from rpsconvert.engine import storage as storage_module
from rpsconvert.engine.storage import MixedStorage, PoolStorage

WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def _mlp(seed=0, width=128) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: model.rps.weight(name).clone() for name in model.rps.weights}


PACKED = [(bits, "bits") for bits in WIDTHS] + [(2, "base3")]


@settings(max_examples=80, deadline=None)
@given(
    packed=st.sampled_from(PACKED), block=st.sampled_from([1, 7, 32, 64]), slots=st.integers(1, 3000),
    cut=st.tuples(st.floats(0, 1), st.floats(0, 1)), seed=st.integers(0, 2**16),
)
def test_any_range_or_any_slots_of_a_stored_pool_read_exactly_the_decoded_values(packed, block, slots, cut, seed):
    storage = PoolStorage(torch.float16, packed[0], block, packed[1])
    generator = torch.Generator().manual_seed(seed)
    stored = storage.encode(torch.randn(slots, generator=generator))
    decoded = storage.decode(stored, slots)
    lo, hi = sorted(int(c * slots) for c in cut)
    assert torch.equal(storage.read(stored, lo, hi), decoded[lo:hi])
    picks = torch.randint(0, slots, (257,), generator=generator)
    assert torch.equal(storage.gather(stored, picks), decoded[picks])


def test_a_mixed_pool_reads_each_run_with_its_own_width():
    layout = ((100, 8, 32, "bits"), (37, 3, 7, "bits"), (11, 2, 64, "base3"), (1000, 5, 64, "bits"), (3, 2, 16, "bits"), (9, 2, 4, "base3"))
    runs = tuple((n, PoolStorage(torch.float16, bits, block, packing)) for n, bits, block, packing in layout)
    storage, slots = MixedStorage(runs), 1160
    stored = storage.encode(torch.randn(slots, generator=torch.Generator().manual_seed(0)))
    decoded = storage.decode(stored, slots)
    assert torch.equal(decoded, storage.snap(decoded))  # decode is exactly the grid the codes stand for
    for lo, hi in ((0, slots), (90, 140), (136, 137), (137, 1137), (140, 150), (1150, 1160), (1159, 1160), (5, 5), (slots, slots)):
        assert torch.equal(storage.read(stored, lo, hi), decoded[lo:hi])
    picks = torch.randint(0, slots, (500,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(storage.gather(stored, picks), decoded[picks])


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_codes_below_the_lowest_level_read_as_decode_clamps_them_and_stay_stored(bits):
    storage = PoolStorage(torch.float16, bits, 8)
    stored = {"": torch.zeros(bits, dtype=torch.uint8), ".scales": torch.ones(1, dtype=torch.float16)}  # 8 fields of 0
    lowest = torch.full((8,), -float(storage.levels))
    assert torch.equal(storage.read(stored, 0, 8), lowest) and torch.equal(storage.decode(stored, 8), lowest)
    assert torch.equal(storage.gather(stored, torch.arange(8)), lowest)
    assert not stored[""].any()  # reading never writes into the stored codes


def test_base3_codes_are_five_digits_a_byte_the_earliest_lowest():
    storage = PoolStorage(torch.float16, 2, 8, "base3")
    stored = storage.encode(torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -1.0, 1.0]))  # scale 1: the values are the codes
    assert stored[""].tolist() == [200, 6]  # 2 + 0*3 + 1*9 + 1*27 + 2*81, then 0 + 2*3 (docs/format.md)
    assert storage.bytes(7) == 2 + 2 and storage.bytes(10**6) == 200_000 + 2 * 125_000  # 1.6 bits a code and the scales


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 20])  # a multiple of 5 or not: chunks of codes pack on whole bytes
def test_base3_codes_pack_and_read_in_chunks_as_at_once(chunk, monkeypatch):
    storage = PoolStorage(torch.float16, 2, 32, "base3")
    values = torch.randn(4099, generator=torch.Generator().manual_seed(4))
    whole = storage.encode(values)
    monkeypatch.setattr(storage_module, "_CHUNK", chunk)
    assert all(torch.equal(whole[k], v) for k, v in storage.encode(values).items())
    assert torch.equal(storage.read(whole, 3, 4099), storage.snap(values)[3:])


def test_a_base3_byte_above_242_reads_as_its_digits_with_the_fifth_clamped():
    storage = PoolStorage(torch.float16, 2, 5, "base3")
    stored = {"": torch.tensor([255], dtype=torch.uint8), ".scales": torch.ones(1, dtype=torch.float16)}
    expected = torch.tensor([-1.0, 0.0, 0.0, -1.0, 1.0])  # 255 = 0 + 1*3 + 1*9 + 0*27 + 3*81: digits 0, 1, 1, 0, then 3 clamped to 2
    assert torch.equal(storage.decode(stored, 5), expected) and torch.equal(storage.gather(stored, torch.arange(5)), expected)


MAPPINGS = [("randomfold", 0.5, 128), ("randomfold", 0.5, 16), ("hashednet", 0.5, 128), (RoastTile(tile=100), 0.5, 128), ("randomfold", 1.0, 128)]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("mapping, ratio, width", MAPPINGS, ids=["randomfold", "randomfold-small-pool", "hashednet", "roast", "randomfold-ratio-1"])
def test_every_width_and_mapping_generates_from_codes_the_bits_of_the_float_pool(bits, mapping, ratio, width):
    converted = convert(_mlp(width=width), ratio=ratio, bits=bits, mapping=mapping)
    assert converted.rps.packed
    packed = _weights(converted)
    converted.rps.unpack()  # the float latent pool, read through its grid: the path of every version before
    assert not converted.rps.packed
    for name, weight in _weights(converted).items():
        assert torch.equal(packed[name], weight), name


@pytest.mark.parametrize("kind", ["budget", "float16", "bfloat16"])
def test_a_half_precision_or_planned_pool_generates_from_its_stored_form_the_float_pools_bits(kind):
    model = _mlp()
    options = {"budget": 12_000} if kind == "budget" else {"ratio": 0.5, "dtype": getattr(torch, kind)}
    converted = convert(model, **options)
    assert converted.rps.packed
    packed = _weights(converted)
    converted.rps.unpack()
    assert all(torch.equal(packed[name], weight) for name, weight in _weights(converted).items())


def test_a_model_converted_with_a_budget_holds_its_file_bytes_not_a_float_pool(tmp_path):
    model = _mlp()
    converted = convert(model, budget=20_000)
    pool = converted.rps
    assert pool.packed and converted.rps_pool.numel() == 0  # the Parameter stays, empty, for optimizers
    stored = pool.storage.bytes(pool.size)
    dense = sum(t.numel() * t.element_size() for name, t in converted.state_dict().items() if not name.startswith("rps_pool"))
    assert resident_bytes(converted) == stored + dense  # codes, scales and the dense tensors: nothing else
    with torch.no_grad():
        converted(torch.randn(4, 64))
    assert resident_bytes(converted) == stored + dense  # a forward keeps no rounded or float copy
    assert stored + dense < 0.3 * sum(p.numel() * 4 for p in model.parameters())


def test_a_loaded_lean_model_runs_within_its_file_and_its_largest_weight(tmp_path):
    path = save(convert(_mlp(width=256), budget=40_000), tmp_path / "mlp.rps.safetensors")
    loaded = load(path, _mlp(1, width=256))
    largest = max(w.numel for w in loaded.rps.weights.values()) * 4
    file_bytes = path.stat().st_size
    assert resident_bytes(loaded) <= file_bytes  # the header is the rest of the file
    with torch.no_grad():
        loaded.eval()(torch.randn(2, 64))
    assert resident_bytes(loaded) <= file_bytes  # and the weights in use come and go
    set_mode(loaded, "cached")
    assert resident_bytes(loaded) >= file_bytes + largest  # cached mode holds dense weights, as stated
    set_mode(loaded, "lean")
    assert resident_bytes(loaded) <= file_bytes


def test_training_unpacks_the_pool_into_the_same_parameter_and_eval_packs_it_back():
    converted = convert(_mlp(), ratio=0.5, bits=4)
    optimizer = torch.optim.Adam(converted.parameters(), lr=1e-2)  # made while the pool is packed
    before = _weights(converted)
    parameter = converted.rps_pool
    converted.train()
    for _ in range(3):
        optimizer.zero_grad()
        converted(torch.randn(8, 64)).square().mean().backward()
        optimizer.step()
    assert converted.rps_pool is parameter and parameter.numel() == converted.rps.size  # the float latent pool
    assert not converted.rps.packed and parameter.grad.abs().sum() > 0
    trained = _weights(converted)
    assert any(not torch.equal(trained[name], before[name]) for name in before)  # the optimizer trained it
    converted.eval()
    assert converted.rps.packed and parameter.numel() == 0 and parameter.grad is None  # freed
    assert all(torch.equal(trained[name], weight) for name, weight in _weights(converted).items())  # the same weights


def test_a_submodule_in_eval_mode_inside_a_training_model_leaves_the_latent_pool_alone():
    converted = convert(_mlp(), ratio=0.5, bits=4).train()
    converted(torch.randn(2, 64)).sum().backward()
    assert not converted.rps.packed
    converted[0].eval()  # as a user freezing a part would
    assert not converted.rps.packed
    converted.eval()
    assert converted.rps.packed


def test_a_forward_without_gradients_in_train_mode_reads_the_codes():
    converted = convert(_mlp(), ratio=0.5, bits=4).train()
    with torch.no_grad():
        converted(torch.randn(2, 64))
    assert converted.rps.packed


def test_casting_the_model_never_rounds_the_codes_or_the_scales():
    converted = convert(_mlp(), ratio=0.5, bits=6)
    before = {k: v.clone() for k, v in converted.state_dict().items() if k.startswith("rps_pool_")}
    weights = _weights(converted)
    converted.to(torch.bfloat16)
    assert converted.rps_pool.dtype == torch.bfloat16  # the weights are generated in the model's dtype
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in before.items())
    assert all(w.dtype == torch.bfloat16 for w in _weights(converted).values())
    converted.float()
    assert all(torch.equal(weights[name], weight) for name, weight in _weights(converted).items())


def test_calibration_and_recovery_end_with_the_pool_packed():
    teacher = trained_mlp()
    converted = convert(teacher, ratio=0.5, bits=4, calibration=batches("calib")[:2], quiet=True)
    assert converted.rps.packed
    calibrate(converted, teacher, batches("calib")[:2], quiet=True)
    assert converted.rps.packed
    history = recover(converted, teacher, batches("calib")[:2], steps=3, lr=1e-3, quiet=True)
    assert converted.rps.packed and len(history.loss) == 3


def test_a_packed_model_copies_pickles_and_reloads_its_state_dict():
    converted = convert(_mlp(), budget=20_000)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = converted(x)
        twin = copy.deepcopy(converted)
        assert torch.equal(twin(x), expected) and twin.rps.packed
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        assert torch.equal(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)(x), expected)
        assert torch.equal(pickle.loads(pickle.dumps(converted))(x), expected)
        other = convert(_mlp(seed=5), budget=20_000)
        other.load_state_dict(converted.state_dict())
        assert torch.equal(other(x), expected)
