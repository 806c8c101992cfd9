"""The public surface: one import, a way back, pickling, and the registries that extend it."""

import copy
import io
import json
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import safetensors
import torch
from torch import nn

import rpsconvert
from models import TiedLM
from rpsconvert import (
    OutputExistsError,
    RoastTile,
    RPSError,
    RPSWarning,
    convert,
    densify,
    is_converted,
    load,
    register_layer_kind,
    register_mapping,
    save,
)
from rpsconvert.engine.hashing import hash32
from rpsconvert.engine.kinds import LAYER_KINDS
from rpsconvert.engine.mapping import MAPPINGS
from rpsconvert.format.manifest import MANIFEST_KEY


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_everything_public_is_importable_from_the_package_and_documented():
    for name in rpsconvert.__all__:
        obj = getattr(rpsconvert, name)
        assert obj.__doc__, f"{name} has no docstring"
    for name in ("convert", "load", "save", "recover"):
        doc = getattr(rpsconvert, name).__doc__
        assert all(section in doc for section in ("Args:", "Returns:", "Raises:", "Example:")), name


def test_every_parameter_of_convert_is_documented():
    import inspect

    doc = rpsconvert.convert.__doc__
    for name in inspect.signature(rpsconvert.convert).parameters:
        assert f"        {name}:" in doc, name


def test_the_modules_of_the_first_release_still_import():
    from rpsconvert.checkpoint import load as old_load
    from rpsconvert.recovery import recover as old_recover

    assert old_load is rpsconvert.load and old_recover is rpsconvert.recover


def test_densify_gives_back_the_plain_model_with_the_converted_weights():
    original = _mlp()
    converted = convert(original, ratio=0.5)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = converted(x)
        weights = {name: converted.rps.weight(name).clone() for name in converted.rps.weights}
    assert is_converted(converted) and not is_converted(original)
    plain = densify(converted)
    assert plain is converted and not is_converted(plain)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]  # the original classes, not subclasses
    assert list(plain.state_dict()) == list(original.state_dict())
    assert all(torch.equal(plain.get_parameter(name), w) for name, w in weights.items())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)  # same weights, same kernels
    nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).load_state_dict(plain.state_dict(), strict=True)


def test_densify_keeps_tied_weights_tied():
    plain = densify(convert(TiedLM(), ratio=0.5))
    assert plain.head.weight is plain.embed.weight and isinstance(plain.head.weight, nn.Parameter)
    assert type(plain.head) is nn.Linear


def test_a_converted_model_pickles_and_deep_copies(tmp_path):
    converted = convert(TiedLM(), ratio=0.25)
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        expected = converted(tokens)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(converted)
    for other in (again, twin):
        assert is_converted(other) and isinstance(other.head, nn.Linear)
        assert other.rps_pool is not converted.rps_pool and other.rps.pool is other.rps_pool
        with torch.no_grad():
            assert torch.equal(other(tokens), expected)
    with torch.no_grad():
        twin.rps_pool.zero_()  # the copy owns its pool
        assert torch.equal(converted(tokens), expected)


def test_library_errors_name_keyword_arguments_and_the_command_line_names_flags(tmp_path):
    path = save(convert(_mlp(), ratio=0.5), tmp_path / "m.rps.safetensors")
    with pytest.raises(OutputExistsError, match="pass overwrite=True to replace it") as exists:
        save(convert(_mlp(), ratio=0.5), path)
    assert isinstance(exists.value, FileExistsError) and isinstance(exists.value, RPSError)
    assert "pass --force to replace it" in exists.value.for_cli()


def test_a_mapping_with_parameters_is_recorded_in_the_file(tmp_path):
    model = _mlp()
    converted = convert(model, ratio=0.25, mapping=RoastTile(tile=64))
    path = save(converted, tmp_path / "roast64.rps.safetensors")
    manifest = json.loads(safetensors.safe_open(str(path), "pt").metadata()[MANIFEST_KEY])
    assert (manifest["format_version"], manifest["mapping"], manifest["mapping_params"]) == (2, "roast", {"tile": 64})
    loaded = load(path, _mlp())
    assert loaded.rps.mapping == RoastTile(tile=64)
    for name in converted.rps.weights:
        assert torch.equal(loaded.rps.weight(name), converted.rps.weight(name))
    default = save(convert(model, ratio=0.25, mapping="roast"), tmp_path / "roast.rps.safetensors")
    assert json.loads(safetensors.safe_open(str(default), "pt").metadata()[MANIFEST_KEY])["format_version"] == 1


@dataclass(frozen=True)
class Strided:
    """A test mapping: slot = (i * stride + H(seed)) mod m."""

    name: ClassVar[str] = "test-strided"
    stride: int = 7

    def slots(self, start, stop, m, seed, device="cpu"):
        shift = int(hash32(torch.tensor([seed]), 0x1234)[0])
        return (torch.arange(start, stop, device=device) * self.stride + shift) % m


def test_a_registered_mapping_converts_saves_and_loads(tmp_path):
    register_mapping(Strided)  # here, not at import: other test modules list every registered mapping
    try:
        assert Strided.max_slots == 2**32  # stated by no field: a hash word's values
        converted = convert(_mlp(), ratio=0.5, mapping=Strided(stride=3))
        path = save(converted, tmp_path / "strided.rps.safetensors")
        loaded = load(path, _mlp())
        assert loaded.rps.mapping == Strided(stride=3)
        x = torch.randn(4, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), converted(x))
    finally:
        MAPPINGS.pop("test-strided", None)


class Dense(nn.Module):
    """A layer from outside torch.nn, its matrix called `kernel`."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) * 0.1)

    def forward(self, x):
        return x @ self.kernel


class Branchy(nn.Module):
    """Untraceable (data-dependent branch), so discovery falls back to the module scan."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Dense(40, 40), Dense(40, 40)

    def forward(self, x):
        return self.b(self.a(x)) if x.sum() > 0 else self.a(x)


def test_a_registered_layer_kind_is_found_by_the_module_scan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RPSWarning)
        with pytest.raises(ValueError, match="no weight of Branchy can be compressed"):
            convert(Branchy(), ratio=0.5)
        register_layer_kind(Dense, weights=("kernel",))
        try:
            converted = convert(Branchy(), ratio=0.5)
        finally:
            LAYER_KINDS.pop(Dense)
    assert sorted(converted.rps.weights) == ["a.kernel", "b.kernel"]
    assert isinstance(converted.a, Dense)
