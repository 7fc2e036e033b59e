"""Sharing applied to a node: time-slicing replicas, MPS slices, renames, device selection and every refusal."""

from __future__ import annotations

import random

import pytest

from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import resolve
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.build import PlanError, build_plan
from nvdp.core.plan.model import MpsDaemonSpec, MpsSlice, Plan, Sharing
from nvdp.core.plan.sharing import compute_capability, gb, max_mps_clients

ROOT = "/run/nvidia/mps"


def uuid(i: int) -> str:
    return f"GPU-3a1f6c52-8e0b-4d47-9c1e-0a1b2c3d4e{i:02d}"


def a100(i: int, **overrides: object) -> Gpu:
    fields: dict[str, object] = dict(
        index=i, uuid=uuid(i), name="NVIDIA A100-SXM4-40GB", memory_mib=40960, minor=i,
        pci_bus_id=f"00000000:{16 + i:02x}:00.0", compute_capability="8.0", numa_node=0)
    fields.update(overrides)
    return Gpu(**fields)  # type: ignore[arg-type]


MIG_UUIDS = ("MIG-3eb87630-93d5-b2b6-b8ff-9b359caf4ee0", "MIG-3eb87630-93d5-b2b6-b8ff-9b359caf4ee1",
             "MIG-3eb87630-93d5-b2b6-b8ff-9b359caf4ee2")


def a100_mig(i: int = 0) -> Gpu:
    return a100(i, mig_enabled=True, mig_devices=(
        MigDevice(MIG_UUIDS[0], 0, "1g.5gb", 4864, gi=7, ci=0),
        MigDevice(MIG_UUIDS[1], 1, "1g.5gb", 4864, gi=8, ci=0),
        MigDevice(MIG_UUIDS[2], 2, "2g.10gb", 9856, gi=3, ci=0)))


def node(*gpus: Gpu) -> NodeInventory:
    return NodeInventory("580.82.07", 13000, tuple(gpus), control_devices=("/dev/nvidiactl",))


def plan(text: str, *gpus: Gpu, **cli: str) -> Plan:
    cli = {"mps_root": ROOT, **cli}
    return build_plan(node(*gpus), resolve(cli, {}, parse_config(text, "c.yaml"), config_source="c.yaml"))


def counts(p: Plan) -> dict[str, int]:
    return {r.name: len(r.devices) for r in p.resources}


def refused(text: str, *gpus: Gpu, **cli: str) -> str:
    with pytest.raises(PlanError) as error:
        plan(text, *gpus, **cli)
    return str(error.value)


def mps(*resources: str, extra: str = "") -> str:
    return "sharing:\n  mps:\n" + extra + "    resources:\n" + "".join(resources)


def ts(*resources: str, extra: str = "") -> str:
    return "sharing:\n  timeSlicing:\n" + extra + "    resources:\n" + "".join(resources)


def entry(name: str = "nvidia.com/gpu", **fields: object) -> str:
    lines = [f"      - name: {name}\n"] + [f"        {k}: {v}\n" for k, v in fields.items()]
    return "".join(lines)


FORK = mps(entry(rename="gpu-10gb", memoryGB=10, replicas=2, devices='["0"]'),
           entry(rename="gpu-20gb", memoryGB=20, replicas=1, devices='["0"]'))


# --- acceptance ---------------------------------------------------------------------------------------------------


