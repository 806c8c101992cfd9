"""Fuzz the checkpoint loader: whatever the bytes, `read` and `load` raise CheckpointError or succeed.

Cases are a valid checkpoint mutated by hypothesis: random bytes, truncations, bit flips,
mutated safetensors headers (dtypes, absurd shapes and data offsets, missing tensors), and
manifest mutations (bogus JSON, wrong types, absurd shapes, slots, offsets and seeds, missing
tensors, a pool of the wrong dtype or shape). The sha256 covers manifest and tensors, so a mutation
either keeps the old digest (and must be caught by it) or recomputes it (and reaches the parser):
both are drawn. A case fails on any other exception, on taking longer than `CASE_SECONDS`, or
(here, under an address-space limit) on allocating far more than the file holds.

    .venv/bin/python benchmarks/fuzz_loader.py --cases 10000     # prints the figures of docs/security.md

tests/test_fuzz_loader.py runs a few hundred cases of the same strategies.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rpsconvert import CheckpointError, convert, load, save
from rpsconvert.format.checkpoint import read
from rpsconvert.format.manifest import DIGEST_KEY, MANIFEST_KEY, digest

CASE_SECONDS = 5


def victim() -> nn.Module:
    """The model of the seed checkpoint: two compressed linears tied to an embedding, dense norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 50))
    model[3].weight = model[0].weight
    return model


def seed_file(folder: Path) -> bytes:
    path = folder / "seed.rps.safetensors"
    save(convert(victim(), ratio=0.5), path)
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON, data section)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


# JSON values that break assumptions: wrong types, extremes, non-finite numbers
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "complex64", "float8_e4m3fn", "uint8", "nope", "rps_pool"]),
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=5), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _mutate_json(draw, value, depth: int = 0):
    """`value` with one leaf replaced, a key deleted or added, or a list entry dropped or repeated."""
    if isinstance(value, dict) and value and depth < 4:
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["descend", "descend", "delete", "replace", "add"]))
        out = dict(value)
        if action == "delete":
            del out[key]
        elif action == "replace":
            out[key] = draw(ODD_VALUES)
        elif action == "add":
            out[draw(st.text(max_size=6))] = draw(ODD_VALUES)
        else:
            out[key] = _mutate_json(draw, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 4:
        i = draw(st.integers(0, len(value) - 1))
        action = draw(st.sampled_from(["descend", "descend", "drop", "repeat"]))
        if action == "drop":
            return value[:i] + value[i + 1 :]
        if action == "repeat":
            return value + [value[i]]
        return value[:i] + [_mutate_json(draw, value[i], depth + 1)] + value[i + 1 :]
    return draw(ODD_VALUES)


@st.composite
def _mutated_manifest(draw, seed: bytes) -> bytes:
    """A manifest mutation (or bogus JSON), with tensors optionally changed, and the digest
    recomputed or not."""
    tensors = safetensors.torch.load(seed)
    metadata = split(seed)[0]["__metadata__"]
    if draw(st.booleans()):
        text = json.dumps(_mutate_json(draw, json.loads(metadata[MANIFEST_KEY])))
    else:
        text = draw(st.one_of(st.text(max_size=40), st.just(metadata[MANIFEST_KEY][: draw(st.integers(0, 200))])))
    change = draw(st.sampled_from(["none", "none", "drop", "dtype", "reshape"]))
    name = draw(st.sampled_from(sorted(tensors)))
    if change == "drop":
        del tensors[name]
    elif change == "dtype":
        tensors[name] = tensors[name].to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8])))
    elif change == "reshape":
        tensors[name] = tensors[name].reshape(-1)[: draw(st.integers(0, tensors[name].numel()))].clone()
    fresh = digest(text, tensors) if draw(st.booleans()) or change != "none" else metadata[DIGEST_KEY]
    return safetensors.torch.save(tensors, metadata={MANIFEST_KEY: text, DIGEST_KEY: fresh})


@st.composite
def _mutated_header(draw, seed: bytes) -> bytes:
    """A safetensors header with a tensor's dtype, shape or data offsets changed, or it removed."""
    header, body = split(seed)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = dict(header[name])
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX"]))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.integers(min_value=-1, max_value=2**62), max_size=4))
    elif field == "data_offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(min_value=-1, max_value=2**64), min_size=2, max_size=2))
    header = {k: v for k, v in header.items() if k != name} | ({} if field == "delete" else {name: entry})
    return join(header, body)


@st.composite
def _flipped(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for position in draw(st.lists(st.integers(0, len(seed) * 8 - 1), min_size=1, max_size=4)):
        data[position // 8] ^= 1 << (position % 8)
    return bytes(data)


def cases(seed: bytes) -> st.SearchStrategy[bytes]:
    """Every kind of bad (and a few good) checkpoint files, from the seed file."""
    return st.one_of(
        st.binary(max_size=256),
        st.integers(0, len(seed) - 1).map(lambda n: seed[:n]),
        _flipped(seed),
        _mutated_header(seed),
        _mutated_manifest(seed),
        _mutated_manifest(seed),
    )


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case took over {CASE_SECONDS} s")


def check(data: bytes, path: Path) -> str:
    """Read and load one file: "ok", "refused" (CheckpointError), or raise what went wrong."""
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        read(path)
        load(path, victim())
        return "ok"
    except CheckpointError:
        return "refused"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(max_examples: int, derandomize: bool) -> dict[str, int]:
    """Run `max_examples` cases; return how many loaded and how many were refused. Any other
    outcome fails hypothesis's test (it then shrinks the case and raises)."""
    outcomes = {"ok": 0, "refused": 0}
    with tempfile.TemporaryDirectory() as tmp:
        seed, path = seed_file(Path(tmp)), Path(tmp, "case.rps.safetensors")

        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=list(HealthCheck))
        @given(cases(seed))
        def one(data: bytes) -> None:
            outcomes[check(data, path)] += 1

        one()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space allowed beyond the start (MiB)")
    args = parser.parse_args()
    rss_limit = _address_space() + args.memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (rss_limit, rss_limit))
    start = time.perf_counter()
    outcomes = fuzz(args.cases, derandomize=False)
    seconds = time.perf_counter() - start
    total = sum(outcomes.values())
    print(f"{total} cases in {seconds:.1f} s ({total / seconds:.0f} cases/s): {outcomes['refused']} refused with "
          f"CheckpointError, {outcomes['ok']} loaded, no other exception, no case over {CASE_SECONDS} s, "
          f"address space capped at {args.memory_mb} MiB above the start")


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


if __name__ == "__main__":
    sys.exit(main())
