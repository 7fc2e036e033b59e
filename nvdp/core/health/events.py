"""What the NVML shell reports to the health policy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class XidEvent:
    """A health event. For MIG-attributable errors NVML reports the parent GPU plus the instance ids."""

    gpu_uuid: str
    event_type: int
    #: NVML's eventData: the XID for XID events, 0 for ECC events.
    xid: int
    gi: int | None = None
    ci: int | None = None