def test_fork_slices_of_one_a100_leave_the_other_whole() -> None:
    p = plan(FORK, a100(0), a100(1))
    assert counts(p) == {"nvidia.com/gpu": 1, "nvidia.com/gpu-10gb": 2, "nvidia.com/gpu-20gb": 1}
    gpu, ten, twenty = p.resources
    # A sliced GPU is no longer advertised whole: only GPU 1 stays nvidia.com/gpu.
    assert [d.id for d in gpu.devices] == [uuid(1)]
    assert (gpu.sharing, gpu.fail_requests_greater_than_one) == (Sharing.NONE, False)
    assert [d.id for d in ten.devices] == [f"{uuid(0)}::10::0", f"{uuid(0)}::10::1"]
    assert [d.id for d in twenty.devices] == [f"{uuid(0)}::20::0"]
    assert (ten.sharing, ten.fail_requests_greater_than_one) == (Sharing.MPS, True)
    pipe = f"{ROOT}/{uuid(0)}/pipe"
    assert ten.devices[0].mps == MpsSlice(pipe_dir=pipe, shm_dir=f"{ROOT}/shm", memory_limit_mib=10240,
                                          active_thread_percentage=25, memory_gb=10)
    assert twenty.devices[0].mps == MpsSlice(pipe, f"{ROOT}/shm", 20480, 50, 20)
    d = ten.devices[1]
    assert (d.physical_id, d.index, d.gpu_uuid, d.gpu_index, d.paths, d.replica) == (
        uuid(0), "0", uuid(0), 0, ("/dev/nvidia0",), 1)
    # One daemon for GPU 0, its defaults the largest slice: a client's env can only lower them.
    assert p.mps_daemons == (MpsDaemonSpec(gpu_uuid=uuid(0), gpu_index=0, pipe_dir=pipe,
                                           log_dir=f"{ROOT}/{uuid(0)}/log", pinned_mem_limit_mib=20480,
                                           active_thread_percentage=50),)


def test_three_20gb_slices_on_a_40gb_gpu_are_refused() -> None:
    message = refused(mps(entry(rename="gpu-20gb", memoryGB=20, replicas=3, devices='["0"]')), a100(0), a100(1))
    assert f"GPU 0 ({uuid(0)}): MPS slices ask for 60 GB but the GPU has 40 GB" in message
    assert "3 x nvidia.com/gpu-20gb of 20 GB (sharing.mps.resources[0] (nvidia.com/gpu-20gb))" in message


def test_the_slices_of_several_resources_add_up_on_one_gpu() -> None:
    message = refused(mps(entry(rename="gpu-10gb", memoryGB=10, replicas=2, devices="[0]"),
                          entry(rename="gpu-30gb", memoryGB=30, replicas=1, devices="[0]")), a100(0))
    assert "asks" not in message and "ask for 50 GB but the GPU has 40 GB" in message
    assert "2 x nvidia.com/gpu-10gb of 10 GB" in message and "1 x nvidia.com/gpu-30gb of 30 GB" in message


def test_time_slicing_replicas_4_on_2_gpus_gives_8_devices() -> None:
    p = plan(ts(entry(replicas=4)), a100(1), a100(0))
    (resource,) = p.resources
    assert resource.name == "nvidia.com/gpu"
    assert [d.id for d in resource.devices] == [f"{uuid(g)}::{r}" for g in (0, 1) for r in range(4)]
    assert [d.replica for d in resource.devices] == [0, 1, 2, 3] * 2
    assert (resource.sharing, resource.fail_requests_greater_than_one) == (Sharing.TIME_SLICING, False)
    assert all(d.mps is None for d in resource.devices) and p.mps_daemons == ()


def test_rename_by_default_gives_the_shared_name() -> None:
    p = plan(ts(entry(replicas=2), extra="    renameByDefault: true\n"), a100(0), a100(1))
    assert counts(p) == {"nvidia.com/gpu.shared": 4}


def test_fail_requests_greater_than_one_reaches_the_resource() -> None:
    p = plan(ts(entry(replicas=2), extra="    failRequestsGreaterThanOne: true\n"), a100(0))
    assert p.resources[0].fail_requests_greater_than_one is True
    p = plan(mps(entry(replicas=2), extra="    failRequestsGreaterThanOne: false\n"), a100(0))
    assert p.resources[0].fail_requests_greater_than_one is False


# --- MPS ---------------------------------------------------------------------------------------------------------


