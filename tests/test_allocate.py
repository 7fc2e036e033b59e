"""Allocate responses: validation, ID translation and each response step (upstream §4, §10.6, §10.10)."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from types import FrameType

import pytest

from nvdp.core.plan.allocate import (
    AllocateOptions,
    AllocationError,
    ContainerAllocation,
    DeviceSpec,
    Mount,
    allocate,
    host_device_path,
    translate_ids,
)
from nvdp.core.plan.model import Device, Resource, Sharing

CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


# --- small builders ---------------------------------------------------------------------------------------------


def gpu(uuid: str, index: int, minor: int | None = None) -> Device:
    minor = index if minor is None else minor
    return Device(
        id=uuid, physical_id=uuid, index=str(index), gpu_uuid=uuid, gpu_index=index, paths=(f"/dev/nvidia{minor}",)
    )


def replicas(device: Device, count: int) -> list[Device]:
    return [
        Device(
            id=f"{device.id}::{r}",
            physical_id=device.physical_id,
            index=device.index,
            gpu_uuid=device.gpu_uuid,
            gpu_index=device.gpu_index,
            paths=device.paths,
            mig_placement=device.mig_placement,
            replica=r,
        )
        for r in range(count)
    ]


def mig(uuid: str, gpu_index: int, mig_index: int, caps: tuple[int, int]) -> Device:
    return Device(
        id=uuid,
        physical_id=uuid,
        index=f"{gpu_index}:{mig_index}",
        gpu_uuid=f"GPU-{gpu_index}",
        gpu_index=gpu_index,
        paths=(f"/dev/nvidia{gpu_index}", *(f"/dev/nvidia-caps/nvidia-cap{c}" for c in caps)),
        mig_placement=(mig_index + 1, 0),
    )


def resource(*devices: Device, name: str = "nvidia.com/gpu", fail_gt_one: bool = False) -> Resource:
    shared = any(d.is_replica for d in devices)
    return Resource(
        name=name,
        devices=tuple(devices),
        sharing=Sharing.TIME_SLICING if shared else Sharing.NONE,
        fail_requests_greater_than_one=fail_gt_one,
    )


def response(envs: dict[str, str], mounts=(), specs=()) -> ContainerAllocation:
    return ContainerAllocation(envs=envs, mounts=tuple(mounts), device_specs=tuple(specs), annotations={})


FOO_BAR = resource(gpu("foo", 0), gpu("bar", 1))
SHARED = resource(*replicas(gpu("GPU-a", 0), 2), *replicas(gpu("GPU-b", 1), 2))
MIGS = resource(mig("MIG-x", 0, 0, (12, 13)), mig("MIG-y", 0, 1, (21, 22)), name="nvidia.com/mig-1g.5gb")


# --- responses ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("res", "ids", "options", "expected"),
    [
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(),
            response({"NVIDIA_VISIBLE_DEVICES": "foo"}),
            id="envvar with one uuid gives only the env var, no mounts, specs or annotations",
        ),
        pytest.param(
            FOO_BAR,
            ["foo", "bar", "foo"],
            AllocateOptions(),
            response({"NVIDIA_VISIBLE_DEVICES": "foo,bar"}),
            id="a repeated id appears once, in first-seen order",
        ),
        pytest.param(
            FOO_BAR,
            ["bar", "foo"],
            AllocateOptions(),
            response({"NVIDIA_VISIBLE_DEVICES": "bar,foo"}),
            id="request order is kept, not resource order",
        ),
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(device_id_strategy="index"),
            response({"NVIDIA_VISIBLE_DEVICES": "0"}),
            id="index strategy gives the GPU index",
        ),
        pytest.param(
            MIGS,
            ["MIG-y"],
            AllocateOptions(device_id_strategy="index"),
            response({"NVIDIA_VISIBLE_DEVICES": "0:1"}),
            id="index strategy gives gpu:mig for a MIG device",
        ),
        pytest.param(
            SHARED,
            ["GPU-a::0", "GPU-a::1"],
            AllocateOptions(),
            response({"NVIDIA_VISIBLE_DEVICES": "GPU-a"}),
            id="two replicas of one GPU give its uuid once",
        ),
        pytest.param(
            SHARED,
            ["GPU-b::1", "GPU-a::0", "GPU-b::0"],
            AllocateOptions(device_id_strategy="index"),
            response({"NVIDIA_VISIBLE_DEVICES": "1,0"}),
            id="replicas under the index strategy give each index once in request order",
        ),
        pytest.param(
            FOO_BAR,
            ["foo", "bar"],
            AllocateOptions(device_list_strategy=("volume-mounts",)),
            response(
                {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
                mounts=[
                    Mount("/var/run/nvidia-container-devices/foo", "/dev/null"),
                    Mount("/var/run/nvidia-container-devices/bar", "/dev/null"),
                ],
            ),
            id="volume-mounts points the env var at the directory and mounts /dev/null per device",
        ),
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(device_list_strategy=("volume-mounts", "envvar")),
            response(
                {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
                mounts=[Mount("/var/run/nvidia-container-devices/foo", "/dev/null")],
            ),
            id="with both strategies volume-mounts overwrites the env var whatever order the config lists them",
        ),
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(gdrcopy_enabled=True, gds_enabled=True, mofed_enabled=True),
            response(
                {
                    "NVIDIA_GDRCOPY": "enabled",
                    "NVIDIA_GDS": "enabled",
                    "NVIDIA_MOFED": "enabled",
                    "NVIDIA_VISIBLE_DEVICES": "foo",
                }
            ),
            id="gdrcopy gds and mofed each add their env var",
        ),
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(pass_device_specs=True),
            response({"NVIDIA_VISIBLE_DEVICES": "foo"}, specs=[DeviceSpec("/dev/nvidia0", "/dev/nvidia0")]),
            id="passDeviceSpecs with no control devices on the node passes only the GPU node",
        ),
        pytest.param(
            resource(gpu("foo", 0, minor=3)),
            ["foo"],
            AllocateOptions(pass_device_specs=True, dev_root="/run/nvidia/driver", control_devices=CONTROL[:2]),
            response(
                {"NVIDIA_VISIBLE_DEVICES": "foo"},
                specs=[
                    DeviceSpec("/dev/nvidiactl", "/run/nvidia/driver/dev/nvidiactl"),
                    DeviceSpec("/dev/nvidia-uvm", "/run/nvidia/driver/dev/nvidia-uvm"),
                    DeviceSpec("/dev/nvidia3", "/run/nvidia/driver/dev/nvidia3"),
                ],
            ),
            id="passDeviceSpecs lists present control devices then the minor-numbered node under dev_root",
        ),
        pytest.param(
            MIGS,
            ["MIG-x"],
            AllocateOptions(pass_device_specs=True, control_devices=CONTROL),
            response(
                {"NVIDIA_VISIBLE_DEVICES": "MIG-x"},
                specs=[
                    *(DeviceSpec(p, p) for p in CONTROL),
                    DeviceSpec("/dev/nvidia0", "/dev/nvidia0"),
                    DeviceSpec("/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia-caps/nvidia-cap12"),
                    DeviceSpec("/dev/nvidia-caps/nvidia-cap13", "/dev/nvidia-caps/nvidia-cap13"),
                ],
            ),
            id="passDeviceSpecs for a MIG device passes the parent node and both capability nodes",
        ),
        pytest.param(
            MIGS,
            ["MIG-x", "MIG-y"],
            AllocateOptions(pass_device_specs=True),
            response(
                {"NVIDIA_VISIBLE_DEVICES": "MIG-x,MIG-y"},
                specs=[
                    DeviceSpec("/dev/nvidia0", "/dev/nvidia0"),
                    DeviceSpec("/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia-caps/nvidia-cap12"),
                    DeviceSpec("/dev/nvidia-caps/nvidia-cap13", "/dev/nvidia-caps/nvidia-cap13"),
                    DeviceSpec("/dev/nvidia-caps/nvidia-cap21", "/dev/nvidia-caps/nvidia-cap21"),
                    DeviceSpec("/dev/nvidia-caps/nvidia-cap22", "/dev/nvidia-caps/nvidia-cap22"),
                ],
            ),
            id="two MIG devices of one GPU share the parent node once",
        ),
        pytest.param(
            SHARED,
            ["GPU-a::0", "GPU-a::1"],
            AllocateOptions(pass_device_specs=True),
            response({"NVIDIA_VISIBLE_DEVICES": "GPU-a"}, specs=[DeviceSpec("/dev/nvidia0", "/dev/nvidia0")]),
            id="deliberately unlike upstream two replicas of one GPU pass its device node once",
        ),
    ],
)
def test_allocate_builds_the_response(
    res: Resource, ids: list[str], options: AllocateOptions, expected: ContainerAllocation
) -> None:
    got = allocate(res, ids, options)
    assert got == expected
    # Dict equality ignores order, but env order reaches the wire: pin it too.
    assert list(got.envs) == list(expected.envs)


# --- validation (upstream §10.6 TestValidateRequest, in our data model) -------------------------------------------


@pytest.mark.parametrize(
    ("res", "ids"),
    [
        pytest.param(FOO_BAR, ["bar"], id="a known whole GPU is accepted"),
        pytest.param(SHARED, ["GPU-a::1"], id="one replica is accepted"),
        pytest.param(SHARED, ["GPU-a::1", "GPU-b::0"], id="two replicas are accepted when the flag is off"),
        pytest.param(
            resource(gpu("foo", 0), gpu("bar", 1), fail_gt_one=True),
            ["foo", "bar"],
            id="the flag only limits requests that contain a replica",
        ),
        pytest.param(
            resource(*replicas(gpu("GPU-a", 0), 2), fail_gt_one=True), ["GPU-a::1"], id="one replica passes the flag"
        ),
    ],
)
def test_valid_requests_are_accepted(res: Resource, ids: list[str]) -> None:
    allocate(res, ids, AllocateOptions())


@pytest.mark.parametrize(
    ("res", "ids", "options", "message"),
    [
        pytest.param(
            FOO_BAR,
            ["bar", "baz"],
            AllocateOptions(),
            'invalid allocation request for "nvidia.com/gpu": unknown device: baz',
            id="an unknown id is named together with the resource",
        ),
        pytest.param(
            FOO_BAR,
            ["x", "foo", "y"],
            AllocateOptions(),
            'invalid allocation request for "nvidia.com/gpu": unknown devices: x, y',
            id="every unknown id is named not just the first",
        ),
        pytest.param(
            SHARED,
            ["GPU-a"],
            AllocateOptions(),
            'invalid allocation request for "nvidia.com/gpu": unknown device: GPU-a',
            id="a bare uuid is unknown to a resource that advertises only its replicas",
        ),
        pytest.param(
            FOO_BAR,
            [],
            AllocateOptions(),
            'invalid allocation request for "nvidia.com/gpu": no devices requested',
            id="an empty request is refused",
        ),
        pytest.param(
            resource(*replicas(gpu("GPU-a", 0), 2), *replicas(gpu("GPU-b", 1), 2), fail_gt_one=True),
            ["GPU-a::1", "GPU-b::0"],
            AllocateOptions(),
            "request for 'nvidia.com/gpu: 2' too large: maximum request size for shared resources is 1",
            id="two replicas with failRequestsGreaterThanOne give the README message",
        ),
        pytest.param(
            resource(*replicas(gpu("GPU-a", 0), 4), name="nvidia.com/gpu.shared", fail_gt_one=True),
            ["GPU-a::0", "GPU-a::1", "GPU-a::2"],
            AllocateOptions(),
            "request for 'nvidia.com/gpu.shared: 3' too large: maximum request size for shared resources is 1",
            id="the size message names the renamed resource and the requested count",
        ),
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(device_list_strategy=("cdi-dra",)),
            'invalid allocation request for "nvidia.com/gpu": unsupported device list strategy: cdi-dra',
            id="an unsupported list strategy that slipped past config is refused",
        ),
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(device_list_strategy=()),
            'invalid allocation request for "nvidia.com/gpu": no device list strategy configured',
            id="deliberately unlike upstream an empty list strategy is refused rather than giving no GPUs",
        ),
        pytest.param(
            FOO_BAR,
            ["foo"],
            AllocateOptions(device_id_strategy="serial"),
            "invalid allocation request for \"nvidia.com/gpu\": unsupported device ID strategy: 'serial'",
            id="an unsupported id strategy that slipped past config is refused",
        ),
    ],
)
def test_invalid_requests_are_refused(res: Resource, ids: list[str], options: AllocateOptions, message: str) -> None:
    with pytest.raises(AllocationError) as caught:
        allocate(res, ids, options)
    assert str(caught.value) == message


# --- helpers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "ids", "expected"),
    [
        pytest.param("uuid", ["GPU-b::1", "GPU-a::0", "GPU-b::0"], ["GPU-b", "GPU-a"], id="uuid strips replica"),
        pytest.param("index", ["GPU-b::1", "GPU-a::0"], ["1", "0"], id="index keeps request order"),
    ],
)
def test_translate_ids(strategy: str, ids: list[str], expected: list[str]) -> None:
    assert translate_ids(SHARED, ids, strategy) == expected


def test_translate_ids_refuses_unknown_ids_and_strategies() -> None:
    with pytest.raises(AllocationError, match="unknown device: nope"):
        translate_ids(SHARED, ["nope"], "uuid")
    with pytest.raises(AllocationError, match="unsupported device ID strategy"):
        translate_ids(SHARED, ["GPU-a::0"], "serial")


@pytest.mark.parametrize(
    ("root", "path", "expected"),
    [
        pytest.param("/", "/dev/nvidia0", "/dev/nvidia0", id="root slash leaves the path alone"),
        pytest.param("", "/dev/nvidia0", "/dev/nvidia0", id="empty root means slash"),
        pytest.param("/run/nvidia/driver", "/dev/nvidia0", "/run/nvidia/driver/dev/nvidia0", id="driver root"),
        pytest.param("/run/nvidia/driver/", "/dev/nvidiactl", "/run/nvidia/driver/dev/nvidiactl", id="trailing slash"),
    ],
)
def test_host_device_path_joins_like_go(root: str, path: str, expected: str) -> None:
    assert host_device_path(root, path) == expected


def test_response_is_identical_whatever_order_the_resource_lists_its_devices() -> None:
    devices = [*replicas(gpu("GPU-a", 0), 3), *replicas(gpu("GPU-b", 1), 3)]
    options = AllocateOptions(device_list_strategy=("envvar", "volume-mounts"), pass_device_specs=True)
    request = ["GPU-b::2", "GPU-a::0", "GPU-b::0"]
    expected = allocate(resource(*devices), request, options)
    rng = random.Random(7)
    for _ in range(10):
        rng.shuffle(devices)
        assert allocate(resource(*devices), request, options) == expected


def python_lines(call: Callable[[], object]) -> int:
    """How many Python lines `call()` executes (every frame, loop iterations included): a deterministic measure of
    work, where a timing would be the machine's load (speed is bench/'s business)."""
    executed = 0

    def local(frame: FrameType, event: str, arg: object) -> object:
        nonlocal executed
        executed += event == "line"
        return local

    sys.settrace(lambda frame, event, arg: local)
    try:
        call()
    finally:
        sys.settrace(None)
    return executed


def test_allocate_cost_does_not_grow_with_the_number_of_devices() -> None:
    # 8 GPUs x 1000 replicas: a per-call scan of every device would execute thousands more lines than 2 replicas.
    small = resource(*replicas(gpu("GPU-a", 0), 2))
    large = resource(*(r for i in range(8) for r in replicas(gpu(f"GPU-{i}", i), 1000)))
    options = AllocateOptions(pass_device_specs=True)
    for res, ids in ((small, ["GPU-a::1"]), (large, ["GPU-7::999"])):
        allocate(res, ids, options)  # whatever is built once per resource is built now
    small_lines = python_lines(lambda: allocate(small, ["GPU-a::1"], options))
    large_lines = python_lines(lambda: allocate(large, ["GPU-7::999"], options))
    assert small_lines > 10  # the measure sees allocate's own lines
    assert large_lines <= small_lines + 20, (small_lines, large_lines)
