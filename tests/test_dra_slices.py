"""The DRA devices and ResourceSlices nvdp publishes (pure core): names and attributes as NVIDIA's driver, the API's
limits, taints, and what to write to converge."""

from __future__ import annotations

import dataclasses

import pytest

from nvdp.core.dra.devices import (
    ALL_GPUS,
    HealthFact,
    build_devices,
    check_device,
    cuda_version_text,
    mig_profile_label,
    pci_bus_id,
    semver,
)
from nvdp.core.dra.slices import (
    INDEX_LABEL,
    Pool,
    SliceState,
    build_slices,
    plan_sync,
    split,
)
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory

POOL = Pool("node-1", "uid-node-1", "gpu.nvidia.com")


def gpu(i: int, **kw: object) -> Gpu:
    base = dict(index=i, uuid=f"GPU-{i:04d}", name="NVIDIA A100-SXM4-40GB", memory_mib=40960, minor=i,
                pci_bus_id=f"00000000:{7 + i:02X}:00.0", compute_capability="8.0", numa_node=i // 2,
                brand="Nvidia", architecture="Ampere", multiprocessors=108)
    base.update(kw)
    return Gpu(**base)  # type: ignore[arg-type]


def two_gpu_node() -> NodeInventory:
    return NodeInventory("580.82.07", 13000, (gpu(0), gpu(1)))


def mig(uuid: str, profile: str, gi: int, ci: int, gi_profile_id: int, start: int, size: int, mem: int) -> MigDevice:
    return MigDevice(uuid=uuid, index=gi, profile=profile, memory_mib=mem, gi=gi, ci=ci,
                     gi_profile_id=gi_profile_id, placement_start=start, placement_size=size, multiprocessors=14,
                     slices_gi=1, slices_ci=1, copy_engines=1, decoders=0, encoders=0, jpeg_engines=0,
                     ofa_engines=0)


def mig_node() -> NodeInventory:
    migs = (mig("MIG-a", "1g.5gb", 7, 0, 19, 0, 1, 4864), mig("MIG-b", "1g.10gb+me", 9, 0, 20, 4, 2, 9856),
            mig("MIG-c", "3g.20gb", 1, 0, 9, 4, 4, 19968))
    return NodeInventory("580.82.07", 12080, (gpu(0, mig_enabled=True, mig_capable=True, minor=3,
                                                  mig_devices=migs[:2]), gpu(1)))


def test_two_gpu_node_devices_as_nvidias_driver_names_them() -> None:
    devices = build_devices(two_gpu_node(), {"GPU-0000", "GPU-0001"})
    assert devices.problems == ()
    assert [d.name for d in devices.devices] == ["gpu-0", "gpu-1"]
    first = devices.devices[0].api
    assert first == {
        "name": "gpu-0",
        "attributes": {
            "architecture": {"string": "Ampere"},
            "brand": {"string": "Nvidia"},
            "cudaComputeCapability": {"version": "8.0.0"},
            "cudaDriverVersion": {"version": "13.0.0"},
            "driverVersion": {"version": "580.82.7"},
            "productName": {"string": "NVIDIA A100-SXM4-40GB"},
            "resource.kubernetes.io/numaNode": {"int": 0},
            "resource.kubernetes.io/pciBusID": {"string": "0000:07:00.0"},
            "type": {"string": "gpu"},
            "uuid": {"string": "GPU-0000"},
        },
        "capacity": {"memory": {"value": "40Gi"}},
    }
    assert all(check_device(d.api) == [] for d in devices.devices)


def test_only_the_served_gpus_and_the_pcie_root_when_known() -> None:
    devices = build_devices(two_gpu_node(), {"GPU-0001"}, pcie_roots={"0000:08:00.0": "pci0000:00"})
    assert [d.name for d in devices.devices] == ["gpu-1"]
    assert devices.devices[0].api["attributes"]["resource.kubernetes.io/pcieRoot"] == {"string": "pci0000:00"}


