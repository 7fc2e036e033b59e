"""Device health, the pure part: which events count (`xids`) and what they do to which devices (`tracker`).

The shell that listens to NVML and feeds these is `nvdp.nvml.health`; docs/health.md describes the behaviour.
Nothing here imports trio or pynvml.
"""

from nvdp.core.health.tracker import ALL_GPUS, Fault, HealthTracker
from nvdp.core.health.xids import DEFAULT_IGNORED, NEVER_RECOVER, XidPolicy, xid_name

__all__ = ["ALL_GPUS", "DEFAULT_IGNORED", "NEVER_RECOVER", "Fault", "HealthTracker", "XidPolicy", "xid_name"]
