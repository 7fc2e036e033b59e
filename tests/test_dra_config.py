"""Opaque configs of NVIDIA's DRA driver (`resource.nvidia.com/v1beta1`): strict decoding, normalisation, rules."""

from __future__ import annotations

from typing import Any

import pytest

from nvdp.core.dra.config import (
    DeviceConfig,
    DeviceConfigError,
    MpsSettings,
    Sharing,
    decode_config,
    normalize_config,
    parse_quantity,
    pinned_limits,
)

V = "resource.nvidia.com/v1beta1"


def config(parameters: dict[str, Any]) -> DeviceConfig:
    return normalize_config(decode_config(parameters))


@pytest.mark.parametrize(("parameters", "expected"), [
    pytest.param({"apiVersion": V, "kind": "GpuConfig"}, DeviceConfig("GpuConfig"), id="gpu-exclusive"),
    pytest.param({"apiVersion": V, "kind": "MigDeviceConfig"}, DeviceConfig("MigDeviceConfig"), id="mig-exclusive"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "sharing": {"strategy": "TimeSlicing"}},
                 DeviceConfig("GpuConfig", Sharing("TimeSlicing", interval="Default")),
                 id="time-slicing-defaults-to-Default"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig",
                  "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}},
                 DeviceConfig("GpuConfig", Sharing("TimeSlicing", interval="Long")), id="time-slicing-long"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig",
                  "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {}}},
                 DeviceConfig("GpuConfig", Sharing("TimeSlicing", interval="Default")), id="time-slicing-empty"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "sharing": {"strategy": "MPS"}},
                 DeviceConfig("GpuConfig", Sharing("MPS", mps=MpsSettings())), id="mps-defaults-to-empty"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "sharing": {"strategy": "MPS", "mpsConfig": {
        "defaultActiveThreadPercentage": 50, "defaultPinnedDeviceMemoryLimit": "10Gi",
        "defaultPerDevicePinnedMemoryLimit": {"0": "512Mi", "GPU-b": 1073741824}}}},
                 DeviceConfig("GpuConfig", Sharing("MPS", mps=MpsSettings(50, 10240, (("0", 512), ("GPU-b", 1024))))),
                 id="mps-limits"),
    pytest.param({"apiVersion": V, "kind": "MigDeviceConfig", "sharing": {"strategy": "MPS", "mpsConfig": {
        "defaultActiveThreadPercentage": 0, "multiUser": False}}},
                 DeviceConfig("MigDeviceConfig", Sharing("MPS", mps=MpsSettings(0))), id="mig-mps"),
    pytest.param({"apiVersion": V, "kind": "MigDeviceConfig", "sharing": {"strategy": "TimeSlicing"}},
                 DeviceConfig("MigDeviceConfig", Sharing("TimeSlicing", interval="Default")), id="mig-time-slicing"),
])
def test_valid_configs_normalise(parameters: dict[str, Any], expected: DeviceConfig) -> None:
    assert config(parameters) == expected


@pytest.mark.parametrize(("parameters", "message"), [
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "sharing": {"strategy": "MPS", "mpsConfig": {"foo": 1}}},
                 "Object contains unknown field `foo` - at `$.sharing.mpsConfig`", id="unknown-field-path"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "sharing": {"strategy": "TimeSlicing", "interval": "Long"}},
                 "unknown field `interval` - at `$.sharing`", id="interval-misplaced"),
    pytest.param({"apiVersion": V, "kind": "MigDeviceConfig",
                  "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {}}},
                 "unknown field `timeSlicingConfig` - at `$.sharing`", id="mig-has-no-time-slicing-config"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "Sharing": {}},
                 "unknown field `Sharing`", id="keys-are-case-sensitive"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "sharing": {}},
                 "missing required field `strategy` - at `$.sharing`", id="strategy-required"),
    pytest.param({"apiVersion": V, "kind": "GpuConfig", "sharing": {"strategy": "MPS", "mpsConfig": {
        "defaultActiveThreadPercentage": "50"}}},
                 "got `str` - at `$.sharing.mpsConfig.defaultActiveThreadPercentage`", id="wrong-type"),
    pytest.param({"apiVersion": "resource.nvidia.com/v1", "kind": "GpuConfig"}, "unsupported apiVersion",
                 id="wrong-api-version"),
    pytest.param({"apiVersion": V, "kind": "TpuConfig"}, "unknown kind 'TpuConfig'", id="unknown-kind"),
    pytest.param({"apiVersion": V, "kind": "VfioDeviceConfig"}, "VfioDeviceConfig is not supported",
                 id="vfio-refused-by-name"),
    pytest.param(["GpuConfig"], "parameters must be an object", id="not-an-object"),
])
def test_decoding_is_strict_and_names_the_path(parameters: Any, message: str) -> None:
    with pytest.raises(DeviceConfigError) as raised:
        config(parameters)
    assert message in str(raised.value)


