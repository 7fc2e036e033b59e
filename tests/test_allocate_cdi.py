"""Allocate with the CDI strategies, IMEX channels and GDS/MOFED/gdrcopy: upstream's `TestCDIAllocateResponse` and
`TestAllocate` cases (upstream-nvidia-device-plugin.md §10.10), its `getAllocateResponse` steps (§4.1), and the
acceptance combinations of issue 16 (cdi-cri alone, cdi-annotations alone, envvar with cdi-annotations)."""

from __future__ import annotations

import pytest

from nvdp.core.plan.allocate import (
    AllocateOptions,
    ContainerAllocation,
    DeviceSpec,
    Mount,
    allocate,
    cdi_device_names,
)
from nvdp.core.plan.model import Device, MpsSlice
from tests.test_allocate import FOO_BAR, MIGS, SHARED, gpu, mig, replicas, resource

VENDOR = "k8s.device-plugin.nvidia.com"
CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm")
IMEX_NODE = "/dev/nvidia-caps-imex-channels/channel0"


def cdi(*names: str) -> tuple[str, ...]:
    return tuple(f"{VENDOR}/{n}" for n in names)


def answer(ids: list[str], res: object = FOO_BAR, **options: object) -> ContainerAllocation:
    return allocate(res, ids, AllocateOptions(**options))  # type: ignore[arg-type]


# --- upstream's TestCDIAllocateResponse: the names and their order --------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "options", "names"),
    [
        pytest.param(["foo"], {}, cdi("gpu=foo"), id="one GPU"),
        pytest.param(["foo", "bar"], {}, cdi("gpu=foo", "gpu=bar"), id="two GPUs in request order"),
        pytest.param(["bar", "foo"], {}, cdi("gpu=bar", "gpu=foo"), id="request order kept"),
        pytest.param(["foo"], {"mofed_enabled": True}, cdi("gpu=foo", "mofed=all"), id="mofed adds its all device"),
        pytest.param(["foo"], {"gds_enabled": True}, cdi("gpu=foo", "gds=all"), id="gds adds its all device"),
        pytest.param(["foo"], {"gds_enabled": True, "mofed_enabled": True}, cdi("gpu=foo", "gds=all", "mofed=all"),
                     id="gds then mofed"),
        pytest.param(["foo"], {"imex_channels": (0,)}, cdi("gpu=foo", "imex-channel=0"),
                     id="an IMEX channel follows the GPUs"),
        pytest.param(["foo", "bar"], {"imex_channels": (0,), "gdrcopy_enabled": True, "gds_enabled": True,
                                      "mofed_enabled": True},
                     cdi("gpu=foo", "gpu=bar", "imex-channel=0", "gdrcopy=all", "gds=all", "mofed=all"),
                     id="GPUs then IMEX channels then gdrcopy gds mofed, upstream's order"),
        pytest.param(["foo"], {"gds_enabled": True, "mofed_enabled": True, "cdi_classes_without_spec": ("gds",)},
                     cdi("gpu=foo", "mofed=all"), id="a feature class without a spec is left out as upstream does"),
        pytest.param(["foo"], {"device_id_strategy": "index"}, cdi("gpu=0"), id="index strategy names the index"),
    ],
)
def test_cdi_names_in_upstreams_order(ids: list[str], options: dict[str, object], names: tuple[str, ...]) -> None:
    got = answer(ids, device_list_strategy=("cdi-cri",), **options)
    assert got.cdi_devices == names
    assert cdi_device_names(ids if options.get("device_id_strategy") != "index" else ["0"],
                            AllocateOptions(**options)) == names  # type: ignore[arg-type]


def test_replicas_resolve_to_their_gpus_cdi_device_once() -> None:
    got = allocate(SHARED, ["GPU-b::1", "GPU-a::0", "GPU-b::0"], AllocateOptions(device_list_strategy=("cdi-cri",)))
    assert got.cdi_devices == cdi("gpu=GPU-b", "gpu=GPU-a")


