"""The NVML adapter against the fake libnvidia-ml.so.1, through the real pynvml."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest
import trio
import yaml

from nvdp import sim
from nvdp.core.inventory import Gpu, Link, MigDevice
from nvdp.nvml import adapter
from nvdp.sim import SimHandle, SimNode
from tests.harness import LIMIT_S, eventually

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"
GPU2 = "GPU-00000002-aaaa-bbbb-cccc-000000000000"

# GPU 0: MIG on, with a hole at index 1 and two CIs sharing GI 2. GPU 1: plain, NUMA unknown to NVML.
# GPU 2: plain, no event support.
MIG_NODE: dict[str, Any] = {
    "driverVersion": "570.124.06",
    "cudaDriverVersion": 12080,
    "controlDevices": ["/dev/nvidiactl", "/dev/nvidia-uvm"],
    "gpus": [
        {
            "uuid": GPU0,
            "name": "NVIDIA A100-SXM4-80GB",
            "memoryMiB": 81920,
            "computeCapability": "8.0",
            "pciBusId": "00000000:0F:00.0",
            "minorNumber": 4,
            "numaNode": 1,
            "migEnabled": True,
            "migDevices": [
                {"uuid": "MIG-aaaa", "profile": "1g.10gb", "memoryMiB": 9856, "gi": 9, "ci": 0},
                {"uuid": "MIG-bbbb", "profile": "1g.10gb+me", "memoryMiB": 9856, "gi": 10, "ci": 0, "index": 2},
                {"uuid": "MIG-cccc", "profile": "1g.20gb", "memoryMiB": 19968, "gi": 3, "ci": 0, "index": 3},
                {"uuid": "MIG-dddd", "profile": "3g.40gb", "memoryMiB": 40192, "gi": 2, "ci": 0, "index": 4},
                {"uuid": "MIG-eeee", "profile": "3g.40gb", "memoryMiB": 40192, "gi": 2, "ci": 1, "index": 5},
            ],
        },
        {
            "uuid": GPU1,
            "name": "NVIDIA A100-SXM4-80GB",
            "memoryMiB": 81920,
            "computeCapability": "8.0",
            "pciBusId": "00000000:10:00.0",
            "minorNumber": 0,
        },
        {
            "uuid": GPU2,
            "name": "Tesla T4",
            "memoryMiB": 15360,
            "computeCapability": "7.5",
            "pciBusId": "00000001:3B:00.0",
            "minorNumber": 1,
            "numaNode": 0,
            "migCapable": False,
            "eventsSupported": False,
        },
    ],
    "nvlinks": [[0, 1, 4], [1, 0, 2]],
    "topology": [[0, 1, 20], [1, 2, None]],
}


def mig_node(**changes: Any) -> SimNode:
    data = yaml.safe_load(yaml.safe_dump(MIG_NODE))
    for gpu_index, overrides in changes.get("gpus", {}).items():
        data["gpus"][gpu_index].update(overrides)
    data.update({k: v for k, v in changes.items() if k != "gpus"})
    return sim.parse_node(yaml.safe_dump(data), "test-node.yaml")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[SimNode], SimHandle]]:
    """Activates a node and initializes NVML on it; always shuts NVML down afterwards."""
    count = 0

    def _start(node: SimNode) -> SimHandle:
        nonlocal count
        count += 1
        adapter.shutdown()
        handle = sim.activate(node, tmp_path / f"node{count}")
        adapter.init()
        return handle

    yield _start
    adapter.shutdown()


def test_inventory_round_trips_the_yaml(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node())
    inv = adapter.read_inventory(handle.host_root, handle.host_root)
    assert inv.driver_version == "570.124.06"
    assert inv.cuda_driver_version == 12080
    assert [g.uuid for g in inv.gpus] == [GPU0, GPU1, GPU2]
    assert inv.gpus[2] == Gpu(
        index=2,
        uuid=GPU2,
        name="Tesla T4",
        memory_mib=15360,
        minor=1,
        pci_bus_id="00000001:3B:00.0",
        compute_capability="7.5",
        numa_node=0,
        brand="Nvidia",
        architecture="Turing",
        multiprocessors=40,
    )
    assert (inv.gpus[0].mig_capable, inv.gpus[1].mig_capable) == (True, True)
    assert (inv.gpus[0].brand, inv.gpus[0].architecture, inv.gpus[0].multiprocessors) == ("Nvidia", "Ampere", 108)
    assert (inv.gpus[0].minor, inv.gpus[0].numa_node, inv.gpus[0].mig_enabled) == (4, 1, True)
    assert inv.control_devices == ("/dev/nvidiactl", "/dev/nvidia-uvm")
    assert inv.mig_minors["gpu4/gi9/access"] == sim.mig_minor(4, 9)
    assert inv.mig_minors["gpu4/gi2/ci1/access"] == sim.mig_minor(4, 2, 1)


def test_mig_devices_skip_index_holes_and_keep_profile_names(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node())
    migs = adapter.read_inventory(handle.host_root, handle.host_root).gpus[0].mig_devices
    one_slice = {"multiprocessors": 14, "slices_gi": 1, "slices_ci": 1, "copy_engines": 1, "placement_size": 1}
    three = {"multiprocessors": 42, "slices_gi": 3, "slices_ci": 3, "copy_engines": 3, "decoders": 2,
             "gi_profile_id": 0x2, "placement_start": 4, "placement_size": 4}
    assert migs == (
        MigDevice(uuid="MIG-aaaa", index=0, profile="1g.10gb", memory_mib=9856, gi=9, ci=0, **one_slice),
        # +me: the media engines (a decoder, JPEG, OFA); placements packed in list order, aligned to their size.
        MigDevice(uuid="MIG-bbbb", index=2, profile="1g.10gb+me", memory_mib=9856, gi=10, ci=0, gi_profile_id=0x7,
                  placement_start=1, decoders=1, jpeg_engines=1, ofa_engines=1, **one_slice),
        MigDevice(uuid="MIG-cccc", index=3, profile="1g.20gb", memory_mib=19968, gi=3, ci=0, gi_profile_id=0x9,
                  placement_start=2, **one_slice),
        MigDevice(uuid="MIG-dddd", index=4, profile="3g.40gb", memory_mib=40192, gi=2, ci=0, **three),
        MigDevice(uuid="MIG-eeee", index=5, profile="3g.40gb", memory_mib=40192, gi=2, ci=1, **three),
    )


def test_gpu_facts_a_driver_refuses_degrade_to_defaults(start: Callable[[SimNode], SimHandle]) -> None:
    # brand none: the fake answers NOT_SUPPORTED for brand, architecture and the SM count, as an old driver does.
    handle = start(mig_node(gpus={1: {"brand": "none"}, 2: {"multiprocessors": 0}}))
    gpus = adapter.read_inventory(handle.host_root, handle.host_root).gpus
    assert (gpus[1].brand, gpus[1].architecture, gpus[1].multiprocessors) == ("", "", 0)
    assert (gpus[2].brand, gpus[2].architecture, gpus[2].multiprocessors) == ("Nvidia", "Turing", 0)
    assert (gpus[2].mig_capable, gpus[2].mig_enabled) == (False, False)


def test_host_facts_come_from_dmi_and_pci_class(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node(machine="ProLiant XL675d Gen10 Plus", gpus={1: {"pciClass": 0x030000}}))
    gpus = adapter.read_inventory(handle.host_root, handle.host_root).gpus
    facts = adapter.read_host_facts(handle.host_root, Path("/sys/class/dmi/id/product_name"), gpus)
    assert facts.machine == "ProLiant XL675d Gen10 Plus"
    assert dict(facts.pci_classes) == {GPU0: 0x030200, GPU1: 0x030000, GPU2: 0x030200}
    assert adapter.read_host_facts(handle.host_root, Path("/no/such/file"), ()).machine is None


def test_numa_falls_back_to_sysfs(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node())
    sysfs = handle.host_root / "sys/bus/pci/devices/0000:10:00.0/numa_node"
    assert sysfs.read_text() == "-1\n"
    assert adapter.read_inventory(handle.host_root).gpus[1].numa_node is None
    sysfs.write_text("3\n")
    assert adapter.read_inventory(handle.host_root).gpus[1].numa_node == 3
    sysfs.unlink()
    assert adapter.read_inventory(handle.host_root).gpus[1].numa_node is None


def test_links_count_nvlinks_and_topology(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node())
    inv = adapter.read_inventory(handle.host_root)
    assert inv.links == {
        (0, 1): Link(nvlinks=6, pcie_level=20),
        (0, 2): Link(nvlinks=0, pcie_level=50),  # unlisted, NUMA 1 vs 0: across CPUs
        (1, 2): Link(nvlinks=0, pcie_level=None),  # NOT_SUPPORTED
    }
    assert inv.link(1, 0) == Link(nvlinks=6, pcie_level=20)


def test_default_node_links(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(sim.DEFAULT_NODE)
    inv = adapter.read_inventory(handle.host_root)
    assert all(link.nvlinks == 12 for link in inv.links.values())
    assert [inv.link(0, 1).pcie_level, inv.link(2, 3).pcie_level, inv.link(1, 2).pcie_level] == [10, 10, 50]
    assert [g.numa_node for g in inv.gpus] == [0, 0, 1, 1]


def test_fake_follows_nvml_semantics(start: Callable[[SimNode], SimHandle]) -> None:
    start(mig_node())
    gpu0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    t4 = pynvml.nvmlDeviceGetHandleByIndex(2)
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu0, 0)
    assert bool(pynvml.nvmlDeviceIsMigDeviceHandle(mig)) and not bool(pynvml.nvmlDeviceIsMigDeviceHandle(gpu0))
    assert pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)) == GPU0
    assert pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByUUID("MIG-bbbb")) == "MIG-bbbb"
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(pynvml.nvmlDeviceGetHandleByIndex(1)) == 0  # MIG off
    assert pynvml.nvmlDeviceGetMemoryInfo(mig).total == 9856 * 1024 * 1024

    def code(fn: Callable[..., object], *args: object) -> int:
        with pytest.raises(pynvml.NVMLError) as info:
            fn(*args)
        return int(info.value.value)

    assert code(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, gpu0, 1) == pynvml.NVML_ERROR_NOT_FOUND
    assert code(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, gpu0, 7) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle, gpu0) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    # nvml.h documents attributes for MIG handles only; the fake answers a GPU's SM count when the node gives one
    # (as drivers that do answer) and NOT_SUPPORTED otherwise (test_gpu_facts_a_driver_refuses_degrade_to_defaults).
    assert pynvml.nvmlDeviceGetAttributes_v2(gpu0).multiprocessorCount == 108
    assert code(pynvml.nvmlDeviceGetMigMode, t4) == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert code(pynvml.nvmlDeviceGetHandleByIndex, 3) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code(pynvml.nvmlDeviceGetHandleByUUID, "GPU-nope") == pynvml.NVML_ERROR_NOT_FOUND
    assert code(pynvml.nvmlDeviceRegisterEvents, mig, 8, pynvml.nvmlEventSetCreate()) == (
        pynvml.NVML_ERROR_NOT_SUPPORTED
    )
    assert code(pynvml.nvmlDeviceGetMemoryInfo, gpu0, 1) == pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    assert pynvml.nvmlDeviceGetMemoryInfo(gpu0, pynvml.nvmlMemory_v2).total == 81920 * 1024 * 1024
    assert pynvml.nvmlDeviceGetP2PStatus(gpu0, t4, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) != 0
    adapter.shutdown()
    assert code(pynvml.nvmlDeviceGetCount) == pynvml.NVML_ERROR_UNINITIALIZED


def test_init_failure_carries_the_code(start: Callable[[SimNode], SimHandle]) -> None:
    with pytest.raises(adapter.NvmlError) as info:
        start(mig_node(initError=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH))
    assert info.value.code == pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    assert "versions differ" in str(info.value)
    adapter.shutdown()  # idempotent even though init failed
    start(mig_node())  # and a later init works
    assert len(adapter.read_inventory().gpus) == 3


def test_lost_gpu(start: Callable[[SimNode], SimHandle]) -> None:
    start(mig_node(gpus={1: {"lost": True}}))
    # The lost GPU is left out of the inventory; the others are read as usual.
    assert GPU1 not in [g.uuid for g in adapter.read_inventory().gpus]
    assert GPU0 in [g.uuid for g in adapter.read_inventory().gpus]
    with pytest.raises(adapter.NvmlError) as info:
        adapter.probe(GPU1)
    assert info.value.code == pynvml.NVML_ERROR_GPU_IS_LOST
    adapter.probe(GPU0)


def test_gpu_lost_at_runtime_and_recovered(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node())
    adapter.probe(GPU1)
    handle.inject_lost(GPU1)
    with pytest.raises(adapter.NvmlError) as info:
        adapter.probe(GPU1)
    assert info.value.gpu_lost
    with pytest.raises(adapter.NvmlError):
        adapter.probe("GPU-unknown")
    start(mig_node())  # a re-init (driver reload) brings it back
    adapter.probe(GPU1)


def test_compute_mode_changes_are_logged(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node(gpus={1: {"computeMode": 2}}))
    assert adapter.get_compute_mode(GPU1) == pynvml.NVML_COMPUTEMODE_PROHIBITED
    adapter.set_compute_mode(GPU0, pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
    adapter.set_compute_mode(GPU0, pynvml.NVML_COMPUTEMODE_DEFAULT)
    assert adapter.get_compute_mode(GPU0) == pynvml.NVML_COMPUTEMODE_DEFAULT
    with pytest.raises(adapter.NvmlError) as info:
        adapter.set_compute_mode(GPU0, 9)
    assert info.value.code == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert handle.compute_mode_changes() == [(GPU0, 3), (GPU0, 0)]


def test_activate_twice_switches_nodes(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(sim.DEFAULT_NODE)
    assert len(adapter.read_inventory(handle.host_root).gpus) == 4
    handle = start(mig_node())
    inv = adapter.read_inventory(handle.host_root)
    assert [g.uuid for g in inv.gpus] == [GPU0, GPU1, GPU2]
    assert inv.control_devices == ("/dev/nvidiactl", "/dev/nvidia-uvm")


def test_register_needs_supported_events(start: Callable[[SimNode], SimHandle]) -> None:
    start(mig_node())
    with adapter.EventSet() as events:
        with pytest.raises(adapter.NvmlError) as info:
            events.register(GPU2)
        assert info.value.not_supported
        events.register(GPU0)
        assert events.wait(0) is None


async def test_xid_events_reach_a_waiting_thread(start: Callable[[SimNode], SimHandle]) -> None:
    handle = start(mig_node())
    handle.inject_xid(GPU0, 31)  # before registration: history, never delivered
    events = adapter.EventSet()
    events.register(GPU0)
    events.register(GPU1)
    received: list[adapter.XidEvent] = []
    waiting = False
    ticks = 0

    async def wait_for_events() -> None:
        nonlocal waiting
        while len(received) < 4:
            waiting = True
            event = await trio.to_thread.run_sync(events.wait, 5000)  # woken by an event, not by its bound
            waiting = False
            if event is not None:
                received.append(event)

    async def keep_ticking() -> None:
        nonlocal ticks
        while True:
            ticks += waiting
            await trio.sleep(0.001)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_ticking)
            nursery.start_soon(wait_for_events)
            # Trio keeps running while a thread waits with nothing to deliver (the first XID is history).
            await eventually(lambda: ticks >= 5, "trio ticking while the thread waits")
            handle.inject_xid(GPU2, 13)  # not registered on this set
            handle.inject_xid(GPU1, 48)
            handle.inject("ecc " + GPU1)
            handle.inject_xid("MIG-eeee", 94)
            handle.inject("garbage line")
            handle.inject_lost(GPU0)
            await eventually(lambda: len(received) == 4, lambda: received)
            nursery.cancel_scope.cancel()
    events.free()
    events.free()  # idempotent

    xid = adapter.EVENT_XID_CRITICAL
    assert received == [
        adapter.XidEvent(gpu_uuid=GPU1, event_type=xid, xid=48),
        adapter.XidEvent(gpu_uuid=GPU1, event_type=adapter.EVENT_DOUBLE_BIT_ECC, xid=0),
        adapter.XidEvent(gpu_uuid=GPU0, event_type=xid, xid=94, gi=2, ci=1),
        adapter.XidEvent(gpu_uuid=GPU0, event_type=xid, xid=79),  # fell off the bus
    ]


def test_a_driver_without_the_mig_mode_call_means_not_mig_capable(start: Callable[[SimNode], SimHandle],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    handle = start(mig_node())

    def missing(_handle: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigMode", missing)
    gpus = adapter.read_inventory(handle.host_root, handle.host_root).gpus
    assert [(g.mig_capable, g.mig_enabled, g.mig_devices) for g in gpus] == [(False, False, ())] * 3
