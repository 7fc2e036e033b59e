"""MPS sharing on the node side: one supervised control daemon per MPS-shared GPU (started detached from nvdp, by
a launcher: nvdp itself or `nvdp mps-host`), and the shm tmpfs.

See docs/mps.md. Nothing here runs unless the plan holds `MpsDaemonSpec`s.
"""

from nvdp.mps.control_daemon import (
    COMPUTEMODE_DEFAULT,
    COMPUTEMODE_EXCLUSIVE_PROCESS,
    DEFAULT_PATH,
    ComputeModeControl,
    DaemonFailed,
    DaemonState,
    DaemonTimings,
    MpsError,
    NvmlComputeMode,
    find_control_binary,
    run_mps_daemon,
    stop_mps_daemon,
)
from nvdp.mps.host import HostLauncher
from nvdp.mps.launcher import CONTROL_BINARY, DaemonPaths, Launcher, LaunchError, LocalLauncher
from nvdp.mps.shm import ShmError, ensure_shm, is_tmpfs
from nvdp.mps.supervisor import MpsDaemons, RunningDaemon

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
