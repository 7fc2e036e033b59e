"""From a ResourceClaim to the devices nvdp prepares: checks, this driver's results, NVIDIA's config precedence."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from nvdp.core.dra.claims import ClaimPlan, NodeDevice, plan_claim
from nvdp.core.dra.config import DeviceConfig, Sharing
from nvdp.core.dra.types import ClaimRef
from nvdp.core.inventory import NodeInventory
from tests.dra_fixtures import (
    DEVICES,
    DRIVER,
    GPU0,
    GPU1,
    GPU2,
    MIG,
    MIG_NAME,
    NODE,
    claim,
    gpu_config,
    mig_config,
    opaque,
    result,
)


def ref(uid: str = "u1") -> ClaimRef:
    return ClaimRef(namespace="default", uid=uid, name=f"claim-{uid}")


def plan(body: Any, uid: str = "u1") -> ClaimPlan:
    planned = plan_claim(body, ref(uid), DRIVER, NODE, DEVICES)
    assert isinstance(planned, ClaimPlan), planned
    return planned


def error(body: Any, uid: str = "u1") -> str:
    planned = plan_claim(body, ref(uid), DRIVER, NODE, DEVICES)
    assert isinstance(planned, str), planned
    return planned


def test_a_whole_gpu_claim_plans_its_device_exclusive() -> None:
    planned = plan(claim("u1", [result("gpu-0")]))
    assert [(d.request, d.pool, d.device, d.node_device, d.config) for d in planned.devices] == [
        ("gpu", NODE, "gpu-0", NodeDevice(GPU0), DeviceConfig("GpuConfig"))]


def test_other_drivers_results_and_configs_are_ignored() -> None:
    body = claim("u1", [result("gpu-0"), {**result("nic-0"), "driver": "net.example.com"}],
                 [opaque({"anything": "goes"}, driver="net.example.com")])
    assert [d.device for d in plan(body).devices] == ["gpu-0"]


def test_a_claim_with_another_uid_got_replaced() -> None:
    body = claim("u2", [result("gpu-0")], name="claim-u1")
    assert "claim default/claim-u1 got replaced: its UID is u2, the kubelet asked for u1" in error(body)


def test_a_claim_without_allocation_is_not_allocated() -> None:
    body = claim("u1", [])
    del body["status"]["allocation"]
    assert error(body) == "claim default/claim-u1 not allocated"


def test_a_device_of_another_nodes_pool_is_refused() -> None:
    body = claim("u1", [{**result("gpu-0"), "pool": "node-b"}])
    assert "allocated from pool 'node-b', but this node's pool is 'node-a'" in error(body)


def test_a_device_nvdp_does_not_serve_is_refused() -> None:
    assert "device gpu-9 is not served through DRA on this node" in error(claim("u1", [result("gpu-9")]))


def test_an_unreadable_claim_is_an_error_not_an_exception() -> None:
    assert "unreadable ResourceClaim" in error({"metadata": {"uid": 5}})


def test_request_names_drop_the_subrequest() -> None:
    [device] = plan(claim("u1", [result("gpu-0", request="gpu/large")])).devices
    assert (device.request, device.request_name) == ("gpu/large", "gpu")


def test_share_id_admin_access_and_consumed_capacity_are_kept() -> None:
    body = claim("u1", [result("gpu-0", shareID="s-1", adminAccess=True, consumedCapacity={"memory": "10Gi"})])
    [device] = plan(body).devices
    assert (device.share_id, device.admin_access, device.consumed_capacity) == ("s-1", True, (("memory", "10Gi"),))


TS = Sharing("TimeSlicing", interval="Default")
TS_LONG = Sharing("TimeSlicing", interval="Long")
MPS_ON = "MPS"


@pytest.mark.parametrize(("config", "expected"), [
    pytest.param([], None, id="built-in-default-exclusive"),
    pytest.param([opaque(gpu_config("TimeSlicing"), source="FromClass")], TS, id="class-config"),
    pytest.param([opaque(gpu_config("TimeSlicing"), source="FromClass"), opaque(gpu_config())], None,
                 id="claim-beats-class"),
    pytest.param([opaque(gpu_config()), opaque(gpu_config("TimeSlicing"), source="FromClass")], None,
                 id="claim-beats-class-whatever-the-list-order"),
    pytest.param([opaque(gpu_config("TimeSlicing")), opaque(gpu_config("TimeSlicing",
                                                                       timeSlicingConfig={"interval": "Long"}))],
                 TS_LONG, id="later-beats-earlier"),
    pytest.param([opaque(gpu_config("TimeSlicing"), requests=["gpu"]), opaque(gpu_config())], None,
                 id="later-general-beats-earlier-specific"),
    pytest.param([opaque(gpu_config(), requests=["other"]), opaque(gpu_config("TimeSlicing"), requests=["gpu"]),
                  opaque(gpu_config(), requests=["other"])], TS, id="other-requests-skipped"),
    pytest.param([opaque(gpu_config("TimeSlicing"), requests=["gpu"]), opaque(mig_config("MPS"))], TS,
                 id="general-config-of-the-other-kind-skipped"),
])
def test_config_precedence(config: list[dict[str, Any]], expected: Sharing | None) -> None:
    [device] = plan(claim("u1", [result("gpu-0")], config)).devices
    assert device.config.sharing == expected


def test_a_main_request_config_covers_its_subrequests() -> None:
    body = claim("u1", [result("gpu-0", request="gpu/small")], [opaque(gpu_config("TimeSlicing"), requests=["gpu"])])
    assert plan(body).devices[0].config.sharing == TS


def test_a_request_specific_config_of_the_wrong_kind_is_an_error() -> None:
    body = claim("u1", [result(MIG_NAME)], [opaque(gpu_config("TimeSlicing"), requests=["gpu"])])
    assert f"cannot apply GpuConfig to device '{MIG_NAME}' of type 'mig' (request: gpu)" in error(body)


def test_mig_devices_get_mig_configs_and_gpus_gpu_configs() -> None:
    body = claim("u1", [result("gpu-0"), result(MIG_NAME, request="mig")],
                 [opaque(gpu_config("TimeSlicing")), opaque(mig_config("MPS"))])
    gpu, mig = plan(body).devices
    assert (gpu.config.kind, gpu.config.sharing) == ("GpuConfig", TS)
    assert mig.config.kind == "MigDeviceConfig"
    assert mig.config.sharing is not None and mig.config.sharing.strategy == "MPS"
    assert mig.node_device == NodeDevice(GPU1, MIG)


def test_every_config_of_this_driver_is_decoded_strictly_even_unused() -> None:
    body = claim("u1", [result("gpu-0")], [opaque({**gpu_config(), "extra": 1}, requests=["other"])])
    assert "config[0]: invalid GpuConfig: Object contains unknown field `extra`" in error(body)


def test_only_configs_that_apply_are_validated() -> None:
    # Decodes, but breaks a rule: NVIDIA's driver checks only configs that win for some device.
    unused = opaque(gpu_config("Exclusive"), requests=["other"])
    assert plan(claim("u1", [result("gpu-0")], [unused])).devices[0].config.sharing is None
    assert "unknown GPU sharing strategy: Exclusive" in error(claim("u1", [result("gpu-0")], [{**unused,
                                                                                                "requests": []}]))


def test_config_entries_without_opaque_or_with_a_bad_source_are_errors() -> None:
    assert "only opaque parameters" in error(claim("u1", [result("gpu-0")], [{"source": "FromClaim"}]))
    assert "invalid source 'FromPod'" in error(claim("u1", [result("gpu-0")], [opaque(gpu_config(),
                                                                                       source="FromPod")]))


def test_mps_limits_index_the_config_groups_devices() -> None:
    config = gpu_config("MPS", mpsConfig={"defaultPinnedDeviceMemoryLimit": "2Gi",
                                          "defaultPerDevicePinnedMemoryLimit": {"1": "1Gi"}})
    body = claim("u1", [result("gpu-2"), result("gpu-0")], [opaque(config)])
    limits = {d.device: d.mps_pinned_mib for d in plan(body).devices}
    # Sorted UUIDs: GPU0's, then GPU2's; index 1 is gpu-2.
    assert limits == {"gpu-0": 2048, "gpu-2": 1024}
    assert {d.group for d in plan(body).devices} == {0}


def test_mps_limit_keys_outside_the_group_are_claim_errors() -> None:
    config = gpu_config("MPS", mpsConfig={"defaultPerDevicePinnedMemoryLimit": {"3": "1Gi"}})
    assert "index 3" in error(claim("u1", [result("gpu-0")], [opaque(config)]))


def test_a_claim_with_no_results_for_this_driver_has_no_devices() -> None:
    body = claim("u1", [{**result("nic-0"), "driver": "net.example.com"}])
    assert plan(body).devices == ()


def test_node_device_of_finds_a_mig_devices_parent() -> None:
    inventory = NodeInventory(driver_version="580.95.05", cuda_driver_version=13000, gpus=(GPU0, GPU1, GPU2))
    assert NodeDevice.of(inventory, MIG) == NodeDevice(GPU1, MIG)
    assert NodeDevice.of(inventory, GPU2) == NodeDevice(GPU2)
    assert (NodeDevice(GPU1, MIG).uuid, NodeDevice(GPU1, MIG).kind) == (MIG.uuid, "mig")


def test_a_claim_may_come_as_a_msgspec_struct() -> None:
    class Meta(msgspec.Struct):
        name: str
        namespace: str
        uid: str

    class Claim(msgspec.Struct):
        metadata: Meta
        status: dict[str, Any]

    body = claim("u1", [result("gpu-0")])
    typed = Claim(Meta("claim-u1", "default", "u1"), body["status"])
    assert plan(typed) == plan(body)
