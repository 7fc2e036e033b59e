"""The simulated node's driver root: what `nvdp.cdi.discover` scans on a real node, so CDI runs end to end without a
GPU (docs/simulation.md, docs/cdi.md).

Written into the simulated host root beside the fake `/dev`, sysfs and mig-minors: device nodes (real character
devices when nvdp runs as root and may create them, else plain files holding `major:minor`, which discovery reads
only on a simulated node), fake driver libraries with their soname links, a real-format `etc/ld.so.cache` listing
them, GSP firmware, a few driver binaries, the persistenced socket and `proc/devices`. None of it is a working driver:
the libraries are text files.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from nvdp.core.cdi import ldcache
from nvdp.sim.node import SimNode, mig_slots

#: Character majors as a typical Linux host numbers them (the driver's is fixed; uvm and caps are dynamic).
NVIDIA_MAJOR, UVM_MAJOR, CAPS_MAJOR = 195, 508, 511
#: Minors of the control nodes on the nvidia major, and uvm's.
CONTROL_NODE_NUMBERS = {
    "/dev/nvidiactl": (NVIDIA_MAJOR, 255),
    "/dev/nvidia-modeset": (NVIDIA_MAJOR, 254),
    "/dev/nvidia-uvm": (UVM_MAJOR, 0),
    "/dev/nvidia-uvm-tools": (UVM_MAJOR, 1),
}
LIBRARY_DIR = "usr/lib/x86_64-linux-gnu"
#: (library stem, soname): fake libraries `<stem>.<driver version>` and their `<soname>` links.
LIBRARIES = (
    ("libcuda.so", "libcuda.so.1"),
    ("libnvidia-ml.so", "libnvidia-ml.so.1"),
    ("libnvidia-ptxjitcompiler.so", "libnvidia-ptxjitcompiler.so.1"),
    ("libnvidia-nvvm.so", "libnvidia-nvvm.so.4"),
)
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced")
FIRMWARE = ("gsp_ga10x.bin", "gsp_tu10x.bin")


def _device(path: Path, major: int, minor: int, mode: int) -> None:
    """A real character node where this process may create one, else a plain file saying `major:minor`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if os.geteuid() == 0:
        try:
            os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
            os.chmod(path, mode)
            return
        except OSError:
            pass  # no CAP_MKNOD (an unprivileged container): a plain file stands in
    path.write_text(f"{major}:{minor}\n")
    os.chmod(path, mode)


def write_driver_root(node: SimNode, root: Path) -> None:
    """Write the simulated driver files under `root` (the simulated host root, whose mig-minors already exist)."""
    version = node.driver_version
    for dev in node.control_devices:
        major, minor = CONTROL_NODE_NUMBERS.get(dev, (NVIDIA_MAJOR, 250))
        _device(root / dev.lstrip("/"), major, minor, 0o666)
    for gpu in node.gpus:
        _device(root / f"dev/nvidia{gpu.minor_number}", NVIDIA_MAJOR, gpu.minor_number, 0o666)
    minors = root / "proc/driver/nvidia-caps/mig-minors"
    if any(mig_slots(g) for g in node.gpus) and minors.exists():
        for line in minors.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("gpu") and value.strip().isdigit():
                number = int(value)
                _device(root / f"dev/nvidia-caps/nvidia-cap{number}", CAPS_MAJOR, number, 0o444)
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/devices").write_text(
        f"Character devices:\n{NVIDIA_MAJOR} nvidia-frontend\n{UVM_MAJOR} nvidia-uvm\n{CAPS_MAJOR} nvidia-caps\n")

    libdir = root / LIBRARY_DIR
    libdir.mkdir(parents=True, exist_ok=True)
    cache = []
    for stem, soname in LIBRARIES:
        real = f"{stem}.{version}"
        (libdir / real).write_text(f"fake {real} of nvdp's simulated node\n")
        for link, target in ((soname, real), (stem, soname)):
            with contextlib.suppress(FileNotFoundError):
                (libdir / link).unlink()
            (libdir / link).symlink_to(target)
        cache.append((soname, f"/{LIBRARY_DIR}/{soname}"))
    (libdir / "vdpau").mkdir(exist_ok=True)
    (libdir / f"vdpau/libvdpau_nvidia.so.{version}").write_text("fake VDPAU driver of nvdp's simulated node\n")
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/ld.so.cache").write_bytes(ldcache.encode(cache, layout="new"))

    firmware = root / f"lib/firmware/nvidia/{version}"
    firmware.mkdir(parents=True, exist_ok=True)
    for name in FIRMWARE:
        (firmware / name).write_text("fake GSP firmware\n")
    bindir = root / "usr/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        (bindir / name).write_text("#!/bin/sh\necho 'fake binary of an nvdp simulated node' >&2\nexit 1\n")
        (bindir / name).chmod(0o755)
    socket_dir = root / "run/nvidia-persistenced"
    socket_dir.mkdir(parents=True, exist_ok=True)
    (socket_dir / "socket").write_text("")