def test_upstream_style_mps_splits_each_gpu_equally() -> None:
    p = plan(mps(entry(replicas=4)), a100(0), a100(1))
    (resource,) = p.resources
    assert [d.id for d in resource.devices] == [f"{uuid(g)}::{r}" for g in (0, 1) for r in range(4)]
    assert {d.mps for d in resource.devices[:4]} == {MpsSlice(f"{ROOT}/{uuid(0)}/pipe", f"{ROOT}/shm", 10240, 25)}
    assert [(s.gpu_index, s.pinned_mem_limit_mib, s.active_thread_percentage) for s in p.mps_daemons] == [
        (0, 10240, 25), (1, 10240, 25)]


def test_three_equal_replicas_round_down() -> None:
    (resource,) = plan(mps(entry(replicas=3)), a100(0)).resources
    assert resource.devices[0].mps is not None
    assert (resource.devices[0].mps.memory_limit_mib, resource.devices[0].mps.active_thread_percentage) == (13653, 33)


def test_compute_percent_is_the_memory_share_unless_given() -> None:
    h100 = a100(0, name="NVIDIA H100 80GB HBM3", memory_mib=81559, compute_capability="9.0")
    p = plan(mps(entry(rename="gpu-10gb", memoryGB=10, replicas=2),
                 entry(rename="gpu-1gb", memoryGB=1, replicas=1, computePercent=40)), h100)
    # 10 GiB of 79.6 GiB is 12.5 %: rounded down so the shares never add up past the GPU.
    assert [(r.name, r.devices[0].mps.active_thread_percentage) for r in p.resources  # type: ignore[union-attr]
            ] == [("nvidia.com/gpu-10gb", 12), ("nvidia.com/gpu-1gb", 40)]
    assert p.mps_daemons[0].active_thread_percentage == 40
    assert p.mps_daemons[0].pinned_mem_limit_mib == 10240


def test_nos_writes_one_entry_per_gpu_and_they_merge() -> None:
    p = plan(mps(entry(rename="gpu-10gb", memoryGB=10, replicas=2, devices='["0"]'),
                 entry(rename="gpu-10gb", memoryGB=10, replicas=2, devices='["1"]')), a100(0), a100(1))
    assert counts(p) == {"nvidia.com/gpu-10gb": 4}
    assert [d.id for d in p.resources[0].devices] == [f"{uuid(g)}::10::{r}" for g in (0, 1) for r in (0, 1)]
    assert [s.gpu_index for s in p.mps_daemons] == [0, 1]


def test_two_entries_slicing_one_gpu_to_one_size_never_share_an_id() -> None:
    p = plan(mps(entry(rename="gpu-10gb", memoryGB=10, replicas=1, devices="[0]"),
                 entry(rename="gpu-10gb", memoryGB=10, replicas=2, devices="[0]")), a100(0))
    assert [d.id for d in p.resources[0].devices] == [f"{uuid(0)}::10::{r}" for r in range(3)]


def test_without_fail_requests_greater_than_one_the_daemon_allows_a_whole_request() -> None:
    p = plan(mps(entry(rename="gpu-10gb", memoryGB=10, replicas=2), extra="    failRequestsGreaterThanOne: false\n"),
             a100(0))
    # One container may hold both slices: 20 GB and 50 %, which the daemon's defaults must not cut.
    assert (p.mps_daemons[0].pinned_mem_limit_mib, p.mps_daemons[0].active_thread_percentage) == (20480, 50)


def test_a_trailing_slash_in_the_mps_root_is_dropped() -> None:
    p = plan(mps(entry(replicas=2)), a100(0), mps_root="/run/nvidia/mps/")
    assert p.mps_daemons[0].pipe_dir == f"{ROOT}/{uuid(0)}/pipe"


