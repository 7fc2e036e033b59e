"""The DRA kubelet plugin's rules, as plain functions: what it registers, what it answers, what health it reports.

The shells (`nvdp.dra.*`) turn these values into protobuf and sockets; nothing here knows about either. Reference:
dra-and-cdi.md §2 (registration, wire names, Prepare/Unprepare semantics, the health stream).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import PurePath

from nvdp.core.dra.devices import HealthFact
from nvdp.core.dra.types import ClaimRef, PreparedDevice, PrepareResult, UnprepareResult
from nvdp.core.health.tracker import Fault, HealthTracker
from nvdp.core.plan.model import Device

#: `PluginInfo.type` of a DRA driver.
PLUGIN_TYPE = "DRAPlugin"
#: What nvdp serves, in the order the kubelet reads them: it takes the first DRAPlugin version it knows, so v1 comes
#: first; both health versions are served and advertised (kubelets 1.34-1.36 dial v1alpha1 only).
SUPPORTED_VERSIONS = ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth")
#: The socket the kubelet dials for DRAPlugin and DRAResourceHealth, in `<plugins dir>/<driver>/`.
PLUGIN_SOCKET = "dra.sock"

#: Claims one Prepare or Unprepare may carry. The kubelet sends one call per pod and driver, and a pod has at most
#: 128 claims (`spec.resourceClaims`); more is not a kubelet and is refused whole.
MAX_CLAIMS_PER_CALL = 128
#: How long one Prepare or Unprepare may take before every claim still open is answered with an error: inside the
#: kubelet's 45 s per call, so that the answer (not a deadline error) reaches it and the pod's events say why. A
#: backstop: the claim preparer's own deadline (30 s) and rollback bound (5 s) come first.
CALL_DEADLINE_S = 38.0
#: Calls waiting or running at once; the kubelet makes one per pod start or end, so more means something is stuck.
MAX_PENDING_CALLS = 16

#: The health stream resends the full list at least this often: the kubelet reports a device Unknown when it has
#: heard nothing about it for its timeout (30 s by default).
HEALTH_RESEND_S = 10.0
#: `DeviceHealth.message` is cut to this many characters (the kubelet keeps no more).
MAX_HEALTH_MESSAGE = 1024


def registration_socket_name(driver: str) -> str:
    """`<driver>-reg.sock`, the name the kubelet's plugin watcher finds in its registry directory."""
    return f"{driver}-reg.sock"


def plugin_socket_path(plugins_dir: PurePath, driver: str) -> PurePath:
    """The absolute DRA socket path advertised in `GetInfo` (the kubelet dials it as given)."""
    return plugins_dir / driver / PLUGIN_SOCKET


def kubelet_request_names(names: Iterable[str]) -> tuple[str, ...]:
    """Request names as the kubelet matches them against `container.resources.claims[].request`: a subrequest
    (`main/small`, from a prioritized list) counts as its request (`main`); each name once, order kept."""
    return tuple(dict.fromkeys(name.partition("/")[0] for name in names))


def unique_claims(claims: Sequence[ClaimRef]) -> tuple[ClaimRef, ...]:
    """Each claim once, by UID (the answer is a map keyed by UID), in request order."""
    seen: dict[str, ClaimRef] = {}
    for claim in claims:
        seen.setdefault(claim.uid, claim)
    return tuple(seen.values())


#: A claim's error is cut to this many characters (the kubelet puts it in a pod Event, whose message holds 1 KiB).
MAX_CLAIM_ERROR = 1024


def clip_error(text: str) -> str:
    if len(text) <= MAX_CLAIM_ERROR:
        return text
    tail = f"... ({len(text)} characters)"
    return text[: MAX_CLAIM_ERROR - len(tail)] + tail


def complete_prepare(claims: Sequence[ClaimRef], results: Mapping[str, PrepareResult],
                     missing: str) -> dict[str, PrepareResult]:
    """An entry for every claim (the kubelet counts a missing one as skipped), `missing` for those without, and
    nothing for claims that were not asked about. Device request names in the kubelet's form."""
    answer: dict[str, PrepareResult] = {}
    for claim in claims:
        result = results.get(claim.uid)
        if result is None:
            answer[claim.uid] = PrepareResult(error=missing)
        elif result.error:
            # An error wins: the kubelet ignores devices next to one, so none are sent.
            answer[claim.uid] = PrepareResult(error=clip_error(result.error))
        else:
            answer[claim.uid] = PrepareResult(devices=tuple(
                PreparedDevice(kubelet_request_names(d.request_names), d.pool_name, d.device_name, d.cdi_device_ids,
                               d.share_id) for d in result.devices))
    return answer


