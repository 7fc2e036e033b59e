"""What nvdp puts in its CDI specs, from a plain description of the driver files (no file system)."""

from __future__ import annotations

import json

import pytest

from nvdp.core.cdi.build import (
    CdiBuildError,
    CdiOptions,
    DriverFiles,
    Library,
    NodeInfo,
    claim_spec,
    claim_spec_filename,
    common_edits,
    device_plugin_specs,
    gpu_edits,
    mig_edits,
)
from nvdp.core.cdi.spec import DeviceNode, render
from nvdp.core.config.settings import Settings
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.build import build_plan

LIB = "/usr/lib/x86_64-linux-gnu"
MIG_A = MigDevice(uuid="MIG-a", index=0, profile="1g.5gb", memory_mib=4864, gi=7, ci=0)
MIG_B = MigDevice(uuid="MIG-b", index=1, profile="1g.5gb", memory_mib=4864, gi=8, ci=0)
GPU0 = Gpu(index=0, uuid="GPU-0", name="A100", memory_mib=40960, minor=0, pci_bus_id="00000000:07:00.0",
           compute_capability="8.0", mig_enabled=True, mig_capable=True, mig_devices=(MIG_A, MIG_B))
GPU1 = Gpu(index=1, uuid="GPU-1", name="A100", memory_mib=40960, minor=3, pci_bus_id="00000000:0F:00.0",
           compute_capability="8.0")
INVENTORY = NodeInventory(driver_version="580.95.05", cuda_driver_version=13000, gpus=(GPU0, GPU1),
                          mig_minors={"gpu0/gi7/access": 66, "gpu0/gi7/ci0/access": 67, "gpu0/gi8/access": 75,
                                      "gpu0/gi8/ci0/access": 76})


def node(path: str, major: int, minor: int, mode: int = 0o666, gid: int = 0) -> NodeInfo:
    return NodeInfo(path, major, minor, mode, gid)


FILES = DriverFiles(
    driver_root="/driver-root",
    dev_root="/driver-root",
    driver_version="580.95.05",
    control_nodes=(node("/dev/nvidia-uvm", 508, 0), node("/dev/nvidiactl", 195, 255)),
    gpu_nodes={0: node("/dev/nvidia0", 195, 0), 3: node("/dev/nvidia3", 195, 3)},
    cap_nodes={66: node("/dev/nvidia-caps/nvidia-cap66", 511, 66, 0o444)},
    caps_major=511,
    mig_minors=INVENTORY.mig_minors,
    libraries=(Library(f"{LIB}/libcuda.so.580.95.05", (("libcuda.so.1", "libcuda.so.580.95.05"),)),
               Library(f"{LIB}/libnvidia-ml.so.580.95.05")),
    library_dirs=(LIB,),
    firmware=("/lib/firmware/nvidia/580.95.05/gsp_ga10x.bin",),
    binaries=("/usr/bin/nvidia-smi",),
    ipc_sockets=("/run/nvidia-persistenced/socket",),
    drm_nodes={"0000:0f:00.0": (node("/dev/dri/card1", 226, 1, 0o660, 44), node("/dev/dri/renderD128", 226, 128))},
    drm_links={"0000:0f:00.0": (("../card1", "/dev/dri/by-path/pci-0000:0f:00.0-card"),)},
)
#: The chart's layout: the host's /run/nvidia/driver seen at /driver-root, its /dev the host's /dev.
OPTIONS = CdiOptions(host_driver_root="/run/nvidia/driver", host_dev_root="/")


def test_common_edits_hold_control_nodes_libraries_sockets_env_and_hooks_with_host_paths() -> None:
    edits = common_edits(FILES, OPTIONS)
    assert edits.env == (f"NVIDIA_CTK_LIBCUDA_DIR={LIB}", "NVIDIA_VISIBLE_DEVICES=void")
    assert edits.device_nodes == (
        DeviceNode("/dev/nvidia-uvm", "/dev/nvidia-uvm", major=508, minor=0, file_mode=0o666, permissions="rwm"),
        DeviceNode("/dev/nvidiactl", "/dev/nvidiactl", major=195, minor=255, file_mode=0o666, permissions="rwm"),
    )
    assert [(m.host_path, m.container_path, m.options[0]) for m in edits.mounts] == [
        (f"/run/nvidia/driver{LIB}/libcuda.so.580.95.05", f"{LIB}/libcuda.so.580.95.05", "ro"),
        (f"/run/nvidia/driver{LIB}/libnvidia-ml.so.580.95.05", f"{LIB}/libnvidia-ml.so.580.95.05", "ro"),
        ("/run/nvidia/driver/lib/firmware/nvidia/580.95.05/gsp_ga10x.bin",
         "/lib/firmware/nvidia/580.95.05/gsp_ga10x.bin", "ro"),
        ("/run/nvidia/driver/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi", "ro"),
        ("/run/nvidia/driver/run/nvidia-persistenced/socket", "/run/nvidia-persistenced/socket", "nosuid"),
    ]
    assert edits.mounts[-1].options == ("nosuid", "nodev", "rbind", "rprivate", "noexec")
    assert [h.args[2:] for h in edits.hooks] == [
        ("create-symlinks", "--link", f"libcuda.so.1::{LIB}/libcuda.so", "--link",
         f"libcuda.so.580.95.05::{LIB}/libcuda.so.1"),
        ("enable-cuda-compat", "--host-driver-version=580.95.05"),
        ("update-ldcache", "--folder", LIB),
        ("disable-device-node-modification",),
    ]
    assert {h.path for h in edits.hooks} == {"/usr/bin/nvidia-ctk"}  # a host path outside the driver root


