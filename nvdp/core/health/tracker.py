"""Device health as a pure state machine: faults come in, an unhealthy-device map goes out.

The NVML loop (`nvdp.nvml.health`) feeds events, errors and probe results in and asks which GPUs are due for a
recovery probe; every method takes `now` explicitly, so this module has no clock, no trio and no NVML, and tests
drive time by hand.

A fault is kept per *scope*: a whole GPU (`placement` None) or one MIG instance `(gi, ci)` of it, plus the node-wide
scope `ALL_GPUS` for failures that cannot be pinned on one GPU (the event wait itself failing). `unhealthy()` maps
faults onto the plan's devices:

- a GPU-wide fault marks every device with that `gpu_uuid`: the whole GPU, each of its MIG devices, every replica;
- a MIG fault marks the devices whose `mig_placement` is `(gi, ci)`, replicas included, **and** any device that
  advertises the whole GPU: the instance is part of that GPU, so the whole device is affected too (a plan normally
  has one or the other for a GPU, never both);
- a node-wide fault marks every device.

Recovery: a fault is *recoverable* unless it is `permanent` (XID 79, GPU lost). Each GPU (and the node-wide scope)
has a quiet period that restarts at every critical event on it and every failed probe. Once it has passed and
none of the GPU's faults is permanent, the GPU is due for a probe; a good probe clears its recoverable faults.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from nvdp.core.health.events import XidEvent
from nvdp.core.health.xids import EVENT_DOUBLE_BIT_ECC, EVENT_XID_CRITICAL, NEVER_RECOVER, XidPolicy, xid_name
from nvdp.core.plan.model import Device

#: The scope of a node-wide fault (`on_error(None, ...)`): it marks every device and is probed as one unit.
ALL_GPUS = "*"


@dataclass(frozen=True, slots=True)
class Fault:
    """Why one scope is Unhealthy."""

    #: The physical GPU, or `ALL_GPUS`.
    gpu_uuid: str
    #: `(gi, ci)` of the MIG instance the event named, or None for the whole GPU.
    placement: tuple[int, int] | None
    #: Human-readable cause, shown per device: `XID 48 (double-bit ECC error)`.
    reason: str
    #: Never cleared by a probe; only a restart of nvdp brings the devices back.
    permanent: bool
    #: When the scope first went Unhealthy.
    since: float
    #: The latest event or error on this scope.
    last_event: float


def _scope_text(placement: tuple[int, int] | None) -> str:
    return "" if placement is None else f" in MIG instance (gi {placement[0]}, ci {placement[1]})"


class HealthTracker:
    """Faults per scope and the probe schedule. Not thread-safe: one task owns it (trio's, by construction)."""

    def __init__(self, policy: XidPolicy, quiet_period_s: float = 300.0) -> None:
        self.policy = policy
        self.quiet_period_s = quiet_period_s
        self._faults: dict[tuple[str, tuple[int, int] | None], Fault] = {}
        #: Per GPU (or ALL_GPUS): when its quiet period (re)started; present only while it has a fault.
        self._quiet_from: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<HealthTracker quiet_period_s={self.quiet_period_s:g} faults={list(self.faults)!r}>"

    @property
    def faults(self) -> tuple[Fault, ...]:
        """Every current fault, in a stable order (GPU uuid, then whole GPU before MIG instances)."""
        return tuple(self._faults[key] for key in sorted(self._faults, key=_key_order))

    def fault(self, gpu_uuid: str, placement: tuple[int, int] | None = None) -> Fault | None:
        return self._faults.get((gpu_uuid, placement))

    # ---------------------------------------------------------------------------------------------------- input

    def is_critical(self, event: XidEvent) -> bool:
        """Does the policy let this event mark anything?"""
        if event.event_type == EVENT_XID_CRITICAL:
            return self.policy.is_critical(event.xid)
        if event.event_type == EVENT_DOUBLE_BIT_ECC:
            return self.policy.ecc_critical
        return False  # an event type we never registered for: nothing to judge it by

    def on_xid(self, event: XidEvent, now: float) -> bool:
        """Records a health event. True if the faults changed (a new scope, a new reason, or now permanent);
        False for events the policy ignores and for repeats, which still restart the quiet period."""
        if not self.is_critical(event):
            return False
        if event.event_type == EVENT_DOUBLE_BIT_ECC:
            reason, permanent = "double-bit ECC error", False
        else:
            reason, permanent = xid_name(event.xid), event.xid in NEVER_RECOVER
        # NVML gives instance ids only for errors it can attribute to one MIG instance; both or neither.
        placement = (event.gi, event.ci) if event.gi is not None and event.ci is not None else None
        return self._record(event.gpu_uuid, placement, reason + _scope_text(placement), permanent, now)

    def on_error(self, gpu_uuid: str | None, reason: str, now: float, permanent: bool = False) -> bool:
        """Records an NVML failure on one GPU, or on every GPU (None: the event wait failed, so no GPU is
        watched). True if the faults changed."""
        return self._record(ALL_GPUS if gpu_uuid is None else gpu_uuid, None, reason, permanent, now)

    def _record(self, gpu_uuid: str, placement: tuple[int, int] | None, reason: str, permanent: bool,
                now: float) -> bool:
        key = (gpu_uuid, placement)
        old = self._faults.get(key)
        self._quiet_from[gpu_uuid] = now
        if old is None:
            self._faults[key] = Fault(gpu_uuid, placement, reason, permanent, since=now, last_event=now)
            return True
        if old.permanent and not permanent:
            # A later recoverable error must not hide the reason the scope can never come back.
            self._faults[key] = replace(old, last_event=now)
            return False
        self._faults[key] = replace(old, reason=reason, permanent=permanent, last_event=now)
        return (old.reason, old.permanent) != (reason, permanent)

    # --------------------------------------------------------------------------------------------------- probes

    def _recoverable(self) -> list[str]:
        """Scopes with faults, none of them permanent, sorted."""
        faulty: dict[str, bool] = {}
        for fault in self._faults.values():
            faulty[fault.gpu_uuid] = faulty.get(fault.gpu_uuid, False) or fault.permanent
        return sorted(uuid for uuid, permanent in faulty.items() if not permanent)

    def due_for_probe(self, now: float) -> list[str]:
        """GPU uuids (or `ALL_GPUS`) with only recoverable faults whose quiet period has passed."""
        return [u for u in self._recoverable() if self._quiet_from[u] + self.quiet_period_s <= now]

    def next_probe_at(self) -> float | None:
        """When the earliest scope becomes due for a probe; None if nothing can recover."""
        times = [self._quiet_from[u] + self.quiet_period_s for u in self._recoverable()]
        return min(times, default=None)

    def on_probe(self, gpu_uuid: str, ok: bool, now: float) -> bool:
        """A probe's result. ok: the scope's recoverable faults are cleared (True if there were any). Not ok: its
        quiet period starts again, so a still-sick GPU is probed once per period, not in a loop."""
        if not ok:
            if gpu_uuid in self._quiet_from:
                self._quiet_from[gpu_uuid] = now
            return False
        cleared = [k for k, f in self._faults.items() if k[0] == gpu_uuid and not f.permanent]
        for key in cleared:
            del self._faults[key]
        if not any(k[0] == gpu_uuid for k in self._faults):
            self._quiet_from.pop(gpu_uuid, None)
        return bool(cleared)

    # -------------------------------------------------------------------------------------------------- output

    def unhealthy(self, devices: Iterable[Device]) -> dict[str, str]:
        """Device id -> reason, for every device some fault reaches (see the module docstring for the mapping).

        When several faults reach a device, the reason shown is a permanent one first, then the most recent."""
        by_gpu: dict[str, list[Fault]] = {}
        for fault in self._faults.values():
            by_gpu.setdefault(fault.gpu_uuid, []).append(fault)
        node_wide = by_gpu.get(ALL_GPUS, [])
        result: dict[str, str] = {}
        for device in devices:
            reaching = [
                f for f in by_gpu.get(device.gpu_uuid, ())
                # Whole-GPU faults reach everything on the GPU; MIG faults their instance and the whole GPU.
                if f.placement is None or device.mig_placement is None or f.placement == device.mig_placement
            ]
            reaching += node_wide
            if reaching:
                worst = min(reaching, key=lambda f: (not f.permanent, -f.last_event, _key_order((f.gpu_uuid,
                                                                                                   f.placement))))
                result[device.id] = worst.reason
        return result


def _key_order(key: tuple[str, tuple[int, int] | None]) -> tuple[str, tuple[int, int]]:
    return key[0], key[1] if key[1] is not None else (-1, -1)