def complete_unprepare(claims: Sequence[ClaimRef], results: Mapping[str, UnprepareResult],
                       missing: str) -> dict[str, UnprepareResult]:
    """An entry for every claim (the kubelet needs one for each), `missing` for those without."""
    return {claim.uid: UnprepareResult(clip_error(results.get(claim.uid, UnprepareResult(error=missing)).error))
            for claim in claims}


def claim_problem(claim: ClaimRef) -> str:
    """Why the kubelet's reference cannot name a claim ("" when it can)."""
    if not claim.uid:
        return "the claim reference has no UID"
    if not claim.namespace or not claim.name:
        return f"the claim reference {claim.uid} has no namespace or name"
    return ""


# -- health ----------------------------------------------------------------------------------------------------------


class Health(IntEnum):
    """`HealthStatus` of the DRA health API (same numbers)."""

    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2


@dataclass(frozen=True, slots=True)
class HealthTarget:
    """One published DRA device as health sees it: the physical GPU it is on and, for a MIG device, its instance."""

    device_name: str
    gpu_uuid: str
    #: (gi, ci) of a MIG device, None for a whole GPU.
    mig_placement: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class DeviceHealthEntry:
    device_name: str
    health: Health
    message: str = ""


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """The complete device list of one pool, as every health message sends it."""

    pool: str
    devices: tuple[DeviceHealthEntry, ...] = ()


def health_snapshot(pool: str, targets: Sequence[HealthTarget], unhealthy: Mapping[str, str]) -> HealthSnapshot:
    """Every target, Healthy unless `unhealthy` (device name -> reason) names it; in the targets' order."""
    return HealthSnapshot(pool, tuple(
        DeviceHealthEntry(t.device_name, Health.UNHEALTHY, unhealthy[t.device_name][:MAX_HEALTH_MESSAGE])
        if t.device_name in unhealthy else DeviceHealthEntry(t.device_name, Health.HEALTHY)
        for t in targets))


def unhealthy_targets(tracker: HealthTracker, targets: Sequence[HealthTarget]) -> dict[str, str]:
    """Device name -> reason for every target a fault of the device plugin's tracker reaches: one NVML health
    loop for both APIs, with its mapping (an XID on a GPU marks the GPU and every MIG device on it; a MIG XID its
    instance and the whole GPU; a node-wide fault everything)."""
    # The tracker maps faults onto plan devices by GPU and MIG placement; a DRA device stands in as one.
    stand_ins = [Device(id=t.device_name, physical_id=t.device_name, index="", gpu_uuid=t.gpu_uuid, gpu_index=-1,
                        paths=(), mig_placement=t.mig_placement) for t in targets]
    return tracker.unhealthy(stand_ins)


_XID_REASON = re.compile(r"^XID ([0-9]+)\b")
#: What the double-bit ECC event is as an XID (NVIDIA's driver taints it as `xid=48`).
ECC_XID = 48
#: XID 79: the GPU fell off the bus.
GPU_LOST_XID = 79


def health_facts(faults: Sequence[Fault]) -> tuple[HealthFact, ...]:
    """The tracker's faults as the ResourceSlice taints' facts: an XID (fatal: the tracker keeps only critical
    ones), a lost GPU, or a GPU nothing watches (an NVML error, the health watch down: scope `*`)."""
    facts = []
    for fault in faults:
        match = _XID_REASON.match(fault.reason)
        if match is not None:
            xid = int(match.group(1))
            facts.append(HealthFact(fault.gpu_uuid, fault.placement, xid=xid, lost=xid == GPU_LOST_XID))
        elif fault.reason.startswith("double-bit ECC"):
            facts.append(HealthFact(fault.gpu_uuid, fault.placement, xid=ECC_XID))
        elif fault.permanent and "lost" in fault.reason.lower():
            facts.append(HealthFact(fault.gpu_uuid, fault.placement, lost=True))
        else:
            facts.append(HealthFact(fault.gpu_uuid, fault.placement, unmonitored=True))
    return tuple(facts)