def test_the_ipc_feature_flag_and_disabled_hooks_leave_things_out() -> None:
    options = CdiOptions(feature_flags=frozenset({"disable-ipc-discoverer"}),
                         disabled_hooks=frozenset({"create-symlinks", "enable-cuda-compat"}))
    edits = common_edits(FILES, options)
    assert not any("persistenced" in m.container_path for m in edits.mounts)
    assert [h.args[2] for h in edits.hooks] == ["update-ldcache", "disable-device-node-modification"]
    assert common_edits(FILES, CdiOptions(disabled_hooks=frozenset({"all"}))).hooks == ()


def test_a_gpu_gets_its_node_its_drm_nodes_and_the_by_path_links() -> None:
    edits = gpu_edits(GPU1, FILES, OPTIONS)
    assert [(n.path, n.host_path) for n in edits.device_nodes] == [
        ("/dev/nvidia3", "/dev/nvidia3"), ("/dev/dri/card1", "/dev/dri/card1"),
        ("/dev/dri/renderD128", "/dev/dri/renderD128")]
    # card1 is group-only (0660, group 44): the container joins the group, which needs CDI 0.7.0.
    assert edits.additional_gids == (44,)
    (hook,) = edits.hooks
    assert hook.args[2:] == ("create-symlinks", "--link", "../card1::/dev/dri/by-path/pci-0000:0f:00.0-card")


def test_a_gpu_node_nvdp_cannot_see_is_left_for_the_runtime_to_stat() -> None:
    edits = gpu_edits(GPU1, DriverFiles(dev_root="/driver-root"), CdiOptions(host_dev_root="/run/nvidia/driver"))
    assert edits.device_nodes == (DeviceNode("/dev/nvidia3", "/run/nvidia/driver/dev/nvidia3"),)


def test_a_mig_device_gets_its_parent_and_both_capability_nodes() -> None:
    edits = mig_edits(GPU0, MIG_A, FILES, OPTIONS)
    assert [(n.path, n.type, n.major, n.minor, n.file_mode) for n in edits.device_nodes] == [
        ("/dev/nvidia0", "", 195, 0, 0o666),
        ("/dev/nvidia-caps/nvidia-cap66", "", 511, 66, 0o444),
        # Not created on the host yet: fully specified, so the runtime needs no host node.
        ("/dev/nvidia-caps/nvidia-cap67", "c", 511, 67, 0o444),
    ]


def test_a_mig_device_without_its_minors_is_an_error_naming_it() -> None:
    with pytest.raises(CdiBuildError, match="MIG device MIG-a: gpu0/gi7/access is not in"):
        mig_edits(GPU0, MIG_A, DriverFiles(), OPTIONS)
    no_major = DriverFiles(mig_minors=INVENTORY.mig_minors)
    with pytest.raises(CdiBuildError, match="nvidia-cap66 does not exist and the nvidia-caps major is unknown"):
        mig_edits(GPU0, MIG_A, no_major, OPTIONS)


def plan_resources(**settings: object) -> tuple:  # type: ignore[type-arg]
    return build_plan(INVENTORY, Settings(**settings)).resources  # type: ignore[arg-type]


