"""The resource plan: whole GPUs and the three MIG strategies (pure, over plain inventories)."""

from __future__ import annotations

import random

import pytest

from nvdp.core.config.settings import Settings
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.build import PlanError, build_plan

A100 = "GPU-a100-0000"
H100 = "GPU-h100-0001"


def a100_mig(**overrides: object) -> Gpu:
    fields: dict[str, object] = dict(
        index=0, uuid=A100, name="NVIDIA A100-SXM4-40GB", memory_mib=40960, minor=0,
        pci_bus_id="00000000:10:00.0", compute_capability="8.0", numa_node=0, mig_enabled=True,
        mig_devices=(
            MigDevice("MIG-a", 0, "1g.5gb", 4864, gi=7, ci=0),
            MigDevice("MIG-b", 1, "1g.5gb", 4864, gi=8, ci=0),
            MigDevice("MIG-c", 2, "2g.10gb", 9856, gi=3, ci=0),
        ),
    )
    fields.update(overrides)
    return Gpu(**fields)  # type: ignore[arg-type]


def h100(index: int = 1, minor: int = 1) -> Gpu:
    return Gpu(index, H100, "NVIDIA H100 80GB HBM3", 81559, minor, "00000000:20:00.0", "9.0", numa_node=1)


MINORS = {"gpu0/gi7/access": 66, "gpu0/gi7/ci0/access": 67, "gpu0/gi8/access": 75, "gpu0/gi8/ci0/access": 76,
          "gpu0/gi3/access": 30, "gpu0/gi3/ci0/access": 31}


def node(*gpus: Gpu, minors: dict[str, int] | None = None) -> NodeInventory:
    return NodeInventory("580.82.07", 13000, tuple(gpus), mig_minors=MINORS if minors is None else minors,
                         control_devices=("/dev/nvidiactl",))


def counts(inventory: NodeInventory, **settings: object) -> dict[str, int]:
    plan = build_plan(inventory, Settings(**settings))  # type: ignore[arg-type]
    return {r.name: len(r.devices) for r in plan.resources}


def test_whole_gpus_are_one_resource_ordered_by_index() -> None:
    gpus = [h100(index=i, minor=7 - i) for i in range(4)]
    gpus = [Gpu(g.index, f"GPU-{g.index}", g.name, g.memory_mib, g.minor, g.pci_bus_id, g.compute_capability)
            for g in gpus]
    random.Random(1).shuffle(gpus)
    plan = build_plan(node(*gpus), Settings())
    (resource,) = plan.resources
    assert resource.name == "nvidia.com/gpu" and resource.socket_name == "nvidia-gpu.sock"
    assert [d.id for d in resource.devices] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    # The device node follows the minor number, not the index.
    assert [d.paths for d in resource.devices] == [("/dev/nvidia7",), ("/dev/nvidia6",), ("/dev/nvidia5",),
                                                  ("/dev/nvidia4",)]


def test_a_node_without_gpus_advertises_nothing() -> None:
    assert build_plan(node(), Settings()).resources == ()


def test_mixed_strategy_gives_one_resource_per_profile_and_keeps_whole_gpus() -> None:
    assert counts(node(a100_mig(), h100()), mig_strategy="mixed") == {
        "nvidia.com/gpu": 1, "nvidia.com/mig-1g.5gb": 2, "nvidia.com/mig-2g.10gb": 1}


def test_none_strategy_advertises_mig_enabled_gpus_whole() -> None:
    assert counts(node(a100_mig(), h100()), mig_strategy="none") == {"nvidia.com/gpu": 2}


def test_single_strategy_advertises_mig_devices_as_gpu() -> None:
    uniform = a100_mig(mig_devices=(MigDevice("MIG-a", 0, "1g.5gb", 4864, 7, 0),
                                    MigDevice("MIG-b", 1, "1g.5gb", 4864, 8, 0)))
    plan = build_plan(node(uniform), Settings(mig_strategy="single"))
    assert [(d.id, d.index) for d in plan.resources[0].devices] == [("MIG-a", "0:0"), ("MIG-b", "0:1")]


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        pytest.param((a100_mig(), h100()), "invalid MIG configuration: more than one MIG device type present on node",
                     id="single refuses two profiles"),
        pytest.param((a100_mig(mig_devices=()),), "device 0 (GPU-a100-0000) has no MIG devices configured",
                     id="single refuses a MIG-enabled GPU without MIG devices"),
        pytest.param((a100_mig(mig_devices=(MigDevice("MIG-a", 0, "1g.5gb", 4864, 7, 0),)), h100()),
                     "all devices on the node must be configured with the same migEnabled value",
                     id="single refuses MIG and whole GPUs mixed"),
    ],
)
def test_single_strategy_refusals_use_upstream_messages(gpus: tuple[Gpu, ...], message: str) -> None:
    with pytest.raises(PlanError) as error:
        build_plan(node(*gpus), Settings(mig_strategy="single"))
    assert message in str(error.value)


def test_mixed_strategy_skips_a_mig_gpu_without_devices() -> None:
    assert counts(node(a100_mig(mig_devices=()), h100()), mig_strategy="mixed") == {"nvidia.com/gpu": 1}


def test_a_plus_in_a_profile_becomes_a_dot() -> None:
    gpu = a100_mig(mig_devices=(MigDevice("MIG-me", 0, "1g.10gb+me", 9856, 7, 0),))
    plan = build_plan(node(gpu), Settings(mig_strategy="mixed"))
    assert plan.resources[0].name == "nvidia.com/mig-1g.10gb.me"
    assert plan.resources[0].socket_name == "nvidia-mig-1g.10gb.me.sock"


def test_mig_devices_carry_index_placement_parent_and_capability_paths() -> None:
    plan = build_plan(node(a100_mig()), Settings(mig_strategy="mixed", pass_device_specs=True))
    small = plan.resource("nvidia.com/mig-1g.5gb")
    assert small is not None
    first = small.devices[0]
    assert (first.index, first.gpu_uuid, first.mig_placement, first.numa_node) == ("0:0", A100, (7, 0), 0)
    assert first.paths == ("/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap66", "/dev/nvidia-caps/nvidia-cap67")


def test_a_missing_mig_capability_is_a_clear_error_when_device_specs_are_passed() -> None:
    with pytest.raises(PlanError, match="missing MIG capability gpu0/gi7/access for MIG-a"):
        build_plan(node(a100_mig(), minors={}), Settings(mig_strategy="mixed", pass_device_specs=True))
    # Without passDeviceSpecs the capability nodes are not needed.
    assert counts(node(a100_mig(), minors={}), mig_strategy="mixed") == {
        "nvidia.com/mig-1g.5gb": 2, "nvidia.com/mig-2g.10gb": 1}
