"""A simulated GPU node: a fake `libnvidia-ml.so.1` plus the host files a device plugin reads.

`activate(node, workdir)` builds the fake library (C, compiled once and cached), loads it into this process so
pynvml picks it up instead of a real driver, writes the node's state file and a fake host root. Everything above
`nvdp.nvml.adapter` then runs unmodified. docs/simulation.md has the YAML keys and the fault-injection lines.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from nvdp.sim.build import SimBuildError, build_fake_nvml
from nvdp.sim.driver_root import write_driver_root
from nvdp.sim.node import SimGpu, SimMigDevice, SimNode, SimNodeError, load_node, mig_slots, parse_node, render_state

__all__ = [
    "DEFAULT_NODE",
    "STATE_ENV",
    "SimBuildError",
    "SimGpu",
    "SimHandle",
    "SimMigDevice",
    "SimNode",
    "SimNodeError",
    "activate",
    "build_fake_nvml",
    "default_node_path",
    "load_node",
    "mig_minor",
    "parse_node",
]

#: The environment variable naming the state file; the fake library reads it at every `nvmlInit`.
STATE_ENV = "NVDP_SIM_STATE"


def default_node_path() -> Path:
    """The shipped 4-GPU node (4x A100 SXM4 40GB, NVLink all-to-all, two NUMA nodes, MIG off)."""
    return Path(str(resources.files("nvdp.sim").joinpath("default-node.yaml")))


DEFAULT_NODE: SimNode = load_node(default_node_path())


@dataclass(frozen=True, slots=True)
class SimHandle:
    """Where an activated simulated node lives, and how to poke it."""

    state_file: Path
    #: Fake `/`: `dev/`, `sys/bus/pci/devices/*/numa_node`, `proc/driver/nvidia-caps/mig-minors`.
    host_root: Path
    #: Tailed by the fake for `xid <uuid> <code>`, `ecc <uuid>` and `lost <uuid>` lines.
    events_file: Path
    #: One `computemode <uuid> <mode>` line per successful `nvmlDeviceSetComputeMode`.
    compute_mode_log: Path

    def inject(self, line: str) -> None:
        """Appends one events-file line; a single write so a concurrent reader never sees half of it."""
        with self.events_file.open("a") as f:
            f.write(line.rstrip("\n") + "\n")

    def inject_xid(self, uuid: str, xid: int) -> None:
        self.inject(f"xid {uuid} {xid}")

    def inject_lost(self, uuid: str) -> None:
        self.inject(f"lost {uuid}")

    def compute_mode_changes(self) -> list[tuple[str, int]]:
        if not self.compute_mode_log.exists():
            return []
        changes = []
        for line in self.compute_mode_log.read_text().splitlines():
            _, uuid, mode = line.split()
            changes.append((uuid, int(mode)))
        return changes


_loaded_library: ctypes.CDLL | None = None


def _load_library(path: Path) -> None:
    global _loaded_library
    if _loaded_library is None:
        # RTLD_GLOBAL plus the soname make pynvml's later CDLL("libnvidia-ml.so.1") resolve to this already loaded
        # object instead of searching the library path. Loading once per process is all that is possible anyway:
        # pynvml keeps the first library it finds.
        _loaded_library = ctypes.CDLL(str(path.resolve()), mode=ctypes.RTLD_GLOBAL)


def mig_minor(gpu_minor: int, gi: int, ci: int | None = None) -> int:
    """The nvidia-caps minor the driver assigns to `gpu<g>/gi<gi>/access` (ci None) or `.../ci<ci>/access`.

    Mirrors the driver's layout (1 config, 2 monitor, then per GPU 15 GIs of 1 + 8 CI entries), so capability
    paths look like a real node's.
    """
    base = 3 + gpu_minor * 15 * 9 + gi * 9
    return base if ci is None else base + 1 + ci


def _write_host_root(node: SimNode, host_root: Path) -> None:
    if host_root.exists():
        shutil.rmtree(host_root)
    dev = host_root / "dev"
    dev.mkdir(parents=True)
    for path in node.control_devices:
        (host_root / path.lstrip("/")).touch()
    lines = ["config 1", "monitor 2"]
    for gpu in node.gpus:
        (dev / f"nvidia{gpu.minor_number}").touch()
        # sysfs names devices by a 4-digit domain, lower case: 00000000:0F:00.0 -> 0000:0f:00.0.
        sysfs = host_root / "sys/bus/pci/devices" / gpu.pci_bus_id.lower()[-12:]
        sysfs.mkdir(parents=True)
        (sysfs / "numa_node").write_text(f"{-1 if gpu.numa_node is None else gpu.numa_node}\n")
        for _, mig in mig_slots(gpu):
            lines.append(f"gpu{gpu.minor_number}/gi{mig.gi}/access {mig_minor(gpu.minor_number, mig.gi)}")
            lines.append(
                f"gpu{gpu.minor_number}/gi{mig.gi}/ci{mig.ci}/access {mig_minor(gpu.minor_number, mig.gi, mig.ci)}"
            )
    caps = host_root / "proc/driver/nvidia-caps"
    caps.mkdir(parents=True)
    # Several CIs can share a GI: list each GI entry once.
    (caps / "mig-minors").write_text("\n".join(dict.fromkeys(lines)) + "\n")


def activate(node: SimNode, workdir: Path, cache_dir: Path | None = None) -> SimHandle:
    """Makes this process see `node` through NVML; returns where its files are.

    Call it before the first `nvmlInit`. Calling it again (another node, same or another workdir) rewrites the
    state; the fake reads it at the next `nvmlInit`, so shut NVML down and init again to switch.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _load_library(build_fake_nvml(cache_dir))
    if node.events_file is not None:
        events_file = Path(node.events_file)
        events_file.parent.mkdir(parents=True, exist_ok=True)
        events_file.touch()
    else:
        events_file = workdir / "events"
        events_file.write_text("")
    compute_mode_log = workdir / "compute-mode.log"
    compute_mode_log.write_text("")
    host_root = workdir / "host"
    _write_host_root(node, host_root)
    write_driver_root(node, host_root)
    state_file = workdir / "nvml-state"
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(render_state(node, events_file, compute_mode_log))
    tmp.replace(state_file)  # an init racing with this write sees the old node or the new one, never half
    os.environ[STATE_ENV] = str(state_file)
    return SimHandle(
        state_file=state_file, host_root=host_root, events_file=events_file, compute_mode_log=compute_mode_log
    )
