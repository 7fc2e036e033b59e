"""Allocate for shared resources: MPS env and mounts, request-size rules, upstream's TestValidateRequest (§10.6)."""

from __future__ import annotations

import pytest

from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import resolve
from nvdp.core.inventory import Gpu, NodeInventory
from nvdp.core.plan.allocate import AllocateOptions, AllocationError, ContainerAllocation, DeviceSpec, Mount, allocate
from nvdp.core.plan.build import build_plan
from nvdp.core.plan.model import Device, MpsSlice, Plan, Resource, Sharing

ROOT = "/run/nvidia/mps"
GPU0 = "GPU-3a1f6c52-8e0b-4d47-9c1e-0a1b2c3d4e01"
GPU1 = "GPU-3a1f6c52-8e0b-4d47-9c1e-0a1b2c3d4e02"
PIPE0 = f"{ROOT}/{GPU0}/pipe"
PIPE1 = f"{ROOT}/{GPU1}/pipe"
SHM = Mount(container_path="/dev/shm", host_path=f"{ROOT}/shm")


def a100(i: int, uuid: str) -> Gpu:
    return Gpu(i, uuid, "NVIDIA A100-SXM4-40GB", 40960, i, f"00000000:{16 + i:02x}:00.0", "8.0", numa_node=0)


def plan(text: str) -> Plan:
    settings = resolve({"mps_root": ROOT}, {}, parse_config(text, "c.yaml"))
    return build_plan(NodeInventory("580.82.07", 13000, (a100(0, GPU0), a100(1, GPU1))), settings)


def resource(p: Plan, name: str) -> Resource:
    found = p.resource(name)
    assert found is not None
    return found


FORK = """\
sharing:
  mps:
    resources:
      - {name: nvidia.com/gpu, rename: gpu-10gb, memoryGB: 10, replicas: 2, devices: ["0"]}
      - {name: nvidia.com/gpu, rename: gpu-20gb, memoryGB: 20, replicas: 1, devices: ["0"]}
"""
FORK_PLAN = plan(FORK)
TEN = resource(FORK_PLAN, "nvidia.com/gpu-10gb")
LOOSE = plan(FORK.replace("  mps:\n", "  mps:\n    failRequestsGreaterThanOne: false\n").replace('["0"]', "all"))
LOOSE_TEN = resource(LOOSE, "nvidia.com/gpu-10gb")


def response(envs: dict[str, str], mounts: tuple[Mount, ...] = (), specs: tuple[DeviceSpec, ...] = ()
             ) -> ContainerAllocation:
    return ContainerAllocation(envs=envs, mounts=mounts, device_specs=specs, annotations={})


def test_one_10gb_slice_gets_its_daemon_limits_and_shm() -> None:
    assert allocate(TEN, [f"{GPU0}::10::1"], AllocateOptions()) == response(
        {
            "NVIDIA_VISIBLE_DEVICES": GPU0,
            "CUDA_MPS_PIPE_DIRECTORY": PIPE0,
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10G",
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        },
        (Mount(container_path=PIPE0, host_path=PIPE0), SHM),
    )


def test_the_limit_names_ordinal_0_whatever_the_host_index() -> None:
    # Deliberately unlike the fork, which writes the host index and leaves GPUs other than 0 unlimited.
    got = allocate(LOOSE_TEN, [f"{GPU1}::10::0"], AllocateOptions(device_id_strategy="index"))
    assert got.envs["NVIDIA_VISIBLE_DEVICES"] == "1"
    assert got.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=10G"
    assert got.envs["CUDA_MPS_PIPE_DIRECTORY"] == PIPE1


def test_an_equal_split_slice_is_limited_in_mib() -> None:
    shared = resource(plan("sharing:\n  mps:\n    resources:\n      - {name: gpu, replicas: 4}\n"), "nvidia.com/gpu")
    got = allocate(shared, [f"{GPU1}::2"], AllocateOptions())
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": GPU1, "CUDA_MPS_PIPE_DIRECTORY": PIPE1,
                        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10240M", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}


def test_two_slices_with_fail_requests_greater_than_one_give_the_readme_message() -> None:
    with pytest.raises(AllocationError) as error:
        allocate(TEN, [f"{GPU0}::10::0", f"{GPU0}::10::1"], AllocateOptions())
    assert str(error.value) == (
        "request for 'nvidia.com/gpu-10gb: 2' too large: maximum request size for shared resources is 1")


def test_two_slices_of_one_gpu_add_up_when_allowed() -> None:
    got = allocate(LOOSE_TEN, [f"{GPU0}::10::1", f"{GPU0}::10::0"], AllocateOptions())
    assert got == response(
        {"NVIDIA_VISIBLE_DEVICES": GPU0, "CUDA_MPS_PIPE_DIRECTORY": PIPE0, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20G",
         "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"},
        (Mount(PIPE0, PIPE0), SHM))


def test_slices_of_two_gpus_are_always_refused() -> None:
    with pytest.raises(AllocationError) as error:
        allocate(LOOSE_TEN, [f"{GPU0}::10::0", f"{GPU1}::10::0"], AllocateOptions())
    assert str(error.value) == (
        'invalid allocation request for "nvidia.com/gpu-10gb": MPS slices of several GPUs (GPU 0, GPU 1) cannot go '
        "to one container: an MPS client talks to one GPU's control daemon; request slices of one GPU")


