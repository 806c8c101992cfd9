"""Checkpoints: round trips, loading with and without a skeleton, decompress, budgets, corruption,
atomic writes, and the golden files that pin format v1 forever."""

import hashlib
import json
import math
import os
import struct
import warnings

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from golden import DATA, GOLDEN, GoldenNet, checkpoint
from models import TiedLM
from rpsconvert import BudgetError, CheckpointError, convert, decompress, load, materialize, parse_bytes, save
from rpsconvert.format.files import write_atomic
from rpsconvert.engine.operator import CompressedWeight
from rpsconvert.engine.pool import RPSPool
from rpsconvert.format.manifest import DIGEST_KEY, FORMAT_VERSION, MANIFEST_KEY, manifest_json, parse


def _quiet_convert(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the budget holds the whole model" and the like
        return convert(model, *args, **kwargs)


@torch.no_grad()
def _outputs(model, x):
    model.eval()
    materialize(model) if hasattr(model, "rps") else None
    return model(x)


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


ROUND_TRIP = {
    "resnet18": (lambda: torchvision.models.resnet18(), lambda: torch.randn(2, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), lambda: torch.randn(2, 3, 32, 32)),
    "vision_transformer": (_tiny_vit, lambda: torch.randn(2, 3, 16, 16)),  # MultiheadAttention's in_proj_weight
    "tied_lm": (TiedLM, lambda: torch.randint(0, 300, (2, 7))),
    # refuses a state dict without torch's layout versions (`_metadata`), which safetensors cannot hold
    "mnasnet0_75": (lambda: torchvision.models.mnasnet0_75(), lambda: torch.randn(2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_save_then_load_into_a_skeleton_gives_identical_outputs(name, tmp_path):
    make, example = ROUND_TRIP[name]
    torch.manual_seed(0)
    converted = _quiet_convert(make(), 0.1)
    path = save(converted, tmp_path / "m.rps.safetensors")
    torch.manual_seed(1)
    loaded = load(path, model=make())  # the skeleton's own weights are different
    x = example()
    assert torch.equal(_outputs(loaded, x), _outputs(converted, x))


def test_tied_weights_stay_tied_after_load(tmp_path):
    path = save(convert(TiedLM(), 0.5), tmp_path / "tied.rps.safetensors")
    spec = json.loads(safetensors.safe_open(str(path), "pt").metadata()[MANIFEST_KEY])
    assert [(w["name"], w["aliases"]) for w in spec["weights"] if w["aliases"]] == [("embed.weight", ["head.weight"])]
    loaded = load(path, model=TiedLM())
    assert torch.equal(loaded.head.weight, loaded.embed.weight)


def test_load_without_a_skeleton_rebuilds_the_recorded_torchvision_architecture(tmp_path):
    torch.manual_seed(0)
    converted = convert(torchvision.models.resnet18(), 0.05, architecture="torchvision:resnet18")
    path = save(converted, tmp_path / "r18.rps.safetensors")
    loaded = load(path)
    assert type(loaded).__name__ == "ResNet"
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_outputs(loaded, x), _outputs(converted, x))


def test_load_without_a_skeleton_or_architecture_says_what_to_pass(tmp_path):
    path = save(convert(TiedLM(), 0.5), tmp_path / "tied.rps.safetensors")
    with pytest.raises(CheckpointError, match=r"records no architecture: pass a model .*load\(path, model=MyModel\(\)\).*decompress"):
        load(path)


def test_a_mismatching_skeleton_is_refused_before_it_is_touched(tmp_path):
    path = save(convert(torchvision.models.resnet18(), 0.05), tmp_path / "r18.rps.safetensors")
    skeleton = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \(10, 512\), the checkpoint \(1000, 512\)"):
        load(path, model=skeleton)
    assert not hasattr(skeleton, "rps")
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


def test_a_skeleton_with_other_dense_tensors_is_refused_unless_not_strict(tmp_path):
    path = save(convert(nn.Sequential(nn.Linear(40, 40), nn.LayerNorm(40)), 0.5), tmp_path / "m.rps.safetensors")
    skeleton = nn.Sequential(nn.Linear(40, 40), nn.LayerNorm(40), nn.LayerNorm(40))
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: 2.bias, 2.weight \(pass strict=False"):
        load(path, model=skeleton)
    assert load(path, model=skeleton, strict=False)[0].weight.shape == (40, 40)


def test_decompress_at_ratio_one_strict_loads_into_the_original_architecture(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.resnet18().eval()
    converted = convert(original, 1.0)
    path = save(converted, tmp_path / "r18.rps.safetensors")
    dense = torchvision.models.resnet18()
    dense.load_state_dict(decompress(path), strict=True)
    x = torch.randn(2, 3, 32, 32)
    out = _outputs(dense, x)
    assert torch.equal(out, _outputs(converted, x))  # the very weights the converted model generates
    with torch.no_grad():  # and at ratio 1.0 those are the original's, to the last bit or two
        assert ((out - original(x)).norm() / original(x).norm()).item() < 1e-6


def test_decompress_keeps_tied_weights_as_one_tensor_under_both_names(tmp_path):
    path = save(convert(TiedLM(), 0.5), tmp_path / "tied.rps.safetensors")
    state = decompress(path)
    assert state["head.weight"] is state["embed.weight"]
    TiedLM().load_state_dict(state, strict=True)


def test_the_dense_file_is_written_a_generated_weight_at_a_time_and_equals_decompress(tmp_path, monkeypatch):
    import weakref

    from rpsconvert.engine.pool import RPSPool
    from rpsconvert.format.checkpoint import write_dense
    from rpsconvert.format.files import save_dense

    path = save(convert(TiedLM(), 0.5), tmp_path / "tied.rps.safetensors")
    alive, most = [], []
    generate = RPSPool.weight

    def counted(self, name):
        most.append(sum(ref() is not None for ref in alive))  # generated weights still held when the next is made
        weight = generate(self, name)
        alive.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(RPSPool, "weight", counted)
    write_dense(path, tmp_path / "lazy.safetensors")
    assert len(most) == 3 and max(most) == 0  # embed, head (tied: made again for its own copy), the hidden layer
    monkeypatch.setattr(RPSPool, "weight", generate)
    save_dense(decompress(path), tmp_path / "whole.safetensors")
    assert (tmp_path / "lazy.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_a_block_scale_that_is_not_finite_is_refused_in_whichever_piece_it_is(tmp_path, monkeypatch):
    from rpsconvert.engine import storage
    from rpsconvert.format import checkpoint
    from rpsconvert.format.serialized import serialize

    path = save(convert(TiedLM(), 0.5, bits=4), tmp_path / "q.rps.safetensors")
    ckpt = checkpoint.read(path)
    stored = {f"rps_pool{suffix}": t.clone() for suffix, t in ckpt.pool.stored().items()}
    stored["rps_pool.scales"][-1] = float("inf")  # in the last piece of the check
    tensors = {**ckpt.tensors, **stored}
    bad = tmp_path / "inf.rps.safetensors"
    write_atomic(bad, serialize(tensors, checkpoint._metadata(ckpt.manifest, tensors)))  # a valid digest over a bad scale
    monkeypatch.setattr(storage, "_CHECKED", 4)
    assert len(stored["rps_pool.scales"]) > 4
    with pytest.raises(CheckpointError, match="a block scale of the pool is not finite"):
        load(bad, model=TiedLM())


class _Versioned(nn.Module):
    """A module that, like torchvision's MNASNet, refuses a state dict without its layout version."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(40, 40), nn.BatchNorm1d(40))

    def forward(self, x):
        return self.body(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        assert local_metadata.get("version") == 2, f"version {local_metadata.get('version')}"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_decompress_gives_each_module_its_layout_version(tmp_path):
    path = save(convert(_Versioned(), 0.5), tmp_path / "versioned.rps.safetensors")
    state = decompress(path)
    assert state._metadata[""] == {"version": 2} and state._metadata["body.1"] == {"version": 2}  # BatchNorm's
    assert state._metadata["body.0"] == {"version": 1}
    _Versioned().load_state_dict(state, strict=True)  # refused without the versions
    tight = save(convert(_Versioned(), budget=4000), tmp_path / "tight.rps.safetensors")
    assert tight.stat().st_size <= 4000  # the budget counts the versions' bytes in the header

def test_the_same_model_and_seed_give_the_same_bytes_every_time(tmp_path):
    # safetensors writes its metadata map in an order that changes from call to call (two orders in
    # 30 calls, measured); the writer puts the entries back in key order
    torch.manual_seed(0)
    converted = convert(TiedLM(), ratio=0.5, seed=3)
    files = {hashlib.sha256(save(converted, tmp_path / f"{i}.rps.safetensors").read_bytes()).hexdigest() for i in range(30)}
    torch.manual_seed(0)
    again = convert(TiedLM(), ratio=0.5, seed=3)  # converted again from the same weights
    assert files == {hashlib.sha256(save(again, tmp_path / "again.rps.safetensors").read_bytes()).hexdigest()}
    header = (tmp_path / "0.rps.safetensors").read_bytes()
    assert header.index(b'"rpsconvert":') < header.index(b'"rpsconvert.sha256":')


def test_the_metadata_spec_records_everything_a_loader_needs(tmp_path):
    converted = convert(TiedLM(), 0.25, seed=42, dtype=torch.float16, architecture="torchvision:resnet18")
    path = save(converted, tmp_path / "tied.rps.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        metadata, names = f.metadata(), set(f.keys())
    spec = json.loads(metadata[MANIFEST_KEY])
    assert (spec["format"], spec["format_version"], spec["hash"]) == ("rpsconvert", 1, "fmix32-v1")
    assert (spec["mapping"], spec["seed"]) == ("randomfold", 42)
    assert spec["pool"] == {"tensor": "rps_pool", "slots": (300 * 48 + 48 * 48) // 4, "dtype": "float16"}
    assert spec["weights"][1] == {"name": "mix.weight", "aliases": [], "shape": [48, 48], "dtype": "float32", "offset": 14_400,
                                  "scale": converted.rps.weights["mix.weight"].scale}
    assert spec["original_bytes"] == (300 * 48 + 48 * 48 + 48) * 4
    assert spec["architecture"] == "torchvision:resnet18" and spec["rpsconvert_version"] == "0.1.0"
    assert names == {"rps_pool", "mix.bias"} and len(metadata[DIGEST_KEY]) == 64


MODELS = {
    "mlp": lambda width: nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 10)),
    "cnn": lambda width: nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 8, 3)),
    "tied": lambda width: TiedLM(vocab=width * 4, dim=24),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(sorted(MODELS)), width=st.integers(40, 300), fraction=st.floats(0.001, 1.5), dtype=st.sampled_from(["float32", "float16"]))
def test_the_written_file_is_never_larger_than_the_budget(tmp_path, model, width, fraction, dtype):
    net = MODELS[model](width)
    size = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    budget = max(1, int(size * fraction))
    try:
        converted = _quiet_convert(net, budget=budget, dtype=getattr(torch, dtype))
    except BudgetError as exc:  # too small: the error names a budget that does fit
        minimum = int(str(exc).split("minimum budget is ")[1].split(" bytes")[0])
        assert minimum > budget
        converted, budget = _quiet_convert(net, budget=minimum, dtype=getattr(torch, dtype)), minimum
    path = save(converted, tmp_path / "m.rps.safetensors", overwrite=True)
    assert os.path.getsize(path) <= budget


@pytest.mark.parametrize("name, budget, dtype", [
    ("mobilenet_v3_small", "300kB", torch.float32), ("mobilenet_v3_small", "1MiB", torch.bfloat16),
    ("squeezenet1_1", "100kB", torch.float16), ("shufflenet_v2_x0_5", "200kB", torch.float32),
])
def test_torchvision_models_fit_their_budget(tmp_path, name, budget, dtype):
    converted = _quiet_convert(torchvision.models.get_model(name), budget=budget, dtype=dtype, architecture=f"torchvision:{name}")
    assert os.path.getsize(save(converted, tmp_path / "m.rps.safetensors")) <= parse_bytes(budget)


def test_a_budget_is_used_to_within_a_few_hundred_bytes(tmp_path):
    converted = _quiet_convert(torchvision.models.resnet18(), budget="1MB")
    size = os.path.getsize(save(converted, tmp_path / "r18.rps.safetensors"))
    assert 999_000 <= size <= 1_000_000


@pytest.fixture
def golden_file(tmp_path):
    path = tmp_path / "golden.rps.safetensors"
    path.write_bytes((DATA / "golden-v1-randomfold-fp32.rps.safetensors").read_bytes())
    return path


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 1000, -1000, -1])
def test_a_truncated_file_is_a_clear_error(golden_file, keep):
    data = golden_file.read_bytes()
    golden_file.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        load(golden_file, model=GoldenNet())


def test_every_flipped_bit_is_caught(golden_file):
    data = golden_file.read_bytes()
    for position in range(0, len(data), 13):  # header, spec and tensor data alike
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        golden_file.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            decompress(golden_file)


def test_a_changed_scale_is_caught_by_the_digest(golden_file):
    data = bytearray(golden_file.read_bytes())
    digit = data.index(b'scale\\":') + len(b'scale\\":')  # the spec is a JSON string inside the JSON header
    data[digit] = ord("7") if data[digit] != ord("7") else ord("8")  # still valid JSON, another number
    golden_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its content does not match its sha256"):
        load(golden_file, model=GoldenNet())


def test_garbage_and_foreign_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.rps.safetensors"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        decompress(garbage)
    foreign = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="a safetensors file but not an rpsconvert checkpoint"):
        decompress(foreign)
    with pytest.raises(CheckpointError, match="no such file"):
        decompress(tmp_path / "missing.rps.safetensors")


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path):
    path = save(convert(TiedLM(), 0.5), tmp_path / "tied.rps.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata[MANIFEST_KEY] = metadata[MANIFEST_KEY].replace('"format_version":1', f'"format_version":{FORMAT_VERSION + 1}')
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}, newer than this rpsconvert reads"):
        load(path, model=TiedLM())


def test_randomfold_pools_may_have_more_slots_than_a_hash_word_has_values():
    """A 7B model at ratio 1 needs 6.7e9 slots: a RandomFold pool may have up to 2**53 - 1, and one
    of 2**32 slots or more is written as format version 5, which older readers refuse as newer."""
    total = 2**32 + 5
    weights = [CompressedWeight("w", (total,), torch.float32, 0, 1.0)]
    pool = RPSPool(torch.empty(total, device="meta"), "randomfold", 0, weights, grad_scaling=False)
    manifest = manifest_json(pool, {}, 0)
    assert (manifest["format_version"], manifest["pool"]["slots"]) == (5, total)
    with pytest.raises(ValueError, match="a pool of 4,294,967,301 slots stored as float32 needs format version 5"):
        parse({**manifest, "format_version": 4}, {})
    with pytest.raises(ValueError, match="a hashednet pool must have between 1 and 4,294,967,295 slots"):
        parse({**manifest, "mapping": "hashednet"}, {})
    with pytest.raises(ValueError, match="a randomfold pool must have between 1 and 9,007,199,254,740,991 slots"):
        parse({**manifest, "pool": {**manifest["pool"], "slots": 2**53}}, {})


def test_an_existing_file_is_not_overwritten_without_overwrite(tmp_path):
    path = tmp_path / "m.rps.safetensors"
    path.write_bytes(b"precious")
    converted = convert(TiedLM(), 0.5)
    with pytest.raises(FileExistsError, match="already exists: pass overwrite=True"):
        save(converted, path)
    assert path.read_bytes() == b"precious"
    save(converted, path, overwrite=True)
    assert load(path, model=TiedLM()) is not None


def test_a_failed_write_leaves_neither_output_nor_temporary_file(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        save(convert(TiedLM(), 0.5), tmp_path / "m.rps.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.rps.safetensors"
    path.write_bytes(b"old")

    def interrupt(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.rps.safetensors"] and path.read_bytes() == b"old"


def test_a_file_created_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    path = tmp_path / "m.rps.safetensors"

    def racing_link(src, dst):
        path.write_bytes(b"theirs")  # another process got there first
        raise FileExistsError

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(FileExistsError, match="already exists"):
        write_atomic(path, b"ours")
    assert path.read_bytes() == b"theirs" and len(list(tmp_path.iterdir())) == 1


def test_a_filesystem_without_hard_links_still_gets_the_file(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    write_atomic(tmp_path / "m.rps.safetensors", b"data")
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("m.rps.safetensors", b"data")]


@pytest.mark.parametrize("name", GOLDEN)
def test_a_golden_checkpoint_still_loads_to_the_same_outputs_and_weights(name):
    expected = safetensors.torch.load_file(DATA / f"{name}.expected.safetensors")
    model = load(checkpoint(name), model=GoldenNet()).eval()
    dense = decompress(checkpoint(name))
    assert sorted(dense) == sorted(k.removeprefix("state.") for k in expected if k.startswith("state."))
    assert all(torch.equal(dense[k], expected[f"state.{k}"]) for k in dense)  # bit for bit, on every machine
    # The weights are integer hashing and exact float scaling: bit for bit on every machine (above).
    # The outputs are float32 kernels whose summation order depends on the CPU and thread count:
    # outputs reach 21 (ulp 2e-6) after ~100-term sums and five layers, so a few hundred ulps, 1e-4,
    # bounds that; a wrong weight moves them by 1e-2 or more. Measured across machines: 2.9e-6.
    with torch.no_grad():
        torch.testing.assert_close(model(expected["tokens"]), expected["output"], rtol=1e-4, atol=1e-4)


def _read_by_the_spec(path) -> dict[str, np.ndarray]:
    """A reader written from docs/format.md alone (plain Python, numpy for float32 arithmetic)."""
    M = 0xFFFFFFFF

    def fmix32(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & M
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & M
        return x ^ (x >> 16)

    def key(seed, stream):
        return fmix32(seed ^ fmix32((stream * 0x9E3779B9) & M))

    def H(x, k):
        return fmix32(fmix32((x & M) ^ k) ^ (x >> 32))

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    metadata = header.pop("__metadata__")
    spec = json.loads(metadata["rpsconvert"])
    digest = hashlib.sha256(metadata["rpsconvert"].encode())
    for name in sorted(header, key=str.encode):
        lo, hi = header[name]["data_offsets"]
        digest.update(name.encode() + b"\0" + body[lo:hi])
    assert digest.hexdigest() == metadata["rpsconvert.sha256"]

    def tensor(name):
        entry = header[name]
        lo, hi = entry["data_offsets"]
        dtype = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "U8": "u1"}[entry["dtype"]]
        return np.frombuffer(body[lo:hi], dtype=dtype).reshape(entry["shape"])

    def quantized_pool(entry):  # part 2, "Quantized pools": codes (a bit stream, or base 3) times block scales
        packed, scales = tensor(entry["tensor"]), tensor(entry["tensor"] + ".scales").astype(np.float32)
        runs = entry.get("runs") or [[entry["slots"], entry["bits"], entry["block"], entry.get("packing", "bits")]]
        values, first_byte, first_scale = [], 0, 0
        for n, bits, block, *packing in runs:  # each run starts a new byte and a new block
            base3 = packing == ["base3"]

            def stream(n):
                return (int(packed[first_byte + n // 8]) >> (n % 8)) & 1

            for j in range(n):
                if base3:
                    code = (int(packed[first_byte + j // 5]) // 3 ** (j % 5)) % 3 - 1
                else:
                    code = sum(stream(j * bits + k) << k for k in range(bits)) - 2 ** (bits - 1)
                values.append(code * scales[first_scale + j // block])
            first_byte += -(-n // 5) if base3 else -(-n * bits // 8)
            first_scale += -(-n // block)
        return np.array(values, dtype=np.float32)

    assert spec["mapping"] == "randomfold"
    quantized = "bits" in spec["pool"] or "runs" in spec["pool"]
    pool = quantized_pool(spec["pool"]) if quantized else tensor(spec["pool"]["tensor"])
    seed = spec["seed"]
    m, rotation_key, sign_key = len(pool), key(seed, 1), key(seed, 4)
    state = {name: tensor(name) for name in header if not name.startswith(spec["pool"]["tensor"])}
    state.update({alias: state[name] for alias, name in spec["dense_aliases"].items()})
    for w in spec["weights"]:
        values = []
        for i in range(w["offset"], w["offset"] + math.prod(w["shape"])):
            slot = (H(i // m, rotation_key) % m + i % m) % m
            g = -1 if (H(i >> 5, sign_key) >> (i & 31)) & 1 else 1
            values.append(pool[slot] * np.float32(g * w["scale"]))
        for name in (w["name"], *w["aliases"]):
            state[name] = np.array(values, dtype=np.float32).reshape(w["shape"])
    return state


@pytest.mark.parametrize("name", [name for name in GOLDEN if "-randomfold-" in name and not name.startswith("golden-sharded")])
def test_a_reader_written_from_the_format_spec_alone_decodes_the_golden_file_bit_for_bit(name):
    expected = safetensors.torch.load_file(DATA / f"{name}.expected.safetensors")
    state = _read_by_the_spec(DATA / f"{name}.rps.safetensors")
    assert sorted(state) == sorted(k.removeprefix("state.") for k in expected if k.startswith("state."))
    assert all(np.array_equal(state[k], expected[f"state.{k}"].numpy()) for k in state)
