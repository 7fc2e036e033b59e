"""MPS sharing on the node side: one supervised control daemon per MPS-shared GPU (started detached from nvdp, by
a launcher: nvdp itself or `nvdp mps-host`), and the shm tmpfs.

See docs/mps.md. Nothing here runs unless the plan holds `MpsDaemonSpec`s.
"""

from __future__ import annotations

import importlib
from typing import Any

from nvdp.mps.errors import MpsError, ShmError

#: Where each name lives. The submodules are imported on first use (PEP 562): a node without MPS never loads them.
_WHERE = {
    **dict.fromkeys(("COMPUTEMODE_DEFAULT", "COMPUTEMODE_EXCLUSIVE_PROCESS", "DEFAULT_PATH", "ComputeModeControl",
                     "DaemonFailed", "DaemonState", "DaemonTimings", "NvmlComputeMode", "find_control_binary",
                     "run_mps_daemon", "stop_mps_daemon"), "control_daemon"),
    "HostLauncher": "host",
    **dict.fromkeys(("CONTROL_BINARY", "DaemonPaths", "Launcher", "LaunchError", "LocalLauncher"), "launcher"),
    **dict.fromkeys(("ensure_shm", "is_tmpfs"), "shm"),
    **dict.fromkeys(("MpsDaemons", "RunningDaemon"), "supervisor"),
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "COMPUTEMODE_DEFAULT",
    "COMPUTEMODE_EXCLUSIVE_PROCESS",
    "CONTROL_BINARY",
    "DEFAULT_PATH",
    "ComputeModeControl",
    "DaemonFailed",
    "DaemonPaths",
    "DaemonState",
    "DaemonTimings",
    "HostLauncher",
    "LaunchError",
    "Launcher",
    "LocalLauncher",
    "MpsDaemons",
    "MpsError",
    "NvmlComputeMode",
    "RunningDaemon",
    "ShmError",
    "ensure_shm",
    "find_control_binary",
    "is_tmpfs",
    "run_mps_daemon",
    "stop_mps_daemon",
]
