"""Finding the driver's files: the simulated driver root, the ld.so.cache fallback, symlinks inside the root, DRM."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nvdp.cdi.discover import ScanRoots, choose_roots, discover_driver_files, scan_driver_files
from nvdp.core.cdi import ldcache
from nvdp.core.cdi.build import NodeInfo
from nvdp.core.inventory import Gpu, NodeInventory
from nvdp.sim import _write_host_root, mig_minor, parse_node
from nvdp.sim import driver_root as sim_driver_root
from tests.helpers import gpu

VERSION = "580.82.07"
LIB = "/usr/lib/x86_64-linux-gnu"


def sim_node_yaml() -> str:
    import yaml

    a100 = gpu(0, migEnabled=True, migDevices=[
        {"uuid": "MIG-aaaaaaaa-0000-0000-0000-000000000001", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 7, "ci": 0}])
    return yaml.safe_dump({"driverVersion": VERSION, "cudaDriverVersion": 13000, "gpus": [a100, gpu(1)]})


def inventory(minors: dict[str, int] | None = None, version: str = VERSION) -> NodeInventory:
    gpus = (Gpu(index=0, uuid="GPU-0", name="x", memory_mib=1, minor=0, pci_bus_id="00000000:07:00.0",
                compute_capability="8.0"),
            Gpu(index=1, uuid="GPU-1", name="x", memory_mib=1, minor=1, pci_bus_id="00000000:0F:00.0",
                compute_capability="8.0"))
    return NodeInventory(driver_version=version, cuda_driver_version=13000, gpus=gpus, mig_minors=minors or {})


def sim_root(tmp_path: Path) -> Path:
    node = parse_node(sim_node_yaml())
    root = tmp_path / "host"
    _write_host_root(node, root)
    sim_driver_root.write_driver_root(node, root)
    return root


def sim_roots(root: Path, plain: bool = True) -> ScanRoots:
    return ScanRoots(root, root, sys_root=root, proc_root=root, plain_file_nodes=plain, kernel_release="6.1.0")


def test_the_simulated_driver_root_is_found_like_a_real_one(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    files = scan_driver_files(sim_roots(root), inventory(version=""))  # version from libcuda's file name
    assert files.driver_version == VERSION
    assert files.library_dirs == (LIB,)
    assert [lib.path for lib in files.libraries] == [
        f"{LIB}/libcuda.so.{VERSION}", f"{LIB}/libnvidia-ml.so.{VERSION}", f"{LIB}/libnvidia-nvvm.so.{VERSION}",
        f"{LIB}/libnvidia-ptxjitcompiler.so.{VERSION}", f"{LIB}/vdpau/libvdpau_nvidia.so.{VERSION}"]
    assert files.libraries[0].links == (("libcuda.so.1", f"libcuda.so.{VERSION}"), ("libcuda.so", "libcuda.so.1"))
    assert files.firmware == (f"/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin",
                              f"/lib/firmware/nvidia/{VERSION}/gsp_tu10x.bin")
    assert files.binaries == ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-debugdump", "/usr/bin/nvidia-persistenced")
    assert files.ipc_sockets == ("/run/nvidia-persistenced/socket",)
    assert [n.path for n in files.control_nodes] == ["/dev/nvidia-uvm-tools", "/dev/nvidia-uvm", "/dev/nvidiactl"]
    assert files.gpu_nodes[1] == NodeInfo("/dev/nvidia1", 195, 1, 0o666, 0)
    assert files.caps_major == sim_driver_root.CAPS_MAJOR
    gi = mig_minor(0, 7)
    assert files.cap_nodes[gi] == NodeInfo(f"/dev/nvidia-caps/nvidia-cap{gi}", sim_driver_root.CAPS_MAJOR, gi, 0o444, 0)
    assert files.notes == ()


def test_simulated_nodes_are_plain_files_without_the_right_to_make_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    root = sim_root(tmp_path)
    assert stat.S_ISREG((root / "dev/nvidia0").stat().st_mode)
    assert (root / "dev/nvidia0").read_text() == "195:0\n"
    assert scan_driver_files(sim_roots(root), inventory()).gpu_nodes[0] == NodeInfo("/dev/nvidia0", 195, 0, 0o666, 0)
    # On a real node a plain file is no device node.
    assert scan_driver_files(sim_roots(root, plain=False), inventory()).gpu_nodes == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="making character devices needs root")
def test_as_root_the_simulated_nodes_are_character_devices(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    st = (root / "dev/nvidia1").stat()
    if not stat.S_ISCHR(st.st_mode):
        pytest.skip("no CAP_MKNOD here: the simulated node fell back to plain files")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (195, 1)
    assert scan_driver_files(sim_roots(root, plain=False), inventory()).gpu_nodes[1].minor == 1


def test_the_simulated_ld_so_cache_lists_the_fake_libraries(tmp_path: Path) -> None:
    entries = ldcache.parse((sim_root(tmp_path) / "etc/ld.so.cache").read_bytes())
    assert ("libcuda.so.1", f"{LIB}/libcuda.so.1") in [(e.name, e.path) for e in entries]


def test_libraries_outside_the_standard_dirs_are_found_through_the_ld_so_cache(tmp_path: Path) -> None:
    root = tmp_path / "root"
    opt = root / "opt/nvidia/lib"
    opt.mkdir(parents=True)
    (opt / f"libcuda.so.{VERSION}").write_text("x")
    (opt / "libcuda.so.1").symlink_to(f"libcuda.so.{VERSION}")
    (root / "etc").mkdir()
    (root / "etc/ld.so.cache").write_bytes(ldcache.encode([("libcuda.so.1", "/opt/nvidia/lib/libcuda.so.1")],
                                                          layout="old"))
    files = scan_driver_files(ScanRoots(root, root), inventory(version=""))
    assert (files.driver_version, files.library_dirs) == (VERSION, ("/opt/nvidia/lib",))
    assert [lib.path for lib in files.libraries] == [f"/opt/nvidia/lib/libcuda.so.{VERSION}"]


def test_absolute_symlinks_resolve_inside_the_driver_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib64").mkdir(parents=True)
    (root / "real").mkdir()
    (root / f"real/libcuda.so.{VERSION}").write_text("x")
    # Absolute: it means the driver root's /real, never this machine's.
    (root / f"usr/lib64/libcuda.so.{VERSION}").symlink_to(f"/real/libcuda.so.{VERSION}")
    (root / "usr/lib64/libnvidia-ml.so.1").symlink_to("/nonexistent/libnvidia-ml.so.1")
    files = scan_driver_files(ScanRoots(root, root), inventory())
    assert files.library_dirs == ("/real",)
    assert [lib.path for lib in files.libraries] == [f"/real/libcuda.so.{VERSION}"]


def test_nothing_found_is_a_note_not_an_error(tmp_path: Path) -> None:
    files = scan_driver_files(ScanRoots(tmp_path, tmp_path), inventory())
    assert files.libraries == () and files.control_nodes == ()
    assert any("no driver library" in n for n in files.notes)
    assert any("ld.so.cache" in n for n in files.notes)


def test_drm_nodes_and_by_path_links_of_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    root = sim_root(tmp_path)
    (root / "sys/bus/pci/devices/0000:0f:00.0/drm/card1").mkdir(parents=True)
    (root / "sys/bus/pci/devices/0000:0f:00.0/drm/renderD129").mkdir()
    sim_driver_root._device(root / "dev/dri/card1", 226, 1, 0o660)
    sim_driver_root._device(root / "dev/dri/renderD129", 226, 129, 0o666)
    (root / "dev/dri/by-path").mkdir()
    (root / "dev/dri/by-path/pci-0000:0f:00.0-card").symlink_to("../card1")
    files = scan_driver_files(sim_roots(root), inventory())
    assert [n.path for n in files.drm_nodes["0000:0f:00.0"]] == ["/dev/dri/card1", "/dev/dri/renderD129"]
    assert files.drm_links["0000:0f:00.0"] == (("../card1", "/dev/dri/by-path/pci-0000:0f:00.0-card"),)


def test_roots_upstreams_mount_or_nvdps_own_paths(tmp_path: Path) -> None:
    mounted = tmp_path / "driver-root"
    (mounted / "dev").mkdir(parents=True)
    roots, how = choose_roots(mounted, Path("/run/nvidia/driver"), Path("/"))
    assert (roots.driver_root, roots.dev_root) == (mounted, mounted)
    assert "the host's /run/nvidia/driver" in how
    roots, how = choose_roots(tmp_path / "absent", Path("/run/nvidia/driver"), Path("/"))
    assert (roots.driver_root, roots.dev_root) == (Path("/run/nvidia/driver"), Path("/"))
    assert "does not exist" in how


async def test_discovery_runs_off_the_event_loop(tmp_path: Path) -> None:
    files = await discover_driver_files(sim_roots(sim_root(tmp_path)), inventory())
    assert files.driver_version == VERSION


def test_an_oversized_ld_so_cache_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvdp.cdi import discover

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/ld.so.cache").write_bytes(ldcache.encode([("libcuda.so.1", "/x/libcuda.so.1")]))
    monkeypatch.setattr(discover, "LDCACHE_MAX_BYTES", 16)
    files = scan_driver_files(ScanRoots(tmp_path, tmp_path), inventory())
    assert any("is larger than 16 bytes: not read" in n for n in files.notes)


def test_a_symlink_loop_ends_the_search_for_that_path(tmp_path: Path) -> None:
    lib = tmp_path / "usr/lib64"
    lib.mkdir(parents=True)
    (lib / f"libcuda.so.{VERSION}").symlink_to(f"libnvidia-ml.so.{VERSION}")
    (lib / f"libnvidia-ml.so.{VERSION}").symlink_to(f"libcuda.so.{VERSION}")
    files = scan_driver_files(ScanRoots(tmp_path, tmp_path), inventory())
    assert files.libraries == () and files.library_dirs == ()


async def test_a_dra_claim_spec_from_the_simulated_driver_root(tmp_path: Path) -> None:
    """The path DRA's claim preparer takes: driver files and options, per-device edits, one spec file per claim."""
    import json

    from nvdp.cdi.plugin_specs import load_driver_files
    from nvdp.cdi.writer import write_spec
    from nvdp.core.cdi.build import claim_spec, claim_spec_filename, common_edits, gpu_edits
    from nvdp.core.config.settings import Settings

    root = sim_root(tmp_path)
    inv = inventory()
    files, options = await load_driver_files(Settings(), inv, root)
    uid = "0b6c1d2e-0000-4c1e-9a55-3f1c2a9e7d2b"
    spec = claim_spec(uid, [("gpu-1", gpu_edits(inv.gpus[1], files, options))], common_edits(files, options))
    assert await write_spec(tmp_path / "cdi", claim_spec_filename(uid), spec)
    written = json.loads((tmp_path / "cdi" / f"k8s.gpu.nvidia.com-claim_{uid}.json").read_text())
    assert written["kind"] == "k8s.gpu.nvidia.com/claim" and written["cdiVersion"] == "0.5.0"
    (device,) = written["devices"]
    assert device["name"] == f"{uid}-gpu-1"
    assert device["containerEdits"]["deviceNodes"][0]["hostPath"] == f"{root}/dev/nvidia1"