def test_mig_node_publishes_mig_devices_and_not_their_parent() -> None:
    devices = build_devices(mig_node(), {"GPU-0000", "GPU-0001"})
    assert [d.name for d in devices.devices] == ["gpu-1", "gpu-3-mig-1g5gb-19-0", "gpu-3-mig-1g10gb-me-20-4"]
    me = devices.devices[2].api
    assert me["attributes"]["type"] == {"string": "mig"}
    assert me["attributes"]["uuid"] == {"string": "MIG-b"}
    assert me["attributes"]["parentUUID"] == {"string": "GPU-0000"}
    assert me["attributes"]["profile"] == {"string": "1g.10gb+me"}
    assert me["attributes"]["cudaDriverVersion"] == {"version": "12.8.0"}
    assert me["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": "0000:07:00.0"}
    assert me["capacity"] == {
        "copyEngines": {"value": "1"}, "decoders": {"value": "0"}, "encoders": {"value": "0"},
        "jpegEngines": {"value": "0"}, "memory": {"value": "9856Mi"}, "memorySlice4": {"value": "1"},
        "memorySlice5": {"value": "1"}, "multiprocessors": {"value": "14"}, "ofaEngines": {"value": "0"},
    }
    assert devices.devices[2].placement == (9, 0)
    assert all(check_device(d.api) == [] for d in devices.devices)


@pytest.mark.parametrize(("raw", "expected"), [
    ("8.0", "8.0.0"), ("580.95.05", "580.95.5"), ("12", "12.0.0"), ("535.104.05", "535.104.5"),
    ("1.2.3.4", None), ("12.8-beta", None), ("", None), ("abc", None), ("007.0.0", "7.0.0"),
])
def test_semver_normalisation(raw: str, expected: str | None) -> None:
    assert semver(raw) == expected


def test_small_conversions() -> None:
    assert cuda_version_text(12080) == "12.8.0"
    assert cuda_version_text(13000) == "13.0.0"
    assert pci_bus_id("00000000:4E:00.0") == "0000:4e:00.0"
    assert pci_bus_id("0000:4e:00.1") == "0000:4e:00.1"
    assert pci_bus_id("bogus") is None
    assert mig_profile_label("1g.10gb+me") == "1g10gb-me"
    assert mig_profile_label("7g.80gb") == "7g80gb"


def test_limits_long_strings_cut_bad_versions_and_bus_ids_left_out_and_reported() -> None:
    node = NodeInventory("580.82.07-open", 13000, (gpu(0, name="X" * 100, pci_bus_id="weird"),))
    devices = build_devices(node, {"GPU-0000"})
    attributes = devices.devices[0].api["attributes"]
    assert attributes["productName"] == {"string": "X" * 64}
    assert "driverVersion" not in attributes
    assert "resource.kubernetes.io/pciBusID" not in attributes
    assert any("driverVersion" in p for p in devices.problems)
    assert any("PCI bus ID" in p for p in devices.problems)
    assert check_device(devices.devices[0].api) == []


def test_check_device_catches_what_the_api_server_would_refuse() -> None:
    bad = {"name": "GPU_0", "attributes": {f"a{i}": {"int": i} for i in range(33)} | {"s": {"string": "x" * 65}},
           "taints": [{"key": "nokey", "effect": "Sometimes"}]}
    problems = check_device(bad)
    assert any("DNS label" in p for p in problems)
    assert any("attributes and capacities" in p for p in problems)
    assert any("longer than 64" in p for p in problems)
    assert any("taint key" in p for p in problems)
    assert any("taint effect" in p for p in problems)


def test_bad_driver_name_is_refused() -> None:
    with pytest.raises(ValueError, match="DNS subdomain"):
        build_devices(two_gpu_node(), {"GPU-0000"}, driver="Not_A_Name")
    with pytest.raises(ValueError, match="node name"):
        Pool("Node_1", "uid", "gpu.nvidia.com")