def test_device_plugin_gpu_spec_names_every_advertised_device_once_in_order() -> None:
    from nvdp.core.config.load import parse_config

    config = parse_config("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
                          "      replicas: 4\n", "test")
    resources = plan_resources(mig_strategy="mixed", config=config)
    assert sum(d.gpu_uuid == "GPU-1" for r in resources for d in r.devices) == 4
    result = device_plugin_specs(INVENTORY, resources, FILES, OPTIONS)
    assert list(result.specs) == ["k8s.device-plugin.nvidia.com-gpu.json"]
    spec = result.specs["k8s.device-plugin.nvidia.com-gpu.json"]
    assert spec.kind == "k8s.device-plugin.nvidia.com/gpu"
    assert [d.name for d in spec.devices] == ["MIG-a", "MIG-b", "GPU-1"]  # four replicas of GPU-1: one device
    out = json.loads(render(spec))
    assert out["cdiVersion"] == "0.7.0"  # card1's group
    index = device_plugin_specs(INVENTORY, plan_resources(mig_strategy="mixed"), FILES,
                                CdiOptions(device_id_strategy="index"))
    assert [d.name for d in index.specs["k8s.device-plugin.nvidia.com-gpu.json"].devices] == ["0:0", "0:1", "1"]


def test_devices_that_cannot_be_described_are_left_out_with_a_note() -> None:
    files = DriverFiles(mig_minors={"gpu0/gi7/access": 66, "gpu0/gi7/ci0/access": 67}, caps_major=511)
    result = device_plugin_specs(INVENTORY, plan_resources(mig_strategy="mixed"), files, OPTIONS)
    assert [d.name for d in result.specs["k8s.device-plugin.nvidia.com-gpu.json"].devices] == ["MIG-a", "GPU-1"]
    assert result.notes == ("MIG-b: MIG device MIG-b: gpu0/gi8/access is not in /proc/driver/nvidia-caps/mig-minors: "
                            "left out",)


def test_no_advertised_device_means_no_gpu_spec() -> None:
    assert device_plugin_specs(INVENTORY, (), FILES, OPTIONS).specs == {}


def test_imex_channel_spec_when_configured_and_present() -> None:
    channel = node("/dev/nvidia-caps-imex-channels/channel0", 234, 0)
    files = DriverFiles(dev_root="/driver-root", imex_channels={0: channel})
    result = device_plugin_specs(INVENTORY, (), files, CdiOptions(imex_channel_ids=(0,)))
    spec = result.specs["k8s.device-plugin.nvidia.com-imex-channel.json"]
    assert [d.name for d in spec.devices] == ["0"]
    assert spec.devices[0].container_edits.device_nodes[0].host_path == "/dev/nvidia-caps-imex-channels/channel0"
    missing = device_plugin_specs(INVENTORY, (), DriverFiles(), CdiOptions(imex_channel_ids=(0,)))
    assert missing.specs == {} and "channel0" in missing.notes[0]
    assert device_plugin_specs(INVENTORY, (), files, CdiOptions()).specs == {}


def test_gds_mofed_gdrcopy_specs_have_one_all_device_when_enabled_and_present() -> None:
    files = DriverFiles(gds_nodes=(node("/dev/nvidia-fs0", 240, 0),), gds_mounts=("/etc/cufile.json",),
                        mofed_nodes=(node("/dev/infiniband/uverbs0", 231, 192),))
    options = CdiOptions(gds_enabled=True, mofed_enabled=True, gdrcopy_enabled=True)
    result = device_plugin_specs(INVENTORY, (), files, options)
    assert sorted(result.specs) == ["k8s.device-plugin.nvidia.com-gds.json", "k8s.device-plugin.nvidia.com-mofed.json"]
    gds = result.specs["k8s.device-plugin.nvidia.com-gds.json"]
    assert [d.name for d in gds.devices] == ["all"]
    assert [m.container_path for m in gds.devices[0].container_edits.mounts] == ["/etc/cufile.json"]
    assert gds.container_edits.env == ("NVIDIA_VISIBLE_DEVICES=void",)
    assert result.notes == ("gdrcopy: enabled but /dev/gdrdrv not found under the dev root /: no gdrcopy spec written",)
    assert device_plugin_specs(INVENTORY, (), files, CdiOptions()).specs == {}


def test_claim_spec_names_devices_by_claim_uid() -> None:
    uid = "3f1c2a9e-7d2b-4c1e-9a55-0b6c1d2e3f40"
    common = common_edits(FILES, OPTIONS)
    spec = claim_spec(uid, [("gpu-0", gpu_edits(GPU1, FILES, OPTIONS)), ("gpu-0-mig-1", mig_edits(GPU0, MIG_A, FILES,
                                                                                                   OPTIONS))], common)
    assert spec.kind == "k8s.gpu.nvidia.com/claim"
    assert spec.qualified_names == (f"k8s.gpu.nvidia.com/claim={uid}-gpu-0",
                                    f"k8s.gpu.nvidia.com/claim={uid}-gpu-0-mig-1")
    assert spec.container_edits == common
    assert claim_spec_filename(uid) == f"k8s.gpu.nvidia.com-claim_{uid}.json"
    assert json.loads(render(spec))["cdiVersion"] == "0.7.0"