@pytest.mark.parametrize(
    ("capability", "replicas", "ok"),
    [
        pytest.param("8.0", 48, True, id="48 clients on Ampere"),
        pytest.param("8.0", 49, False, id="49 clients on Ampere"),
        pytest.param("6.0", 16, True, id="16 clients on Pascal"),
        pytest.param("6.0", 17, False, id="17 clients on Pascal"),
        pytest.param("7.0", 48, True, id="deliberately unlike upstream 48 clients on Volta 7.0"),
    ],
)
def test_mps_clients_per_gpu_are_capped(capability: str, replicas: int, ok: bool) -> None:
    text = mps(entry(replicas=replicas))
    gpu = a100(0, compute_capability=capability)
    if ok:
        assert len(plan(text, gpu).resources[0].devices) == replicas
    else:
        message = refused(text, gpu)
        assert f"GPU 0 ({uuid(0)}): maximum allowed replicas exceeded: {replicas} > {replicas - 1}" in message


def test_the_client_cap_counts_every_resource_on_the_gpu() -> None:
    message = refused(mps(entry(rename="gpu-1gb", memoryGB=1, replicas=30, devices="[0]"),
                          entry(rename="gpu-0", memoryGB=1, replicas=19, devices="[0]")), a100(0, memory_mib=81920))
    assert "49 > 48" in message


# Upstream cmd/mps-control-daemon/mps/device_test.go TestDevice.
@pytest.mark.parametrize(
    ("capability", "clients"),
    [
        pytest.param("v7.5", 48, id="v7.5"),
        pytest.param("7.5", 48, id="7.5"),
        pytest.param("9.0", 48, id="9.0"),
        pytest.param("6.1", 16, id="6.1"),
        pytest.param("7.0", 48, id="deliberately unlike upstream Volta 7.0 is Volta"),
        pytest.param("garbage", 16, id="an unreadable capability is treated as pre-Volta"),
    ],
)
def test_max_mps_clients(capability: str, clients: int) -> None:
    assert max_mps_clients(capability) == clients


def test_compute_capability_and_gb_helpers() -> None:
    assert compute_capability("8.6") == (8, 6) and compute_capability("v7.5") == (7, 5)
    assert (gb(40960), gb(81559), gb(512)) == ("40 GB", "79.6 GB", "0.5 GB")


def test_mps_on_mig_devices_is_refused() -> None:
    single = a100(0, mig_enabled=True, mig_devices=(MigDevice(MIG_UUIDS[0], 0, "1g.5gb", 4864, 7, 0),))
    message = refused(mps(entry(replicas=2)), single, mig_strategy="single")
    assert "sharing using MPS is not supported for MIG devices" in message and MIG_UUIDS[0] in message
    # With migStrategy none the GPU is advertised whole, but CUDA there sees only its MIG devices.
    message = refused(mps(entry(replicas=2)), a100_mig(0))
    assert f"sharing using MPS is not supported for MIG devices: GPU 0 ({uuid(0)}) has MIG enabled" in message


def test_a_slice_larger_than_the_gpu_is_refused() -> None:
    assert "ask for 50 GB but the GPU has 40 GB" in refused(mps(entry(rename="big", memoryGB=50, replicas=1)),
                                                             a100(0))


def test_an_equal_split_leaves_no_room_for_slices() -> None:
    message = refused(mps(entry(replicas=2, devices="[0]", rename="half"),
                          entry(rename="gpu-10gb", memoryGB=10, replicas=1, devices="[0]")), a100(0))
    assert "ask for 50 GB" in message and "2 x nvidia.com/half of 20 GB (equal split)" in message


# --- devices, names and conflicts ---------------------------------------------------------------------------------


def test_a_count_takes_the_first_gpus_by_index() -> None:
    gpus = [a100(i) for i in range(4)]
    random.Random(3).shuffle(gpus)
    p = plan(ts(entry(replicas=2, devices=2, rename="shared")), *gpus)
    assert counts(p) == {"nvidia.com/gpu": 2, "nvidia.com/shared": 4}
    assert {d.gpu_index for d in p.resource("nvidia.com/shared").devices} == {0, 1}  # type: ignore[union-attr]