def test_taints_from_health_facts() -> None:
    facts = [HealthFact("GPU-0000", xid=48), HealthFact("GPU-0001", lost=True),
             HealthFact("GPU-0000", xid=94, fatal=False)]
    devices = build_devices(two_gpu_node(), {"GPU-0000", "GPU-0001"}, facts=facts)
    assert devices.devices[0].api["taints"] == [
        {"key": "gpu.nvidia.com/xid", "value": "48", "effect": "NoSchedule"},
        {"key": "gpu.nvidia.com/xid", "value": "94", "effect": "None"},
    ]
    assert devices.devices[1].api["taints"] == [{"key": "gpu.nvidia.com/gpu-lost", "effect": "NoSchedule"}]
    assert all(check_device(d.api) == [] for d in devices.devices)
    # Recovery: no facts, no taints key at all.
    assert "taints" not in build_devices(two_gpu_node(), {"GPU-0000"}).devices[0].api


def test_a_mig_fault_taints_its_own_device_a_gpu_fault_all_on_the_gpu() -> None:
    on_one = build_devices(mig_node(), {"GPU-0000"}, facts=[HealthFact("GPU-0000", placement=(9, 0), xid=31)])
    assert [bool(d.tainted) for d in on_one.devices] == [False, True]
    on_all = build_devices(mig_node(), {"GPU-0000"}, facts=[HealthFact("GPU-0000", xid=79, lost=True)])
    assert all(d.tainted for d in on_all.devices)


def test_a_node_wide_fact_taints_every_device() -> None:
    from nvdp.core.health.tracker import ALL_GPUS as TRACKER_ALL_GPUS

    facts = [HealthFact(ALL_GPUS, unmonitored=True)]
    devices = build_devices(mig_node(), {"GPU-0000", "GPU-0001"}, facts=facts)
    assert all(d.api["taints"] == [{"key": "gpu.nvidia.com/unmonitored", "effect": "None"}] for d in devices.devices)
    assert ALL_GPUS == TRACKER_ALL_GPUS


def test_taints_capped_at_16_keeping_gpu_lost() -> None:
    facts = [HealthFact("GPU-0000", xid=x) for x in range(20)] + [HealthFact("GPU-0000", lost=True)]
    devices = build_devices(two_gpu_node(), {"GPU-0000"}, facts=facts)
    taints = devices.devices[0].api["taints"]
    assert len(taints) == 16
    assert taints[0]["key"] == "gpu.nvidia.com/gpu-lost"
    assert [t["value"] for t in taints[1:]] == [str(x) for x in range(15)]
    assert devices.problems


def fake_devices(count: int, tainted: set[int] = frozenset()) -> list[dict]:  # type: ignore[assignment]
    out = []
    for i in range(count):
        d: dict = {"name": f"gpu-{i}", "attributes": {"type": {"string": "gpu"}}}
        if i in tainted:
            d["taints"] = [{"key": "gpu.nvidia.com/xid", "value": "48", "effect": "NoSchedule"}]
        out.append(d)
    return out


def test_300_devices_split_into_three_slices_of_one_pool() -> None:
    slices = build_slices(POOL, fake_devices(300), generation=4)
    assert [len(s["spec"]["devices"]) for s in slices] == [128, 128, 44]
    for i, s in enumerate(slices):
        assert s["spec"]["pool"] == {"name": "node-1", "generation": 4, "resourceSliceCount": 3}
        assert s["spec"]["nodeName"] == "node-1"
        assert s["spec"]["driver"] == "gpu.nvidia.com"
        assert s["metadata"]["labels"][INDEX_LABEL] == str(i)
        assert s["metadata"]["generateName"] == f"0000{i}-gpu.nvidia.com-node-1-"
        assert s["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": "uid-node-1", "controller": True}]
    names = [d["name"] for s in slices for d in s["spec"]["devices"]]
    assert names == [f"gpu-{i}" for i in range(300)]


def test_tainted_devices_shrink_a_slice_to_64() -> None:
    assert [len(c) for c in split(fake_devices(130, tainted={0}))] == [64, 66]
    assert [len(c) for c in split(fake_devices(200, tainted={150}))] == [128, 64, 8]
    assert [len(c) for c in split([])] == [0]


