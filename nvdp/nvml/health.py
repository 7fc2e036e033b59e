"""The NVML health loop: one event set for the whole node, feeding a `HealthTracker`.

What it does, in order (docs/health.md has the why):

1. Unless the policy disables every check, create one NVML event set and register each physical GPU on it once
   (MIG events arrive on the parent GPU with instance ids). A GPU too old for health events is logged and left
   unchecked; any other registration failure marks that GPU Unhealthy, and its recovery probe registers it again.
2. Report started, then loop: wait for an event in a worker thread for at most `wait_ms` (`EVENT_WAIT_MS` unless
   given), feed the tracker, and call `on_change()` whenever the faults change, with a log line naming the device,
   the cause and what happens next. Cancellation does not wait for a wait in progress (NVML's wait ends only at its
   timeout): the thread is abandoned, and the adapter makes it free the set and, if NVML was shut down meanwhile,
   call `nvmlShutdown` itself when the wait returns, so neither ever runs under a thread still inside NVML.
3. Between waits, probe every GPU whose quiet period has passed (`adapter.probe` in a thread); a good probe makes
   its devices Healthy again. The wait is shortened so a probe is never more than a few ms late.

NVML failures never end the task: a failing wait marks every device Unhealthy (node-wide fault) and is retried
after a capped backoff; `GPU_IS_LOST` anywhere is a permanent fault of that GPU. Every worker thread is bounded by
the wait timeout or by a single NVML query: an abandoned wait outlives the task by at most `wait_ms` (plus one
`nvmlEventSetFree` and `nvmlShutdown`), and the process never waits for it (trio's workers are daemon threads).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import trio

from nvdp.core.health.tracker import ALL_GPUS, HealthTracker
from nvdp.core.health.xids import EVENT_DOUBLE_BIT_ECC, xid_name
from nvdp.nvml import adapter
from nvdp.nvml.adapter import NvmlError, XidEvent

log = logging.getLogger(__name__)

#: First delay after a failed event wait (or event-set creation); doubled per failure up to BACKOFF_MAX_S, so a
#: broken NVML costs a log line every few seconds instead of a hot loop.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
#: The longest one event wait blocks its worker thread, and so the longest an abandoned wait outlives a cancelled
#: loop (shutdown, reload): NVML's wait cannot be interrupted. Read at each call of `watch_nvml_health` without
#: `wait_ms`. Why a module setting: the tests run hundreds of daemons in-process and lower it (tests/conftest.py),
#: so that abandoned waits end in milliseconds; on a GPU it stays 500 ms.
EVENT_WAIT_MS = 500


async def watch_nvml_health(
    gpu_uuids: Sequence[str],
    tracker: HealthTracker,
    on_change: Callable[[], None],
    *,
    wait_ms: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watches NVML health events for `gpu_uuids` (physical GPUs) until cancelled. Needs NVML initialized for its
    whole life. Calls `on_change()` (synchronously, from the trio thread) after every change of `tracker`'s
    faults; the caller then recomputes `tracker.unhealthy(devices)` and publishes it."""
    if tracker.policy.checks_disabled:
        # Nothing could ever be critical: no event set, no threads, devices stay Healthy.
        log.debug("health checks disabled by policy: not listening to NVML events")
        task_status.started()
        await trio.sleep_forever()
    watcher = _Watcher(tuple(dict.fromkeys(gpu_uuids)), tracker, on_change,
                       EVENT_WAIT_MS if wait_ms is None else wait_ms)
    try:
        await watcher.run(task_status)
    finally:
        with trio.CancelScope(shield=True):
            await watcher.close()