@pytest.mark.parametrize(("sharing", "message"), [
    pytest.param({"strategy": "Exclusive"}, "unknown GPU sharing strategy: Exclusive", id="unknown-strategy"),
    pytest.param({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}},
                 "unknown time-slice interval: Forever", id="unknown-interval"),
    pytest.param({"strategy": "TimeSlicing", "mpsConfig": {}}, "cannot use mpsConfig with the 'TimeSlicing'",
                 id="mps-config-under-time-slicing"),
    pytest.param({"strategy": "MPS", "timeSlicingConfig": {}}, "cannot use timeSlicingConfig with the 'MPS'",
                 id="time-slicing-config-under-mps"),
    pytest.param({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 101}},
                 "must not be greater than 100", id="percentage-over-100"),
    pytest.param({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": -1}}, "must not be negative",
                 id="percentage-negative"),
    pytest.param({"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "10Gb"}},
                 "invalid limit: defaultPinnedDeviceMemoryLimit: quantities must match", id="bad-quantity"),
    pytest.param({"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "1000Ki"}},
                 "value set too low", id="limit-under-1Mi"),
    pytest.param({"strategy": "MPS", "mpsConfig": {"defaultPerDevicePinnedMemoryLimit": {"0": "x"}}},
                 "defaultPerDevicePinnedMemoryLimit[0]", id="bad-per-device-quantity"),
    pytest.param({"strategy": "MPS", "mpsConfig": {"multiUser": True}}, "multiUser is not supported",
                 id="multi-user-cannot-be-applied"),
])
def test_rules_of_nvidias_driver(sharing: dict[str, Any], message: str) -> None:
    with pytest.raises(DeviceConfigError) as raised:
        config({"apiVersion": V, "kind": "GpuConfig", "sharing": sharing})
    assert message in str(raised.value)


@pytest.mark.parametrize(("text", "value"), [
    ("1Gi", 1 << 30), ("512Mi", 512 << 20), ("1.5Gi", 3 << 29), ("2G", 2 * 10**9), ("1e3", 1000), ("1E3", 1000),
    ("1E", 10**18), ("0.5", 1), ("100m", 1), ("+4k", 4000), ("-1Ki", -1024), (1073741824, 1 << 30), (0.5, 1),
    (".5Ki", 512),
])
def test_quantities_parse_as_kubernetes_does(text: str | int | float, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1 Gi", "1GB", "1.2.3", "0x10", "1e", "1Mi5", True, "9" * 65, "1e99"])
def test_bad_quantities_are_refused(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


def test_pinned_limits_resolve_uuids_and_sorted_indices() -> None:
    mps = MpsSettings(pinned_memory_limit_mib=100, per_device_pinned_mib=(("1", 7), ("GPU-a", 5)))
    # Indices count the group's UUIDs in sorted order (as NVIDIA's driver), not the order they came in.
    assert pinned_limits(mps, ["GPU-c", "GPU-a", "GPU-b"]) == {"GPU-a": 5, "GPU-b": 7, "GPU-c": 100}


def test_pinned_limits_without_a_default_only_cover_named_devices() -> None:
    assert pinned_limits(MpsSettings(per_device_pinned_mib=(("0", 3),)), ["GPU-b", "GPU-a"]) == {"GPU-a": 3}


@pytest.mark.parametrize(("key", "message"), [("2", "index 2"), ("GPU-z", "neither a UUID"), ("-1", "neither")])
def test_pinned_limits_refuse_unknown_devices(key: str, message: str) -> None:
    with pytest.raises(DeviceConfigError, match=message):
        pinned_limits(MpsSettings(per_device_pinned_mib=((key, 3),)), ["GPU-a", "GPU-b"])
