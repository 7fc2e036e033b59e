"""Kubernetes Events on the Node: what an operator sees in `kubectl describe node` and `kubectl get events`.

The daemon calls `EventRecorder.record()` (or one of its named helpers) from trio; that call never waits: it puts
the event in a bounded memory channel and, when the channel is full because the API server is slow or away, drops
the event and counts it (`nvdp_events_total{result="dropped"}`). One task, `EventRecorder.serve()`, posts them.

Rate limit: per (reason, subject) — the subject is the device, config or label value the event is about — at most
one Event per `interval_s`. The first occurrence is posted at once; repeats inside the window are folded into one
Event posted when the window ends, carrying the latest message and `count` = how many were folded. Nothing is lost,
and a flapping GPU makes one Event per 30 s, not hundreds.

API: core/v1 Events (`POST /api/v1/namespaces/{ns}/events`), which `kubectl describe node` shows. The namespace
is `default` and not the plug-in's own: the API server accepts an Event about a cluster-scoped object (a Node) only
in `default` (or with events.k8s.io/v1, also `kube-system`); this is also where the kubelet puts its Node Events.
The ServiceAccount therefore needs `create` on `events` in the `default` namespace.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from nvdp.observe.metrics import Metrics

log = logging.getLogger(__name__)

DEVICE_UNHEALTHY = "DeviceUnhealthy"
DEVICE_RECOVERED = "DeviceRecovered"
CONFIG_APPLIED = "ConfigApplied"
CONFIG_REJECTED = "ConfigRejected"
#: The config is served, with upstream's or the fork's meaning where nvdp's differs (docs/compatibility.md).
CONFIG_WARNING = "ConfigWarning"
CONFIG_LABEL_UNKNOWN = "ConfigLabelUnknown"
CHILD_RESTARTING = "ChildRestarting"
DRA_SHARE_HOST_WAITING = "DraShareHostWaiting"
#: Claims of a DRA NodePrepareResources call failed (each claim's own error reaches its pod through the kubelet).
DRA_PREPARE_FAILED = "DraPrepareFailed"
#: Reason -> Event type.
REASONS: Mapping[str, str] = {
    DRA_PREPARE_FAILED: "Warning",
    DEVICE_UNHEALTHY: "Warning",
    DEVICE_RECOVERED: "Normal",
    CONFIG_APPLIED: "Normal",
    CONFIG_REJECTED: "Warning",
    CONFIG_WARNING: "Warning",
    CONFIG_LABEL_UNKNOWN: "Warning",
    CHILD_RESTARTING: "Warning",
    DRA_SHARE_HOST_WAITING: "Warning",
}

COMPONENT = "nvidia-device-plugin"
#: Events about a Node must live here (see the module docstring).
NODE_EVENT_NAMESPACE = "default"
#: The API server limits an Event's note to 1024 characters for events.k8s.io; stay within it for core/v1 too.
MAX_MESSAGE = 1024
#: Rate-limit windows kept at most; expired ones are forgotten first. Subjects are devices and configs, so this
#: is only reached if something sends events about an unbounded set of subjects.
MAX_WINDOWS = 4096


class EventPoster(Protocol):
    """What the recorder needs from the Kubernetes API client: POST a JSON body; raise on failure."""

    async def post(self, path: str, body: Mapping[str, Any]) -> object: ...


@dataclass(frozen=True, slots=True)
class _Pending:
    reason: str
    subject: str
    message: str
    at: float  # wall-clock time it happened


@dataclass(slots=True)
class _Window:
    opened: float  # trio time of the last post for this key
    folded: int = 0
    first: float = 0.0
    last: float = 0.0
    message: str = ""


class EventRecorder:
    """Bounded, rate-limited, best-effort Events about one Node."""

    def __init__(
        self,
        node_name: str,
        *,
        node_uid: str = "",
        namespace: str = NODE_EVENT_NAMESPACE,
        interval_s: float = 30.0,
        capacity: int = 64,
        post_timeout_s: float = 10.0,
        metrics: Metrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_name = node_name
        self.node_uid = node_uid
        self.namespace = namespace
        self.interval_s = interval_s
        self.post_timeout_s = post_timeout_s
        self.dropped = 0
        self.posted = 0
        self.failed = 0
        self._metrics = metrics
        self._wall = wall_clock
        self._send, self._receive = trio.open_memory_channel[_Pending](capacity)
        self._windows: dict[tuple[str, str], _Window] = {}
        self._names = itertools.count()
        self._failing = False

    # -- the daemon's side: never blocks ------------------------------------------------------------------------

    def record(self, reason: str, message: str, subject: str = "") -> bool:
        """Queue an Event; False if it was dropped because the queue is full. Call from trio only."""
        if reason not in REASONS:
            raise ValueError(f"unknown Event reason {reason!r}")
        try:
            self._send.send_nowait(_Pending(reason, subject, message, self._wall()))
        except trio.WouldBlock:
            self.dropped += 1
            self._count(reason, "dropped")
            return False
        return True

    def device_unhealthy(self, device: str, reason: str, resource: str = "") -> bool:
        where = f" ({resource})" if resource else ""
        return self.record(DEVICE_UNHEALTHY, f"device {device}{where} is Unhealthy: {reason}", device)

    def device_recovered(self, device: str, resource: str = "") -> bool:
        where = f" ({resource})" if resource else ""
        return self.record(DEVICE_RECOVERED, f"device {device}{where} is Healthy again", device)

    def config_applied(self, config: str, generation: int, summary: str = "") -> bool:
        detail = f": {summary}" if summary else ""
        return self.record(CONFIG_APPLIED, f"config {config!r} applied (generation {generation}){detail}", config)

    def config_rejected(self, config: str, error: str, serving_nothing: bool = False) -> bool:
        what = ("nothing is served until it is fixed" if serving_nothing else "the running config keeps serving")
        return self.record(CONFIG_REJECTED, f"config {config!r} rejected, {what}: {error}", config)

    def config_warnings(self, config: str, warnings: list[str]) -> bool:
        """One Event per config load that has warnings, listing them (cut to the Event's size by `body`)."""
        return self.record(CONFIG_WARNING, f"config {config!r} is served with {len(warnings)} warning(s) (see "
                           f"docs/compatibility.md; --strict-config refuses them): " + "; ".join(warnings), config)

    def config_label_unknown(self, value: str, fallback: str = "") -> bool:
        using = f"; using {fallback!r}" if fallback else ""
        return self.record(CONFIG_LABEL_UNKNOWN, f"the node's config label names {value!r}, which no config "
                           f"defines{using}", value)

    def child_restarting(self, child: str, restarts: int, reason: str) -> bool:
        return self.record(CHILD_RESTARTING, f"{child} keeps failing ({restarts} restarts since nvdp started; last "
                           f"error: {reason}); nvdp restarts it with backoff, the rest of the node is unaffected",
                           child)

    # -- the posting task ---------------------------------------------------------------------------------------

    async def serve(self, poster: EventPoster, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Post queued Events until cancelled."""
        task_status.started()
        while True:
            due = min((w.opened + self.interval_s for w in self._windows.values() if w.folded), default=math.inf)
            pending: _Pending | None = None
            # Only the wait is bounded by the next window's end; a post in progress is never cancelled by it.
            with trio.move_on_at(due):
                pending = await self._receive.receive()
            if pending is not None:
                await self._accept(poster, pending)
            await self._flush_due(poster)

    async def _accept(self, poster: EventPoster, pending: _Pending) -> None:
        key = (pending.reason, pending.subject)
        now = trio.current_time()
        window = self._windows.get(key)
        if window is None or (not window.folded and now >= window.opened + self.interval_s):
            self._forget_expired(now)
            self._windows[key] = _Window(opened=now)
            await self._post(poster, pending.reason, pending.message, 1, pending.at, pending.at)
            return
        # Inside the window: fold it into the Event that the window's end will post.
        if not window.folded:
            window.first = pending.at
        window.folded += 1
        window.last = pending.at
        window.message = pending.message
        self._count(pending.reason, "suppressed")

    async def _flush_due(self, poster: EventPoster) -> None:
        now = trio.current_time()
        for (reason, _), window in list(self._windows.items()):
            if window.folded and now >= window.opened + self.interval_s:
                folded, first, last, message = window.folded, window.first, window.last, window.message
                window.opened, window.folded = now, 0
                await self._post(poster, reason, message, folded, first, last)

    def _forget_expired(self, now: float) -> None:
        if len(self._windows) < MAX_WINDOWS:
            return
        for key, window in list(self._windows.items()):
            if not window.folded and now >= window.opened + self.interval_s:
                del self._windows[key]
        while len(self._windows) >= MAX_WINDOWS:  # all recent: forget the oldest rather than grow
            del self._windows[next(iter(self._windows))]

    def body(self, reason: str, message: str, count: int, first: float, last: float) -> dict[str, Any]:
        """A core/v1 Event about the Node."""
        involved: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "name": self.node_name}
        # kubectl describe node finds Events by the Node's UID or, as the kubelet writes them, by its name.
        involved["uid"] = self.node_uid or self.node_name
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                # client-go's convention: <object>.<nanoseconds in hex>; the counter keeps two in one ns apart.
                "name": f"{self.node_name}.{time.time_ns():x}{next(self._names):x}",
                "namespace": self.namespace,
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "type": REASONS[reason],
            "count": count,
            "firstTimestamp": _timestamp(first),
            "lastTimestamp": _timestamp(last),
            "source": {"component": COMPONENT, "host": self.node_name},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node_name,
        }

    async def _post(self, poster: EventPoster, reason: str, message: str, count: int, first: float,
                    last: float) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/events"
        body = self.body(reason, message, count, first, last)
        error: str | None = None
        with trio.move_on_after(self.post_timeout_s) as scope:
            try:
                await poster.post(path, body)
            except Exception as exc:
                error = str(exc) or type(exc).__name__
        if scope.cancelled_caught:
            error = f"no answer in {self.post_timeout_s:g} s"
        if error is None:
            self.posted += 1
            self._count(reason, "posted")
            if self._failing:
                log.info("posting Kubernetes Events works again")
            self._failing = False
            return
        self.failed += 1
        self._count(reason, "failed")
        # Best effort: warn once per outage, not once per Event.
        log.log(logging.DEBUG if self._failing else logging.WARNING, "cannot post a %s Event: %s", reason, error,
                extra={"reason": reason})
        self._failing = True

    def _count(self, reason: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.event_recorded(reason, result)


def _timestamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
