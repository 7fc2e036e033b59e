"""The hand-encoded ListAndWatch message is byte-identical to what the generated (betterproto2) code produces."""

from __future__ import annotations

import pytest

from nvdp.core.plan.model import Device, Resource
from nvdp.kubelet.api import v1beta1 as api
from nvdp.kubelet.plugin_server import DeviceListEncoder, list_and_watch_response


def device(device_id: str, numa: int | None) -> Device:
    return Device(id=device_id, physical_id=device_id, index="0", gpu_uuid=device_id, gpu_index=0,
                  paths=("/dev/nvidia0",), numa_node=numa)


@pytest.mark.parametrize(
    "numa",
    [pytest.param(None, id="no topology"), pytest.param(0, id="NUMA 0 (a zero proto3 omits)"),
     pytest.param(1, id="NUMA 1"), pytest.param(300, id="NUMA 300 (a two-byte varint)")],
)
@pytest.mark.parametrize(
    "device_id",
    [pytest.param("GPU-00000000-aaaa-bbbb-cccc-000000000000", id="a GPU UUID"),
     pytest.param("MIG-" + "x" * 200 + "::47", id="an ID longer than 127 bytes"),
     pytest.param("GPU-é", id="a non-ASCII ID")],
)
def test_one_device_matches_the_generated_encoding(device_id: str, numa: int | None) -> None:
    resource = Resource("nvidia.com/gpu", (device(device_id, numa),))
    for unhealthy in ({}, {device_id: "XID 48"}):
        assert DeviceListEncoder(resource).encode(unhealthy) == bytes(list_and_watch_response(resource, unhealthy))


def test_a_large_list_with_some_unhealthy_devices_matches_and_decodes() -> None:
    devices = tuple(device(f"GPU-{g}::{r}", g // 4) for g in range(8) for r in range(48))
    resource = Resource("nvidia.com/gpu", devices)
    encoder = DeviceListEncoder(resource)
    unhealthy = {d.id: "XID 79" for d in devices[48:96]}
    data = encoder.encode(unhealthy)
    assert data == bytes(list_and_watch_response(resource, unhealthy))
    decoded = api.ListAndWatchResponse.parse(data)
    assert [d.health for d in decoded.devices].count("Unhealthy") == 48
    # Health back to normal: the cached healthy entries again.
    assert encoder.encode({}) == bytes(list_and_watch_response(resource, {}))
