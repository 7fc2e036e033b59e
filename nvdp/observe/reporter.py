"""The one interface through which the daemon reports: `Observer` turns each thing that happened into metrics,
probe state and Node Events, so the controller never calls those three separately (and the log line for each
decision stays where the decision is made, in the controller).

It implements `nvdp.controller.DaemonObserver` and `nvdp.supervise.SupervisionReporter` (structurally: this module
imports neither).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from nvdp.core.config.load import ConfigWarning
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.model import Plan
from nvdp.observe.http import ProbeState
from nvdp.observe.metrics import Metrics

if TYPE_CHECKING:
    # Node Events need API access, and the daemon imports them only then.
    from nvdp.observe.events import EventRecorder

log = logging.getLogger(__name__)


class Observer:
    """Metrics, probes and (with API access) Node Events, behind one narrow interface. Call from trio only."""

    def __init__(self, metrics: Metrics, probes: ProbeState, events: EventRecorder | None = None) -> None:
        self.metrics = metrics
        self.probes = probes
        self.events = events
        #: GPU UUID -> (reason, advertised devices) of GPUs with Unhealthy devices, for one Event per GPU.
        self._unhealthy_gpus: dict[str, tuple[str, int]] = {}
        #: Why no config is served (see `config_blocked`), or None.
        self._blocked: str | None = None
        #: DRA device -> why its move to or from MPS shares waits (one Event per new reason).
        self._share_waiting: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Observer events={'on' if self.events is not None else 'off'} {self.probes!r}>"

    # -- supervision (nvdp.supervise.SupervisionReporter) -----------------------------------------------------------

    def child_up(self, child: str) -> None:
        self.metrics.child_up(child, True)
        self.probes.child_up(child)

    def child_down(self, child: str, reason: str) -> None:
        self.metrics.child_up(child, False)
        self.probes.child_down(child, reason)

    def child_restarting(self, child: str, reason: str, delay_s: float, flapping: bool) -> None:
        self.metrics.child_restarted(child)
        if flapping and self.events is not None:
            self.events.child_restarting(child, self.probes.restarts_of(child), reason)

    def child_stopped(self, child: str) -> None:
        self.metrics.child_gone(child)
        self.probes.child_up(child)

    # -- the plan ------------------------------------------------------------------------------------------------

    def plan_applied(
        self, plan: Plan, inventory: NodeInventory, config_name: str, generation: int, seconds: float, summary: str
    ) -> None:
        self._blocked = None
        self.metrics.plan_applied(plan, inventory, config_name, generation, seconds)
        if self.events is not None:
            self.events.config_applied(config_name, generation, summary)

    def plan_rejected(self, config_name: str, error: str) -> None:
        self.metrics.reload_failed(config_name, error)
        if self.events is not None:
            self.events.config_rejected(config_name, error)

    def config_warnings(self, config_name: str, warnings: Sequence[ConfigWarning]) -> None:
        """The config being served (just applied) and what it asks that nvdp serves with upstream's or the fork's
        meaning; an empty list clears the previous config's warnings."""
        self.metrics.config_warnings(config_name, [(f"{w.source}: {w.path}", w.message) for w in warnings])
        if warnings and self.events is not None:
            self.events.config_warnings(config_name, [str(w) for w in warnings])

    def config_blocked(self, config_name: str, error: str) -> None:
        """No config is served: a live source's first config is refused. Not ready, with the reason, until a config
        is applied (`plan_applied`); counted as a rejected load, and a ConfigRejected Event."""
        self.metrics.reload_failed(config_name, error)
        self._blocked = f"config {config_name!r} rejected, serving nothing until it is fixed: {error[:500]}"
        self._show_blocked()
        if self.events is not None:
            self.events.config_rejected(config_name, error, serving_nothing=True)

    def _show_blocked(self) -> None:
        if self._blocked is not None:
            self.probes.registered = False
            self.probes.reason = self._blocked

    def label_unknown(self, value: str, fallback: str) -> None:
        self.metrics.config_label_unknown(value)
        if self.events is not None:
            self.events.config_label_unknown(value, fallback)

    def registration_pending(self, pending: Sequence[str]) -> None:
        """Resources of the plan that are not registered with the kubelet now (empty: all are)."""
        self.probes.set_pending(pending)
        self._show_blocked()

    def nvml_unavailable(self, reason: str) -> None:
        """NVML cannot start and failOnInitError is false: nothing to register, so ready, with `reason` as the
        answer of `/readyz` (200)."""
        self.probes.set_pending([])
        self.probes.note = reason

    # -- the kubelet -------------------------------------------------------------------------------------------

    def kubelet_restarted(self) -> None:
        self.metrics.kubelet_restart()

    # -- health ----------------------------------------------------------------------------------------------

    def xid(self, gpu_uuid: str, xid: int, critical: bool) -> None:
        self.metrics.xid(gpu_uuid, xid, critical)

    def health_changed(self, plan: Plan, unhealthy: Mapping[str, str], nvml_ok: bool) -> None:
        self.metrics.health_changed(plan, unhealthy)
        self.probes.nvml_ok = nvml_ok
        self._device_events(plan, unhealthy)

    def mps_daemon(self, gpu_uuid: str, up: bool, probe_seconds: float | None) -> None:
        self.metrics.mps_daemon(gpu_uuid, up, probe_seconds)

    def mps_restarted(self, gpu_uuid: str) -> None:
        self.metrics.mps_restart(gpu_uuid)

    # -- DRA (nvdp.dra.service.DraMetrics): metrics, and a Node Event when claims fail to prepare -----------------

    def dra_call(self, kind: str, seconds: float, claims: int, failed: int) -> None:
        self.metrics.dra_call(kind, seconds, claims, failed)
        if failed and kind == "prepare" and self.events is not None:
            from nvdp.observe.events import DRA_PREPARE_FAILED  # loaded already: the recorder exists

            self.events.record(DRA_PREPARE_FAILED, f"{failed} of {claims} claim(s) in a DRA prepare call failed; "
                               "each claim's error is in its pod's events (nvdp's log has them too)")

    def slices_published(self, driver: str, generation: int, slices: int, devices: int) -> None:
        self.metrics.slices_published(driver, generation, slices, devices)

    def slice_write(self, driver: str, operation: str, ok: bool) -> None:
        self.metrics.slice_write(driver, operation, ok)

    def watch_reconnected(self, watched: str) -> None:
        self.metrics.watch_reconnected(watched)

    def watch_relisted(self, watched: str) -> None:
        self.metrics.watch_relisted(watched)

    def dra_share_hosts_waiting(self, driver: str, waiting: Mapping[str, str]) -> None:
        """DRA devices whose move to or from MPS shares waits for their prepared claims (device -> why): the gauge,
        and a DraShareHostWaiting Event for each device that starts waiting (or waits for another reason)."""
        self.metrics.share_hosts_waiting(driver, len(waiting))
        if self.events is not None:
            from nvdp.observe.events import DRA_SHARE_HOST_WAITING  # loaded already: the recorder exists

            for device, why in sorted(waiting.items()):
                if self._share_waiting.get(device) != why:
                    self.events.record(DRA_SHARE_HOST_WAITING, why, device)
        self._share_waiting = dict(waiting)

    def _device_events(self, plan: Plan, unhealthy: Mapping[str, str]) -> None:
        """One Node Event per physical GPU that turns Unhealthy or recovers (not one per replica: a GPU cut into 48
        slices would otherwise flood the API server)."""
        by_gpu: dict[str, tuple[str, int]] = {}
        for resource in plan.resources:
            for device in resource.devices:
                reason = unhealthy.get(device.id)
                if reason is not None:
                    _, count = by_gpu.get(device.gpu_uuid, (reason, 0))
                    by_gpu[device.gpu_uuid] = (reason, count + 1)
        previous, self._unhealthy_gpus = self._unhealthy_gpus, by_gpu
        if self.events is None:
            return
        for gpu_uuid, (reason, count) in by_gpu.items():
            if gpu_uuid not in previous:
                self.events.device_unhealthy(gpu_uuid, f"{reason} ({count} advertised device(s))")
        for gpu_uuid in previous.keys() - by_gpu.keys():
            self.events.device_recovered(gpu_uuid)
