"""MPS sharing on the node side: one supervised control daemon per MPS-shared GPU, and the shm tmpfs.

See docs/mps.md. Nothing here runs unless the plan holds `MpsDaemonSpec`s.
"""

from nvdp.mps.control_daemon import (
    COMPUTEMODE_DEFAULT,
    COMPUTEMODE_EXCLUSIVE_PROCESS,
    CONTROL_BINARY,
    DEFAULT_PATH,
    ComputeModeControl,
    DaemonState,
    DaemonTimings,
    MpsError,
    NvmlComputeMode,
    find_control_binary,
    serve_mps_daemon,
)
from nvdp.mps.shm import ShmError, ensure_shm, is_tmpfs
from nvdp.mps.supervisor import MpsDaemons, RunningDaemon

__all__ = [
    "COMPUTEMODE_DEFAULT",
    "COMPUTEMODE_EXCLUSIVE_PROCESS",
    "CONTROL_BINARY",
    "DEFAULT_PATH",
    "ComputeModeControl",
    "DaemonState",
    "DaemonTimings",
    "MpsDaemons",
    "MpsError",
    "NvmlComputeMode",
    "RunningDaemon",
    "ShmError",
    "ensure_shm",
    "find_control_binary",
    "is_tmpfs",
    "serve_mps_daemon",
]