def test_a_count_larger_than_the_node_is_refused() -> None:
    message = refused(ts(entry(replicas=2, devices=3, rename="shared")), a100(0), a100(1))
    assert "sharing.timeSlicing.resources[0] (nvidia.com/shared): requested 3 devices to be replicated, but only 2" \
        in message


def test_references_by_uuid_and_index_select_the_same_gpu_once() -> None:
    p = plan(ts(entry(replicas=2, devices=f'["1", "{uuid(1)}"]', rename="shared")), a100(0), a100(1))
    assert [d.id for d in p.resource("nvidia.com/shared").devices] == [  # type: ignore[union-attr]
        f"{uuid(1)}::0", f"{uuid(1)}::1"]


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        pytest.param('["7"]', "device '7': no GPU with index 7 on this node (GPU indices: 0, 1)", id="index"),
        pytest.param(f'["{uuid(9)}"]', f"no GPU with UUID {uuid(9)} on this node", id="uuid"),
        pytest.param('["0:1"]', "device '0:1': no MIG device 0:1 on this node", id="MIG index"),
        pytest.param(f'["{MIG_UUIDS[0]}"]', f"no MIG device {MIG_UUIDS[0]} on this node", id="MIG uuid"),
    ],
)
def test_unknown_device_references_are_errors(devices: str, message: str) -> None:
    # Never the fork's silent "advertise nothing".
    assert message in refused(mps(entry(replicas=2, devices=devices, rename="s")), a100(0), a100(1))


def test_a_device_of_another_resource_is_named() -> None:
    message = refused(ts(entry("nvidia.com/mig-1g.5gb", replicas=2, devices='["0:2"]', rename="s")), a100_mig(0),
                      mig_strategy="mixed")
    assert f"MIG device 0:2 ({MIG_UUIDS[2]}, profile 2g.10gb) is on this node but not part of nvidia.com/mig-1g.5gb" \
        in message


def test_time_slicing_mig_devices_by_index_uuid_or_parent_gpu() -> None:
    text = ts(entry("nvidia.com/mig-1g.5gb", replicas=2, devices='["0:1"]', rename="a"),
              entry("nvidia.com/mig-1g.5gb", replicas=3, devices=f'["{MIG_UUIDS[0]}"]', rename="b"))
    p = plan(text, a100_mig(0), mig_strategy="mixed")
    assert counts(p) == {"nvidia.com/a": 2, "nvidia.com/b": 3, "nvidia.com/mig-2g.10gb": 1}
    assert p.resource("nvidia.com/a").devices[0].id == f"{MIG_UUIDS[1]}::0"  # type: ignore[union-attr]
    assert p.resource("nvidia.com/a").devices[0].mig_placement == (8, 0)  # type: ignore[union-attr]
    # A GPU reference takes every device of the resource on that GPU.
    p = plan(ts(entry("nvidia.com/mig-1g.5gb", replicas=2, devices="[0]")), a100_mig(0), mig_strategy="mixed")
    assert counts(p) == {"nvidia.com/mig-1g.5gb": 4, "nvidia.com/mig-2g.10gb": 1}


def test_a_resource_the_node_lacks_is_skipped_unless_devices_name_some() -> None:
    text = ts(entry("nvidia.com/mig-1g.5gb", replicas=2))
    assert counts(plan(text, a100(0))) == {"nvidia.com/gpu": 1}
    message = refused(ts(entry("nvidia.com/mig-1g.5gb", replicas=2, devices=1, rename="s")), a100(0))
    assert "this node has no nvidia.com/mig-1g.5gb devices, but devices 1 asks for some" in message


def test_shared_and_whole_devices_never_share_a_name() -> None:
    # Reachable only with an explicit rename to the resource's own name: without rename, devices is ignored.
    message = refused(ts(entry(replicas=2, devices="[0]", rename="gpu")), a100(0), a100(1))
    assert "nvidia.com/gpu would hold both shared devices and unshared ones" in message
    assert f"GPU 1 ({uuid(1)})" in message and "set rename" in message