def test_a_repeated_id_does_not_double_the_limits() -> None:
    got = allocate(LOOSE_TEN, [f"{GPU0}::10::0", f"{GPU0}::10::0"], AllocateOptions())
    assert got.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=10G"
    assert got.mounts == (Mount(PIPE0, PIPE0), SHM)


def test_mps_with_volume_mounts_and_device_specs() -> None:
    got = allocate(TEN, [f"{GPU0}::10::0"], AllocateOptions(device_list_strategy=("envvar", "volume-mounts"),
                                                           pass_device_specs=True,
                                                           control_devices=("/dev/nvidiactl",)))
    assert got.envs["NVIDIA_VISIBLE_DEVICES"] == "/var/run/nvidia-container-devices"
    assert got.mounts == (Mount(f"/var/run/nvidia-container-devices/{GPU0}", "/dev/null"), Mount(PIPE0, PIPE0), SHM)
    assert [s.container_path for s in got.device_specs] == ["/dev/nvidiactl", "/dev/nvidia0"]


def test_the_whole_gpu_left_over_gets_no_mps_env() -> None:
    got = allocate(resource(FORK_PLAN, "nvidia.com/gpu"), [GPU1], AllocateOptions())
    assert got == response({"NVIDIA_VISIBLE_DEVICES": GPU1})


def test_time_slicing_replicas_of_one_gpu_give_it_once() -> None:
    shared = resource(plan("sharing:\n  timeSlicing:\n    resources:\n      - {name: gpu, replicas: 4}\n"),
                      "nvidia.com/gpu")
    got = allocate(shared, [f"{GPU1}::3", f"{GPU0}::0", f"{GPU1}::0"], AllocateOptions())
    assert got == response({"NVIDIA_VISIBLE_DEVICES": f"{GPU1},{GPU0}"})


def test_time_slicing_fail_requests_greater_than_one_gives_the_readme_message() -> None:
    shared = resource(plan("sharing:\n  timeSlicing:\n    renameByDefault: true\n    failRequestsGreaterThanOne: true\n"
                           "    resources:\n      - {name: gpu, replicas: 4}\n"), "nvidia.com/gpu.shared")
    with pytest.raises(AllocationError) as error:
        allocate(shared, [f"{GPU0}::0", f"{GPU1}::0"], AllocateOptions())
    assert str(error.value) == (
        "request for 'nvidia.com/gpu.shared: 2' too large: maximum request size for shared resources is 1")


# --- upstream internal/rm/rm_test.go TestValidateRequest ----------------------------------------------------------


def device(gpu: int, replica: int | None, mps: bool) -> Device:
    uuid = f"device{gpu}"
    slice_ = MpsSlice(f"{ROOT}/{uuid}/pipe", f"{ROOT}/shm", 20480, 50) if mps else None
    return Device(id=uuid if replica is None else f"{uuid}::{replica}", physical_id=uuid, index=str(gpu),
                  gpu_uuid=uuid, gpu_index=gpu, paths=(f"/dev/nvidia{gpu}",), replica=replica, mps=slice_)


def shared(sharing: Sharing, fail: bool) -> Resource:
    mps = sharing is Sharing.MPS
    return Resource("nvidia.com/gpu", tuple(device(g, r, mps) for g in (0, 1) for r in (0, 1)), sharing=sharing,
                    fail_requests_greater_than_one=fail)


WHOLE = Resource("nvidia.com/gpu", (device(0, None, False), device(1, None, False)))
TOO_LARGE = "request for 'nvidia.com/gpu: 2' too large: maximum request size for shared resources is 1"


@pytest.mark.parametrize(
    ("res", "ids", "error"),
    [
        pytest.param(WHOLE, ["device1"], None, id="none: a known device"),
        pytest.param(WHOLE, ["device1", "device2"], "unknown device: device2", id="none: an unknown device"),
        pytest.param(shared(Sharing.TIME_SLICING, False), ["device0::1"], None, id="time-slicing: one replica"),
        pytest.param(shared(Sharing.TIME_SLICING, False), ["device0::1", "device1::0"], None,
                     id="time-slicing: two replicas with the flag unset"),
        pytest.param(shared(Sharing.TIME_SLICING, True), ["device0::1", "device1::0"], TOO_LARGE,
                     id="time-slicing: two replicas with failRequestsGreaterThanOne"),
        pytest.param(shared(Sharing.MPS, False), ["device0::1"], None, id="mps: one replica"),
        pytest.param(shared(Sharing.MPS, False), ["device0::0", "device0::1"], None,
                     id="mps: two replicas of one GPU with the flag false"),
        pytest.param(shared(Sharing.MPS, False), ["device0::1", "device1::0"], "MPS slices of several GPUs",
                     id="deliberately unlike upstream mps replicas of two GPUs are refused: one pipe directory"),
        pytest.param(shared(Sharing.MPS, True), ["device0::1", "device1::0"], TOO_LARGE,
                     id="mps: two replicas with failRequestsGreaterThanOne"),
    ],
)
def test_validate_request(res: Resource, ids: list[str], error: str | None) -> None:
    if error is None:
        allocate(res, ids, AllocateOptions())
        return
    with pytest.raises(AllocationError) as raised:
        allocate(res, ids, AllocateOptions())
    assert error in str(raised.value)