class _Watcher:
    """The loop's state: the event set, which GPUs still need registering, the backoff."""

    def __init__(self, gpus: tuple[str, ...], tracker: HealthTracker, on_change: Callable[[], None],
                 wait_ms: int) -> None:
        self.gpus = gpus
        self.tracker = tracker
        self.on_change = on_change
        self.wait_ms = wait_ms
        self.events: adapter.EventSet | None = None
        #: GPUs whose registration failed (not NOT_SUPPORTED): their recovery probe registers them again.
        self.unregistered: set[str] = set()
        #: The last wait worked: a node-wide fault may only clear then.
        self.wait_ok = False
        self.backoff = BACKOFF_FIRST_S

    def _next_step(self, permanent: bool) -> str:
        if permanent:
            return "permanent until nvdp restarts"
        return f"probing again after {self.tracker.quiet_period_s:g} s without a critical error"

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        opened = await self._open()
        # Started once every GPU is registered: events from now on are seen (earlier ones are history to NVML).
        task_status.started()
        if not opened:
            await self._sleep_backoff()
        while True:
            await self._probe_due()
            if self.events is None and not await self._open():
                await self._sleep_backoff()
                continue
            assert self.events is not None
            try:
                # Abandoned on cancel: shutdown and reload never wait for the wait's timeout (see the adapter's
                # `shutdown` for why NVML stays safe).
                event = await trio.to_thread.run_sync(self.events.wait, self._timeout_ms(), abandon_on_cancel=True)
            except NvmlError as exc:
                self.wait_ok = False
                self._node_failed(f"waiting for NVML health events failed: {exc}")
                await self._sleep_backoff()
                continue
            self.wait_ok = True
            self.backoff = BACKOFF_FIRST_S
            if event is not None:
                self._on_event(event)

    async def close(self) -> None:
        if self.events is not None:
            events, self.events = self.events, None
            try:
                await trio.to_thread.run_sync(events.free)
            except NvmlError as exc:  # NVML is going away anyway; nothing else to do
                log.debug("freeing the NVML event set failed: %s", exc)

    # ------------------------------------------------------------------------------------------------- set-up

    async def _open(self) -> bool:
        try:
            self.events = await trio.to_thread.run_sync(adapter.EventSet)
        except NvmlError as exc:
            self._node_failed(f"cannot create an NVML event set: {exc}")
            return False
        for uuid in self.gpus:
            error = await self._register(uuid)
            if error is not None:
                now = trio.current_time()
                permanent = error.gpu_lost
                if not permanent:
                    self.unregistered.add(uuid)
                if self.tracker.on_error(uuid, f"cannot watch health events: {error}", now, permanent):
                    self.on_change()
                    log.warning("cannot watch health events on %s: %s; marking its devices Unhealthy; %s",
                                uuid, error, self._next_step(permanent))
        return True

    async def _register(self, uuid: str) -> NvmlError | None:
        """Registers one GPU; the error if that failed for a reason other than the GPU lacking event support."""
        assert self.events is not None
        try:
            await trio.to_thread.run_sync(self.events.register, uuid)
        except NvmlError as exc:
            if not exc.not_supported:
                return exc
            # Upstream's behaviour since v0.19: an old GPU is served, just never marked by health events.
            log.warning("%s is too old to support health checking (%s): its devices stay Healthy, unchecked",
                        uuid, exc)
        self.unregistered.discard(uuid)
        return None

    # ------------------------------------------------------------------------------------------------- events

    def _timeout_ms(self) -> int:
        """wait_ms, shortened so the next probe starts on time."""
        due = self.tracker.next_probe_at()
        if due is None:
            return self.wait_ms
        return max(1, min(self.wait_ms, math.ceil((due - trio.current_time()) * 1000)))

    def _on_event(self, event: XidEvent) -> None:
        now = trio.current_time()
        what = "double-bit ECC error" if event.event_type == EVENT_DOUBLE_BIT_ECC else xid_name(event.xid)
        placement = (event.gi, event.ci) if event.gi is not None and event.ci is not None else None
        where = event.gpu_uuid if placement is None else f"{event.gpu_uuid} MIG instance (gi {event.gi}, ci {event.ci})"
        critical = self.tracker.is_critical(event)
        # Every event goes to the tracker (which counts it, critical or not); only a critical one changes anything.
        changed = self.tracker.on_xid(event, now)
        if not critical:
            log.info("%s on %s: not critical under the health policy; nothing changes", what, where)
            return
        fault = self.tracker.fault(event.gpu_uuid, placement)
        permanent = fault is not None and fault.permanent
        if changed:
            self.on_change()  # first: the kubelet hears of it before we spend time on logging
            log.warning("%s on %s: marking its devices Unhealthy; %s", what, where, self._next_step(permanent))
        else:
            log.warning("%s on %s again: its devices stay Unhealthy; %s", what, where, self._next_step(permanent))

    def _node_failed(self, reason: str) -> None:
        retry = f"trying again in {min(self.backoff, BACKOFF_MAX_S):.1f} s"
        if self.tracker.on_error(None, reason, trio.current_time()):
            self.on_change()
            log.error("%s; %s; marking every device Unhealthy, %s", reason, retry, self._next_step(False))
        else:
            log.warning("%s; %s", reason, retry)

    async def _sleep_backoff(self) -> None:
        delay = min(self.backoff, BACKOFF_MAX_S)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
        await trio.sleep(delay)

    # ------------------------------------------------------------------------------------------------- probes

    async def _probe_due(self) -> None:
        for uuid in self.tracker.due_for_probe(trio.current_time()):
            ok = await (self._probe_node() if uuid == ALL_GPUS else self._probe_gpu(uuid))
            now = trio.current_time()
            if not ok:
                self.tracker.on_probe(uuid, False, now)  # restarts its quiet period (a no-op once permanent)
            elif self.tracker.on_probe(uuid, True, now):
                self.on_change()
                log.info("%s answers NVML again after %g s without a critical error: its devices are Healthy again",
                         _scope(uuid), self.tracker.quiet_period_s)

    async def _probe_gpu(self, uuid: str) -> bool:
        """One cheap query, plus the event registration if that had failed. A lost GPU becomes permanent."""
        try:
            await trio.to_thread.run_sync(adapter.probe, uuid)
        except NvmlError as exc:
            if exc.gpu_lost:
                self._lost(uuid, exc)
            else:
                log.warning("probing %s failed: %s; its devices stay Unhealthy, probing again in %g s",
                            uuid, exc, self.tracker.quiet_period_s)
            return False
        if uuid in self.unregistered and self.events is not None:
            error = await self._register(uuid)
            if error is not None:
                if error.gpu_lost:
                    self._lost(uuid, error)
                else:
                    log.warning("registering %s for health events failed again: %s; its devices stay Unhealthy, "
                                "probing again in %g s", uuid, error, self.tracker.quiet_period_s)
                return False
        return True

    async def _probe_node(self) -> bool:
        """After a node-wide fault: the wait must work again and every GPU not already given up must answer."""
        if self.events is None or not self.wait_ok:
            return False
        ok = True
        for uuid in self.gpus:
            if any(f.permanent for f in self.tracker.faults if f.gpu_uuid == uuid):
                continue  # already given up on: it must not keep the other GPUs Unhealthy
            try:
                await trio.to_thread.run_sync(adapter.probe, uuid)
            except NvmlError as exc:
                if exc.gpu_lost:
                    self._lost(uuid, exc)  # its own permanent fault; the rest of the node may recover
                else:
                    log.warning("probing %s failed: %s; every device stays Unhealthy, probing again in %g s",
                                uuid, exc, self.tracker.quiet_period_s)
                    ok = False
        return ok

    def _lost(self, uuid: str, exc: NvmlError) -> None:
        self.unregistered.discard(uuid)
        if self.tracker.on_error(uuid, f"GPU is lost: {exc.message}", trio.current_time(), permanent=True):
            self.on_change()
            log.error("%s is lost (%s): marking its devices Unhealthy; %s", uuid, exc, self._next_step(True))


def _scope(uuid: str) -> str:
    return "the node" if uuid == ALL_GPUS else uuid
