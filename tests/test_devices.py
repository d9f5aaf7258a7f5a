"""Tests for awq_edge.engine.devices: shipped profiles, validation errors, lookup, the listing."""

import tomllib
from pathlib import Path

import pytest

from awq_edge.cli import main
from awq_edge.engine import devices
from awq_edge.errors import AwqEdgeError

DEVICES_DIR = Path(__file__).resolve().parents[1] / "devices"
TARGETS = ("jetson-agx-orin-64gb", "jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb",
           "rtx-3090", "rtx-4090", "rtx-5090", "h100")


def _valid() -> dict:
    return tomllib.loads((DEVICES_DIR / "jetson-orin-nano-8gb.toml").read_text())


def test_every_target_of_the_issue_ships_a_valid_profile():
    profiles = devices.load_profiles()
    assert set(TARGETS) <= set(profiles)


def test_jetsons_are_sm87_built_on_device_and_rtx_cards_use_tensorrt_rtx():
    profiles = devices.load_profiles()
    for name, p in profiles.items():
        if p.family == "jetson":
            assert (p.sm, p.tensorrt) == (87, "tensorrt"), name
        if p.family == "rtx":
            assert p.tensorrt == "tensorrt_rtx" and p.compute_capability in devices.RTX_COMPUTE_CAPABILITIES, name


def test_lookup_by_alias_and_by_path(tmp_path):
    assert devices.get_profile("jetson-orin").name == "jetson-agx-orin-64gb"
    custom = tmp_path / "my-orin.toml"
    custom.write_text((DEVICES_DIR / "jetson-orin-nano-8gb.toml").read_text())
    assert devices.get_profile(str(custom)).name == "my-orin"


def test_unknown_device_error_lists_the_known_ones():
    with pytest.raises(AwqEdgeError, match="unknown device 'jetson-tx2'") as e:
        devices.get_profile("jetson-tx2")
    assert "rtx-4090" in e.value.fix


@pytest.mark.parametrize("change, message", [
    ({"memory_gb": 8}, "unknown key"),
    ({"compute_capability": 8.7}, "not 'major.minor'"),
    ({"tensorrt": "tensorrt_llm"}, "tensorrt = 'tensorrt_llm' is not one of"),
    ({"max_seq_len": -1}, "max_seq_len = -1 is not a positive number"),
    ({"kv_cache_mib": 1.5}, "kv_cache_mib = 1.5 is not an integer"),
    ({"prefill_tokens": 99999}, "prefill_tokens 99999 exceeds max_seq_len"),
    ({"tensorrt": "tensorrt_rtx"}, "TensorRT-RTX cannot build for compute capability 8.7"),
    ({"int4_matmul": "gemv"}, "int4_matmul = 'gemv' is not one of"),
])
def test_bad_profiles_are_refused_with_the_key_named(change, message):
    with pytest.raises(AwqEdgeError, match=message):
        devices.parse_profile("x", {**_valid(), **change}, "x.toml")


def test_missing_key_is_named():
    data = _valid()
    del data["workspace_mib"]
    with pytest.raises(AwqEdgeError, match=r"missing key\(s\) \['workspace_mib'\]"):
        devices.parse_profile("x", data, "x.toml")


def test_broken_toml_file_gives_one_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("family = \n")
    with pytest.raises(AwqEdgeError, match="is not valid TOML"):
        devices.load_profile_file(bad)


def test_devices_command_lists_every_profile(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in TARGETS:
        assert name in out


def test_devices_command_prints_one_field_of_an_alias_for_scripts(capsys):
    assert main(["devices", "jetson-orin", "--field", "name"]) == 0
    assert main(["devices", "rtx-4090", "--field", "int4_matmul,tensorrt,sm"]) == 0
    assert capsys.readouterr().out.splitlines() == ["jetson-agx-orin-64gb", "native tensorrt_rtx 89"]


def test_devices_command_refuses_an_unknown_field(capsys):
    assert main(["devices", "h100", "--field", "memory"]) == 2
    assert "no field 'memory'" in capsys.readouterr().err