def states(slices: list[dict], start: int = 1) -> list[SliceState]:
    return [SliceState(f"s{i}", f"u{i}", str(start + i), s["metadata"]["labels"], s["spec"])
            for i, s in enumerate(slices)]


def test_plan_first_publish_creates_every_slice_at_generation_1() -> None:
    plan = plan_sync(POOL, fake_devices(300), [], generation=0)
    assert plan.generation == 1
    assert [c.index for c in plan.creates] == [0, 1, 2]
    assert not plan.updates and not plan.deletes
    assert all(c.body["spec"]["pool"]["generation"] == 1 for c in plan.creates)


def test_plan_nothing_to_do_when_in_sync_even_with_server_set_taint_times() -> None:
    devices = fake_devices(3, tainted={1})
    there = build_slices(POOL, devices, 7)
    there[0]["spec"]["devices"][1]["taints"][0]["timeAdded"] = "2026-12-06T10:00:00Z"
    plan = plan_sync(POOL, devices, states(there), generation=0)
    assert plan.in_sync and plan.generation == 7


def test_plan_a_change_rewrites_every_slice_under_a_new_generation() -> None:
    there = build_slices(POOL, fake_devices(300), 3)
    plan = plan_sync(POOL, fake_devices(299), states(there), generation=3)
    assert plan.generation == 4
    assert [u.name for u in plan.updates] == ["s0", "s1", "s2"]
    assert all(u.body["spec"]["pool"]["generation"] == 4 for u in plan.updates)
    assert plan.updates[0].body["metadata"]["resourceVersion"] == "1"
    assert "generateName" not in plan.updates[0].body["metadata"]


def test_plan_an_update_keeps_the_time_a_taint_was_added() -> None:
    there = build_slices(POOL, fake_devices(3, tainted={1}), 7)
    there[0]["spec"]["devices"][1]["taints"][0]["timeAdded"] = "2026-12-06T10:00:00Z"
    plan = plan_sync(POOL, fake_devices(3, tainted={1, 2}), states(there), generation=7)
    devices = plan.updates[0].body["spec"]["devices"]
    assert devices[1]["taints"][0]["timeAdded"] == "2026-12-06T10:00:00Z"
    assert "timeAdded" not in devices[2]["taints"][0]


def test_plan_shrinking_pool_deletes_surplus_and_duplicates() -> None:
    there = states(build_slices(POOL, fake_devices(300), 3))
    duplicate = dataclasses.replace(there[0], name="s9", uid="u9")
    other_pool = SliceState("x", "ux", "5", {INDEX_LABEL: "0"},
                            {"driver": "gpu.nvidia.com", "nodeName": "node-2", "pool": {"name": "node-2"}})
    plan = plan_sync(POOL, fake_devices(10), [*there, duplicate, other_pool], generation=3)
    assert plan.generation == 4
    # Of two copies of part 0 one is kept (the later name at equal generation), the other deleted.
    assert [d.name for d in plan.deletes] == ["s0", "s1", "s2", "x"]
    assert [u.name for u in plan.updates] == ["s9"] and not plan.creates
    assert plan.updates[0].body["spec"]["pool"]["resourceSliceCount"] == 1


def test_plan_after_a_wipe_recreates_with_a_higher_generation_than_ever_written() -> None:
    plan = plan_sync(POOL, fake_devices(2), [], generation=5)
    assert plan.generation == 6 and len(plan.creates) == 1


def test_plan_half_written_pool_is_completed_under_a_newer_generation() -> None:
    there = build_slices(POOL, fake_devices(200), 2)
    there[1]["spec"]["pool"]["generation"] = 3  # a previous sync stopped after one update
    plan = plan_sync(POOL, fake_devices(200), states(there), generation=3)
    assert plan.generation == 4 and len(plan.updates) == 2


def test_an_empty_pool_is_still_one_slice() -> None:
    plan = plan_sync(POOL, [], [], generation=0)
    assert len(plan.creates) == 1 and plan.creates[0].body["spec"]["devices"] == []