@pytest.mark.parametrize(
    ("strategy", "names"),
    [
        pytest.param("uuid", cdi("gpu=MIG-y", "gpu=MIG-x"), id="uuid strategy names the MIG UUID"),
        pytest.param("index", cdi("gpu=0:1", "gpu=0:0"), id="index strategy names gpu colon mig index"),
    ],
)
def test_mig_devices_are_named_per_device_id_strategy(strategy: str, names: tuple[str, ...]) -> None:
    got = allocate(MIGS, ["MIG-y", "MIG-x"],
                   AllocateOptions(device_list_strategy=("cdi-annotations",), device_id_strategy=strategy))
    assert got.cdi_annotation_names == names


def test_index_replicas_of_mig_and_gpu_are_de_replicated() -> None:
    res = resource(*replicas(gpu("GPU-a", 3), 2), *replicas(mig("MIG-z", 1, 2, (5, 6)), 2))
    got = allocate(res, ["MIG-z::0", "GPU-a::1", "MIG-z::1", "GPU-a::0"],
                   AllocateOptions(device_list_strategy=("cdi-cri",), device_id_strategy="index"))
    assert got.cdi_devices == cdi("gpu=1:2", "gpu=3")


# --- issue 16's acceptance combinations -----------------------------------------------------------------------------


def test_cdi_cri_alone_returns_only_cdi_devices() -> None:
    got = answer(["foo", "bar"], device_list_strategy=("cdi-cri",), pass_device_specs=True, control_devices=CONTROL)
    assert got == ContainerAllocation(envs={}, mounts=(), device_specs=(), annotations={},
                                      cdi_devices=cdi("gpu=foo", "gpu=bar"))


def test_cdi_annotations_alone_returns_the_names_for_one_annotation() -> None:
    got = answer(["foo"], device_list_strategy=("cdi-annotations",), pass_device_specs=True)
    assert got == ContainerAllocation(envs={}, mounts=(), device_specs=(), annotations={},
                                      cdi_annotation_names=cdi("gpu=foo"), cdi_annotation_prefix="cdi.k8s.io/")


def test_custom_annotation_prefix_is_carried_for_the_key() -> None:
    got = answer(["foo", "bar"], device_list_strategy=("cdi-annotations",), cdi_annotation_prefix="custom.cdi.k8s.io/")
    assert (got.cdi_annotation_prefix, got.cdi_annotation_names) == ("custom.cdi.k8s.io/", cdi("gpu=foo", "gpu=bar"))
    assert got.cdi_devices == ()


def test_envvar_with_cdi_annotations_returns_both_kinds() -> None:
    got = answer(["foo", "bar"], device_list_strategy=("envvar", "cdi-annotations"), pass_device_specs=True)
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": "foo,bar"}
    assert got.cdi_annotation_names == cdi("gpu=foo", "gpu=bar") and got.cdi_devices == ()
    # Not every strategy is CDI: device specs are still passed, as upstream passes them.
    assert got.device_specs == (DeviceSpec("/dev/nvidia0", "/dev/nvidia0"), DeviceSpec("/dev/nvidia1", "/dev/nvidia1"))


def test_both_cdi_strategies_fill_both_fields() -> None:
    got = answer(["foo"], device_list_strategy=("cdi-annotations", "cdi-cri"))
    assert got.cdi_devices == got.cdi_annotation_names == cdi("gpu=foo")
    assert got.envs == {}


def test_volume_mounts_with_cdi_cri_keeps_the_mounts() -> None:
    got = answer(["foo"], device_list_strategy=("cdi-cri", "volume-mounts"))
    assert got.cdi_devices == cdi("gpu=foo")
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert got.mounts == (Mount("/var/run/nvidia-container-devices/foo", "/dev/null"),)


def test_without_cdi_no_cdi_fields() -> None:
    got = answer(["foo"], cdi_annotation_prefix="custom/", imex_channels=(0,), gds_enabled=True)
    assert (got.cdi_devices, got.cdi_annotation_names, got.cdi_annotation_prefix) == ((), (), "cdi.k8s.io/")


# --- what CDI-only still returns (upstream: feature env vars and MPS) ----------------------------------------------


