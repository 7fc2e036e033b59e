"""Prometheus metrics of one daemon, in a registry of its own.

Two kinds of metric live here:

- **Events** (Allocate calls, registrations, XIDs, reloads, restarts) are prometheus-client counters and
  histograms, updated in place. They are thread-safe, which matters because Allocate and GetPreferredAllocation
  run on the asyncio thread of `nvdp.kubelet.aio` while everything else runs on trio.
- **State** (devices per resource and health, GPUs, replicas, unhealthy devices, the active config, MPS daemons) is
  rebuilt from a whole snapshot each time it changes and published by swapping one reference, so a scrape never sees
  half an update and no gauge can drift from the truth through missed increments or stale label sets.

A `Metrics` owns its `CollectorRegistry` instead of using prometheus-client's global one, so tests (and several
daemons in one process, as the demo runs) never collide.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from nvdp import __version__
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.model import Plan

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

#: Allocate and GetPreferredAllocation are pure functions over an in-memory plan: they normally take well under a
#: millisecond, so the buckets start at 100 µs. Anything past a second means the asyncio thread was starved.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: Config warnings exported one series each; more are folded into one series.
MAX_WARNING_SERIES = 50

#: Results counted by `nvdp_events_total`.
EVENT_RESULTS = ("posted", "failed", "dropped", "suppressed")


@dataclass(frozen=True, slots=True)
class _MpsState:
    up: bool
    probe_seconds: float | None


class _SnapshotCollector:
    """Serves gauge families built ahead of time; the daemon replaces whole parts, never single samples."""

    def __init__(self) -> None:
        # Copy-on-write: collect() reads one reference, writers install a new dict under the lock.
        self._parts: dict[str, tuple[Metric, ...]] = {}
        self._lock = threading.Lock()

    def publish(self, part: str, families: Iterable[Metric]) -> None:
        frozen = tuple(families)
        with self._lock:
            self._parts = {**self._parts, part: frozen}

    def collect(self) -> Iterable[Metric]:
        parts = self._parts
        for families in parts.values():
            yield from families


def _import_prometheus_client() -> None:
    """prometheus-client (and the HTTP, email and URL modules its package imports) loads with the first `Metrics`:
    a daemon that exports no metrics (`UnexportedMetrics`) never imports it, ~15 ms of start-up."""
    global CollectorRegistry, Counter, Gauge, Histogram, GaugeMetricFamily
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import GaugeMetricFamily


class Metrics:
    """Every metric nvdp exports; one small method per thing the daemon reports."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        _import_prometheus_client()
        self.registry = CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot = _SnapshotCollector()
        self.registry.register(self._snapshot)
        r = self.registry

        self._allocate = Histogram(
            "nvdp_allocate_duration_seconds", "Time to answer an Allocate call (its _count is the number of calls).",
            ["resource"], buckets=LATENCY_BUCKETS, registry=r)
        self._allocate_errors = Counter(
            "nvdp_allocate_errors", "Allocate calls answered with an error.", ["resource"], registry=r)
        self._preferred = Histogram(
            "nvdp_preferred_allocation_duration_seconds",
            "Time to answer a GetPreferredAllocation call (its _count is the number of calls).",
            ["resource"], buckets=LATENCY_BUCKETS, registry=r)
        self._preferred_errors = Counter(
            "nvdp_preferred_allocation_errors", "GetPreferredAllocation calls answered with an error.",
            ["resource"], registry=r)
        self._registrations = Counter(
            "nvdp_registrations", "Successful registrations with the kubelet.", ["resource"], registry=r)
        self._last_registration = Gauge(
            "nvdp_last_registration_timestamp_seconds", "Unix time of the last successful registration.",
            ["resource"], registry=r)
        self._kubelet_restarts = Counter(
            "nvdp_kubelet_restarts", "Times the kubelet was seen to start again (kubelet.sock created).", registry=r)
        self._xids = Counter(
            "nvdp_xid_events", "XID events reported by NVML, critical or not (label critical: whether the health "
            "policy marks devices Unhealthy for it).", ["uuid", "xid", "critical"], registry=r)
        self._reloads = Counter(
            "nvdp_config_reloads", "Config reloads after start-up, by config name and result (applied, failed).",
            ["config", "result"], registry=r)
        self._label_unknown = Counter(
            "nvdp_config_label_unknown", "Times the node's config label named a config that does not exist.",
            ["value"], registry=r)
        self._mps_restarts = Counter(
            "nvdp_mps_daemon_restarts", "MPS control daemons restarted after they stopped answering.", ["uuid"],
            registry=r)
        self._k8s_reconnects = Counter(
            "nvdp_k8s_watch_reconnects", "Kubernetes API watches opened again after they ended or failed.",
            registry=r)
        self._k8s_relists = Counter(
            "nvdp_k8s_watch_relists", "Full lists after a watch could not resume (resource version too old).",
            registry=r)
        self._child_restarts = Counter(
            "nvdp_child_restarts", "Supervised children (servers, MPS daemons, loops, watches) restarted after they "
            "failed.", ["child"], registry=r)
        self._child_up = Gauge(
            "nvdp_child_up", "1 while a supervised child runs, 0 while it waits to be restarted.", ["child"],
            registry=r)
        self._events = Counter(
            "nvdp_events", "Kubernetes Events by reason and result (posted, failed, dropped, suppressed).",
            ["reason", "result"], registry=r)
        self._http_shed = Counter(
            "nvdp_http_connections_shed", "Connections to the metrics port closed by nvdp before they were answered, "
            "by reason (limit, deadline, fd_exhausted).", ["reason"], registry=r)

        # DRA (docs/dra.md): the kubelet's Prepare/Unprepare calls and the ResourceSlices published.
        self._dra_calls = Histogram(
            "nvdp_dra_call_duration_seconds", "Time to answer a DRA NodePrepareResources or NodeUnprepareResources "
            "call (its _count is the number of calls).", ["call"], buckets=LATENCY_BUCKETS, registry=r)
        self._dra_claims = Counter(
            "nvdp_dra_claims", "Claims in DRA Prepare/Unprepare calls, by call and result (ok, error).",
            ["call", "result"], registry=r)
        self._dra_slice_generation = Gauge(
            "nvdp_dra_slices_generation", "pool.generation of the node's ResourceSlices the API server holds.",
            ["driver"], registry=r)
        self._dra_slice_devices = Gauge(
            "nvdp_dra_slices_devices", "Devices in the node's ResourceSlices the API server holds.", ["driver"],
            registry=r)
        self._dra_slice_writes = Counter(
            "nvdp_dra_slice_writes", "ResourceSlice creates, updates and deletes tried, by result (ok, error).",
            ["driver", "operation", "result"], registry=r)
        self._dra_share_hosts_waiting = Gauge(
            "nvdp_dra_share_hosts_waiting", "DRA devices whose change to or from an MPS share host waits for the "
            "claims prepared on them.", ["driver"], registry=r)

        # Hot-path caches: resource name -> labelled child, so Allocate pays for one dict lookup and one observe.
        # Plain dict reads are atomic under the GIL; writes happen under self._lock.
        self._allocate_children: dict[str, Histogram] = {}
        self._preferred_children: dict[str, Histogram] = {}

        self._plan = Plan(resources=())
        self._inventory: NodeInventory | None = None
        self._unhealthy: Mapping[str, str] = {}
        self._mps: dict[str, _MpsState] = {}
        self._plans_applied = 0
        self._snapshot.publish("build", [_gauge("nvdp_build_info", "nvdp's version.", {"version": __version__})])
        self._publish_plan()
        self._publish_mps()

    # -- the hot path (asyncio thread) --------------------------------------------------------------------------

    def allocate_observed(self, resource: str, seconds: float, ok: bool = True) -> None:
        child = self._allocate_children.get(resource) or self._child(self._allocate_children, self._allocate, resource)
        child.observe(seconds)
        if not ok:
            self._allocate_errors.labels(resource).inc()

    def preferred_observed(self, resource: str, seconds: float, ok: bool = True) -> None:
        child = (self._preferred_children.get(resource)
                 or self._child(self._preferred_children, self._preferred, resource))
        child.observe(seconds)
        if not ok:
            self._preferred_errors.labels(resource).inc()

    def _child(self, cache: dict[str, Histogram], parent: Histogram, resource: str) -> Histogram:
        with self._lock:
            child = cache.get(resource)
            if child is None:
                child = cache[resource] = parent.labels(resource)
            return child

    # -- state snapshots ----------------------------------------------------------------------------------------

    def plan_applied(
        self, plan: Plan, inventory: NodeInventory, config_name: str, generation: int, duration_s: float
    ) -> None:
        """A plan is serving. The first call is the start-up plan; every later one counts as an applied reload."""
        now = self._clock()
        with self._lock:
            gone = {r.name for r in self._plan.resources} - {r.name for r in plan.resources}
            self._plan, self._inventory = plan, inventory
            self._plans_applied += 1
            reload = self._plans_applied > 1
            self._mps = {d.gpu_uuid: self._mps.get(d.gpu_uuid, _MpsState(False, None)) for d in plan.mps_daemons}
        for name in gone:
            # The resource is no longer served: its "last registration" would be a lie. Counters keep their history.
            _remove(self._last_registration, name)
        for resource in plan.resources:
            # Create every series at zero, so rate() and absent-based alerts work before the first call.
            self._child(self._allocate_children, self._allocate, resource.name)
            self._child(self._preferred_children, self._preferred, resource.name)
            self._allocate_errors.labels(resource.name)
            self._preferred_errors.labels(resource.name)
            self._registrations.labels(resource.name)
        if reload:
            self._reloads.labels(config_name, "applied").inc()
        self._snapshot.publish("config", [
            _gauge("nvdp_config_generation", "Generation of the active config: 1 at start-up, +1 per applied reload.",
                   value=generation),
            _gauge("nvdp_config_info", "The active config (always 1; its name is the label).", {"name": config_name}),
            _gauge("nvdp_config_last_reload_successful", "1 if the last config load or reload was applied, 0 if it "
                   "was rejected.", value=1),
            _gauge("nvdp_config_last_reload_success_timestamp_seconds",
                   "Unix time the active config was applied.", value=now),
            _gauge("nvdp_config_last_reload_duration_seconds",
                   "Time the last applied config took, from reading it to every server started.", value=duration_s),
        ])
        self._publish_plan()
        self._publish_mps()

    def health_changed(self, plan: Plan, unhealthy: Mapping[str, str]) -> None:
        """A new health snapshot: advertised device ID -> reason, for every device that is Unhealthy now."""
        with self._lock:
            self._plan, self._unhealthy = plan, dict(unhealthy)
        self._publish_plan()

    def reload_failed(self, config_name: str, error: str) -> None:
        """A reload was rejected; the running config keeps serving. `error` goes to the log and the Event only: an
        error text as a label value would create a new series per message."""
        del error
        self._reloads.labels(config_name, "failed").inc()
        # Replace only the success flag; the rest of the config part (the running config) is still true.
        with self._lock:
            families = [f for f in self._current("config") if f.name != "nvdp_config_last_reload_successful"]
        families.append(_gauge("nvdp_config_last_reload_successful",
                               "1 if the last config load or reload was applied, 0 if it was rejected.", value=0))
        self._snapshot.publish("config", families)

    def config_warnings(self, config_name: str, warnings: Sequence[tuple[str, str]]) -> None:
        """The warnings of the config being served, as (key path, message): one series each, replaced as a whole
        on every load (so a fixed config leaves no stale series). At most `MAX_WARNING_SERIES`; the rest are
        counted in one series with path `...`."""
        family = GaugeMetricFamily(
            "nvdp_config_warnings", "1 per warning about the config being served: what upstream or the fork accepts "
            "and nvdp serves with their meaning (count() for the number).", labels=["config", "path", "message"])
        shown = list(warnings)[:MAX_WARNING_SERIES]
        for path, message in shown:
            family.add_metric([config_name, path[:200], message[:300]], 1)
        if len(warnings) > len(shown):
            family.add_metric([config_name, "...", f"{len(warnings) - len(shown)} more, see the log"],
                              len(warnings) - len(shown))
        self._snapshot.publish("config-warnings", [family])

    def mps_daemon(self, gpu_uuid: str, up: bool, probe_seconds: float | None = None) -> None:
        """The result of probing the MPS control daemon of one GPU."""
        with self._lock:
            self._mps = {**self._mps, gpu_uuid: _MpsState(up, probe_seconds)}
        self._publish_mps()

    # -- counters -----------------------------------------------------------------------------------------------

    def registered(self, resource: str) -> None:
        self._registrations.labels(resource).inc()
        self._last_registration.labels(resource).set(self._clock())

    def kubelet_restart(self) -> None:
        self._kubelet_restarts.inc()

    def xid(self, gpu_uuid: str, xid: int, critical: bool = True) -> None:
        self._xids.labels(gpu_uuid, str(xid), "true" if critical else "false").inc()

    def mps_restart(self, gpu_uuid: str) -> None:
        self._mps_restarts.labels(gpu_uuid).inc()

    def child_up(self, child: str, up: bool) -> None:
        self._child_up.labels(child).set(1 if up else 0)

    def child_restarted(self, child: str) -> None:
        self._child_restarts.labels(child).inc()

    def http_shed(self, reason: str) -> None:
        """The metrics port closed a connection before answering it: `limit` (the oldest, to make room),
        `deadline` (no whole request head in time, or no answer sent in time), `fd_exhausted` (to free a
        descriptor when accept() failed)."""
        self._http_shed.labels(reason).inc()

    def child_gone(self, child: str) -> None:
        """A child stopped for good (its resource or GPU left the plan): no stale series."""
        _remove(self._child_up, child)

    # -- DRA (nvdp.dra.calls.CallObserver, nvdp.dra.publisher.SliceObserver) -------------------------------------

    def dra_call(self, kind: str, seconds: float, claims: int, failed: int) -> None:
        self._dra_calls.labels(kind).observe(seconds)
        if claims - failed:
            self._dra_claims.labels(kind, "ok").inc(claims - failed)
        if failed:
            self._dra_claims.labels(kind, "error").inc(failed)

    def slices_published(self, driver: str, generation: int, slices: int, devices: int) -> None:
        self._dra_slice_generation.labels(driver).set(generation)
        self._dra_slice_devices.labels(driver).set(devices)

    def slice_write(self, driver: str, operation: str, ok: bool) -> None:
        self._dra_slice_writes.labels(driver, operation, "ok" if ok else "error").inc()

    def share_hosts_waiting(self, driver: str, devices: int) -> None:
        self._dra_share_hosts_waiting.labels(driver).set(devices)

    # -- nvdp.k8s.watch.WatchObserver -------------------------------------------------------------------------------

    def watch_reconnected(self, watched: str) -> None:
        self._k8s_reconnects.inc()

    def watch_relisted(self, watched: str) -> None:
        self._k8s_relists.inc()

    def config_label_unknown(self, value: str) -> None:
        self._label_unknown.labels(value).inc()

    def event_recorded(self, reason: str, result: str) -> None:
        """Called by `nvdp.observe.events.EventRecorder`; result is one of `EVENT_RESULTS`."""
        self._events.labels(reason, result).inc()

    # -- snapshot builders --------------------------------------------------------------------------------------

    def _current(self, part: str) -> list[Metric]:
        return list(self._snapshot._parts.get(part, ()))

    def _publish_plan(self) -> None:
        with self._lock:
            plan, inventory, unhealthy = self._plan, self._inventory, self._unhealthy
        devices = GaugeMetricFamily("nvdp_devices", "Devices advertised to the kubelet, by resource and health.",
                                    labels=["resource", "health"])
        replicas = GaugeMetricFamily(
            "nvdp_replicas", "Devices of a resource backed by one physical GPU: its replicas when shared, its MIG "
            "devices (times their replicas) with MIG, 1 for a whole GPU.", labels=["resource", "uuid"])
        by_reason = GaugeMetricFamily("nvdp_unhealthy_devices", "Advertised devices currently Unhealthy, by reason.",
                                      labels=["resource", "reason"])
        physical = GaugeMetricFamily(
            "nvdp_device_unhealthy", "1 for each physical device (GPU or MIG device) currently Unhealthy, and why.",
            labels=["device", "gpu", "reason"])
        unhealthy_physical: set[tuple[str, str, str]] = set()
        for resource in plan.resources:
            per_gpu: Tally[str] = Tally()
            reasons: Tally[str] = Tally()
            for device in resource.devices:
                per_gpu[device.gpu_uuid] += 1
                reason = unhealthy.get(device.id)
                if reason is not None:
                    reasons[reason] += 1
                    unhealthy_physical.add((device.physical_id, device.gpu_uuid, reason))
            bad = sum(reasons.values())
            devices.add_metric([resource.name, HEALTHY], len(resource.devices) - bad)
            devices.add_metric([resource.name, UNHEALTHY], bad)
            for uuid, count in per_gpu.items():
                replicas.add_metric([resource.name, uuid], count)
            for reason, count in sorted(reasons.items()):
                by_reason.add_metric([resource.name, reason], count)
        for labels in sorted(unhealthy_physical):
            physical.add_metric(list(labels), 1)
        gpus = GaugeMetricFamily("nvdp_gpu_info", "One per physical GPU (always 1; the labels are the information).",
                                 labels=["uuid", "index", "name", "mig"])
        for gpu in inventory.gpus if inventory else ():
            gpus.add_metric([gpu.uuid, str(gpu.index), gpu.name, "true" if gpu.mig_enabled else "false"], 1)
        self._snapshot.publish("plan", [devices, gpus, replicas, by_reason, physical])

    def _publish_mps(self) -> None:
        with self._lock:
            mps = self._mps
        up = GaugeMetricFamily("nvdp_mps_daemon_up", "1 if the GPU's MPS control daemon answered its last probe.",
                               labels=["uuid"])
        probe = GaugeMetricFamily("nvdp_mps_probe_duration_seconds",
                                  "How long the last successful probe of the MPS control daemon took.",
                                  labels=["uuid"])
        for uuid, state in sorted(mps.items()):
            up.add_metric([uuid], 1 if state.up else 0)
            if state.probe_seconds is not None:
                probe.add_metric([uuid], state.probe_seconds)
        self._snapshot.publish("mps", [up, probe])


def _gauge(name: str, documentation: str, labels: Mapping[str, str] | None = None, value: float = 1) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class UnexportedMetrics(Metrics):
    """What the daemon reports to when no metrics endpoint is configured (`--metrics-address ""`): nobody could
    read a metric, so every report is dropped and prometheus-client is never imported. Every public method of
    `Metrics` is replaced below, so a method added there is dropped here too (tests/test_startup_imports.py)."""

    def __init__(self) -> None:  # nothing to build: no registry, no collectors
        pass


def _drop(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


for _name, _member in list(vars(Metrics).items()):
    if callable(_member) and not _name.startswith("_"):
        setattr(UnexportedMetrics, _name, _drop)
del _name, _member
