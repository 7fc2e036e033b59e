"""The values that cross between the DRA gRPC servers (`nvdp.dra`) and what prepares claims, free of protobuf.

The kubelet's `NodePrepareResources` carries claims by reference (namespace, UID, name); nvdp reads the claim from
the API itself, so these types hold only what the kubelet sends and what nvdp answers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """One claim in a Prepare or Unprepare request (`dra.v1.Claim`)."""

    namespace: str
    uid: str
    name: str


@dataclass(frozen=True, slots=True)
class PreparedDevice:
    """One device of a prepared claim (`dra.v1.Device`)."""

    #: The claim's request names this device satisfies; for a subrequest `<request>/<sub>`, the main request's
    #: name only: the kubelet matches a container's `resources.claims[].request` against these.
    request_names: tuple[str, ...]
    pool_name: str
    device_name: str
    #: Fully-qualified CDI device names the runtime injects for this device.
    cdi_device_ids: tuple[str, ...]
    #: The share this device serves with consumable capacity (`allocation.devices.results[].shareID`), else "".
    share_id: str = ""


@dataclass(frozen=True, slots=True)
class PrepareResult:
    """The answer for one claim: its devices, or an error shown to the user (never both)."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class UnprepareResult:
    """The answer for one claim in Unprepare: "" when done (also for a claim nvdp never prepared)."""

    error: str = ""