def test_cdi_only_still_sets_the_feature_env_vars() -> None:
    got = answer(["foo"], device_list_strategy=("cdi-cri",), gdrcopy_enabled=True, gds_enabled=True,
                 mofed_enabled=True, imex_channels=(0,))
    assert got.envs == {"NVIDIA_GDRCOPY": "enabled", "NVIDIA_GDS": "enabled", "NVIDIA_MOFED": "enabled"}
    assert got.mounts == () and got.device_specs == ()
    assert got.cdi_devices == cdi("gpu=foo", "imex-channel=0", "gdrcopy=all", "gds=all", "mofed=all")


def test_cdi_only_mps_slice_keeps_its_env_and_mounts() -> None:
    pipe, shm = "/run/nvidia/mps/GPU-a/pipe", "/run/nvidia/mps/shm"
    slice_ = MpsSlice(pipe_dir=pipe, shm_dir=shm, memory_limit_mib=10240, active_thread_percentage=25, memory_gb=10)
    device = Device(id="GPU-a::10::0", physical_id="GPU-a", index="0", gpu_uuid="GPU-a", gpu_index=0,
                    paths=("/dev/nvidia0",), replica=0, mps=slice_)
    got = allocate(resource(device, name="nvidia.com/gpu-10gb"), ["GPU-a::10::0"],
                   AllocateOptions(device_list_strategy=("cdi-cri",), pass_device_specs=True))
    assert got.cdi_devices == cdi("gpu=GPU-a")
    assert got.envs == {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10G",
                        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}
    assert got.mounts == (Mount(pipe, pipe), Mount("/dev/shm", shm))
    assert got.device_specs == ()


# --- IMEX with envvar and volume-mounts (upstream's getAllocateResponse) --------------------------------------------


def test_imex_with_envvar_sets_its_env_var() -> None:
    assert answer(["foo"], imex_channels=(0,)).envs == {"NVIDIA_VISIBLE_DEVICES": "foo", "NVIDIA_IMEX_CHANNELS": "0"}


def test_no_imex_channel_no_env_var() -> None:
    assert answer(["foo"]).envs == {"NVIDIA_VISIBLE_DEVICES": "foo"}


def test_imex_with_volume_mounts_lists_the_channel_as_a_mount() -> None:
    got = answer(["foo"], device_list_strategy=("volume-mounts",), imex_channels=(0,))
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert got.mounts == (Mount("/var/run/nvidia-container-devices/foo", "/dev/null"),
                          Mount("/var/run/nvidia-container-devices/imex/0", "/dev/null"))


def test_imex_with_both_strategies_sets_env_and_mount() -> None:
    got = answer(["foo"], device_list_strategy=("envvar", "volume-mounts"), imex_channels=(0,))
    assert got.envs["NVIDIA_IMEX_CHANNELS"] == "0"
    assert Mount("/var/run/nvidia-container-devices/imex/0", "/dev/null") in got.mounts


def test_imex_channel_is_a_device_spec_under_the_dev_root() -> None:
    got = answer(["foo"], pass_device_specs=True, dev_root="/run/nvidia/driver", control_devices=CONTROL,
                 imex_channels=(0,))
    assert got.device_specs == (
        DeviceSpec("/dev/nvidiactl", "/run/nvidia/driver/dev/nvidiactl"),
        DeviceSpec("/dev/nvidia-uvm", "/run/nvidia/driver/dev/nvidia-uvm"),
        DeviceSpec("/dev/nvidia0", "/run/nvidia/driver/dev/nvidia0"),
        DeviceSpec(IMEX_NODE, f"/run/nvidia/driver{IMEX_NODE}"),
    )


# --- upstream's TestAllocate (envvar, uuid) still holds -------------------------------------------------------------


@pytest.mark.parametrize(("ids", "visible"), [(["foo"], "foo"), (["foo", "bar", "foo"], "foo,bar")])
def test_upstream_allocate_cases(ids: list[str], visible: str) -> None:
    got = answer(ids)
    assert got == ContainerAllocation(envs={"NVIDIA_VISIBLE_DEVICES": visible}, mounts=(), device_specs=(),
                                      annotations={})