def test_time_slicing_and_mps_on_different_gpus_of_one_node() -> None:
    text = ("sharing:\n  timeSlicing:\n    resources:\n" + entry(replicas=2, devices="[1]", rename="ts")
            + "  mps:\n    resources:\n" + entry(replicas=2, devices="[0]", rename="mps"))
    p = plan(text, a100(0), a100(1))
    assert {r.name: r.sharing for r in p.resources} == {"nvidia.com/mps": Sharing.MPS,
                                                        "nvidia.com/ts": Sharing.TIME_SLICING}
    assert [s.gpu_index for s in p.mps_daemons] == [0]


def test_one_gpu_both_time_sliced_and_mps_shared_is_refused() -> None:
    text = ("sharing:\n  timeSlicing:\n    resources:\n" + entry(replicas=2, devices="[0]", rename="ts")
            + "  mps:\n    resources:\n" + entry(replicas=2, devices=f'["{uuid(0)}"]', rename="mps"))
    message = refused(text, a100(0))
    assert f"GPU 0 ({uuid(0)}) is both time-sliced (sharing.timeSlicing.resources[0] (nvidia.com/ts)) and " \
           "MPS-shared (sharing.mps.resources[0] (nvidia.com/mps))" in message


def test_one_device_time_sliced_twice_is_refused() -> None:
    message = refused(ts(entry(replicas=2, rename="a"), entry(replicas=3, devices="[1]", rename="b")),
                      a100(0), a100(1))
    assert f"GPU 1 ({uuid(1)}) is time-sliced by both sharing.timeSlicing.resources[0]" in message


def test_time_sliced_and_mps_devices_never_share_a_name() -> None:
    text = ("sharing:\n  timeSlicing:\n    resources:\n" + entry(replicas=2, devices="[1]", rename="s")
            + "  mps:\n    resources:\n" + entry(replicas=2, devices="[0]", rename="s"))
    assert "nvidia.com/s would hold both time-sliced" in refused(text, a100(0), a100(1))


def test_the_plan_does_not_depend_on_inventory_order() -> None:
    gpus = [a100(i) for i in range(4)]
    text = FORK.replace('devices: ["0"]', 'devices: ["0", "2"]')
    expected = plan(text, *gpus)
    for seed in range(5):
        random.Random(seed).shuffle(gpus)
        assert plan(text, *gpus) == expected
    assert [s.gpu_index for s in expected.mps_daemons] == [0, 2]


@pytest.mark.parametrize("section", [ts, mps])
def test_devices_without_rename_share_every_gpu_as_upstream_does(section: object) -> None:
    # Issue 15: upstream ignores `devices` (and `rename`) and shares every GPU; nvdp serves that, with a warning.
    text = section(entry(replicas=2, devices="[0]"))  # type: ignore[operator]
    settings = resolve({"mps_root": ROOT}, {}, parse_config(text, "c.yaml"), config_source="c.yaml")
    (warning,) = settings.config_warnings
    kind = "timeSlicing" if section is ts else "mps"
    assert (warning.source, warning.path) == ("c.yaml", f"$.sharing.{kind}.resources[0].devices")
    assert "shares every device" in warning.message
    assert counts(build_plan(node(a100(0), a100(1)), settings)) == {"nvidia.com/gpu": 4}


def test_fork_slices_keep_their_devices_without_rename() -> None:
    # The fork's dialect (memoryGB) honours `devices` (kept, not dropped): no warning.
    text = mps(entry(memoryGB=10, replicas=2, devices='["1"]'))
    settings = resolve({"mps_root": ROOT}, {}, parse_config(text, "c.yaml"), config_source="c.yaml")
    assert settings.config_warnings == ()
    assert settings.config.sharing.mps.resources[0].devices == ["1"]  # type: ignore[union-attr,index]
