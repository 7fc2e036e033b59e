"""Keeps this node's ResourceSlices in the API server equal to the devices nvdp serves through DRA.

`SlicePublisher` is one long-lived child. The integrator hands it the devices (`set_devices()`, with the API form
`nvdp.core.dra.devices.build_devices` gives) whenever the plan, the MIG layout or health changes; the publisher does
the rest:

- it watches its own slices (driver and node by field selector, `app.kubernetes.io/managed-by=nvdp` by label)
  through `nvdp.k8s.watch`, so reconnects, bookmarks, relists on 410 Gone and their backoff are the other watches';
- after every change on either side, and a short settling delay (`settle_s`, so the kubelet deleting three slices
  one by one costs one rewrite, not three), `nvdp.core.dra.slices.plan_sync` says what to write: nothing when the
  API server already holds the pool (a restarted nvdp with unchanged devices writes nothing), else every slice at
  a new `pool.generation`;
- so slices the kubelet wipes (at its start, and 30 s after this plugin unregistered) or anyone deletes or edits
  come back as soon as the watch tells;
- writes are bounded: a token bucket (`writes_per_s`, `write_burst`) and, after a failed write, the watch's capped
  exponential backoff; a pool that needs rewriting again and again without a new `set_devices()` (a fight with
  another writer) backs off the same way and is logged;
- its own writes are remembered until the watch has shown them (or `write_memory_s` has passed), so a watch that
  lags behind never makes it create a slice twice;
- a conflict (409) reads the slice again and retries; a slice gone under an update is simply created again.

Stopping: by default the slices stay when the publisher is cancelled. A restarting nvdp (an upgrade, a crash, a
SIGTERM) finds them in sync and writes nothing, and claims keep being scheduled onto the node meanwhile; if nvdp
does not come back, the kubelet deletes them 30 s after the plugin's registration socket went away (NVIDIA's driver
relies on the same kubelet behaviour). When the GPUs leave DRA for good while nvdp keeps running (DRA switched off,
GPUs moved back to the device plugin), the integrator calls `withdraw_on_stop()` before stopping the publisher, or
`await withdraw()`: otherwise the scheduler could hand a GPU to a claim and, through the device plugin, to a pod.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from nvdp.core.dra.slices import Pool, SyncPlan, plan_sync
from nvdp.k8s.client import ApiClient, ApiUnreachable
from nvdp.k8s.resourceslices import (
    ResourceSlice,
    SliceWriteError,
    create_slice,
    delete_slice,
    get_slice,
    node_uid,
    update_slice,
    watch_slices,
)
from nvdp.k8s.watch import Backoff, WatchObserver, WatchOptions

log = logging.getLogger(__name__)


class SliceObserver(Protocol):
    """Told what the publisher does (metrics, `nvdp status`). Called on trio; never blocks."""

    def slices_published(self, driver: str, generation: int, slices: int, devices: int) -> None:
        """The API server holds the pool as wanted (after writes, or found so)."""

    def slice_write(self, driver: str, operation: str, ok: bool) -> None:
        """One create, update or delete of a slice was tried (`operation`), and whether it succeeded."""


@dataclass(frozen=True, slots=True)
class PublisherOptions:
    #: Wait after a change before deciding what to write (coalesces bursts of watch events and set_devices calls).
    settle_s: float = 0.5
    #: At most this many writes per second on average, `write_burst` at once.
    writes_per_s: float = 5.0
    write_burst: int = 10
    #: After a failed write: 0.5 s doubling to 30 s, with jitter, as the watches.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Rewriting passes within `churn_window_s` without a new set_devices() before backing off (someone else keeps
    #: changing the slices). A kubelet wipe now and then costs one pass each and never trips it.
    churn_passes: int = 3
    churn_window_s: float = 60.0
    #: How long an own write is trusted over a watch that has not shown it yet.
    write_memory_s: float = 60.0
    #: Bound on deleting the slices on the way out (`withdraw_on_stop`).
    withdraw_timeout_s: float = 5.0
    watch: WatchOptions = field(default_factory=WatchOptions)


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = trio.current_time()

    async def take(self) -> None:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            await trio.sleep((1 - self.tokens) / self.rate)
            self.tokens, self.at = 1.0, trio.current_time()
        self.tokens -= 1


@dataclass(slots=True)
class _Written:
    """An own write the watch has not shown yet: the slice as the API server answered (None: deleted)."""

    obj: ResourceSlice | None
    until: float


class SlicePublisher:
    """Publishes one node's devices for one driver. Create it (ValueError for a node or driver name that cannot
    name a pool), `run()` it as a child, call `set_devices()`."""

    def __init__(
        self,
        client: ApiClient,
        node_name: str,
        driver: str,
        *,
        options: PublisherOptions | None = None,
        observer: SliceObserver | None = None,
        watch_observer: WatchObserver | None = None,
    ) -> None:
        Pool(node_name, "", driver)  # a node or driver name no slice can carry is a start-up error (ValueError)
        self.client = client
        self.node_name = node_name
        self.driver = driver
        self.options = options or PublisherOptions()
        self.observer = observer
        self.watch_observer = watch_observer
        #: None until the integrator says what to publish: nothing is written before (an empty pool would take the
        #: node's devices away from the scheduler while nvdp starts).
        self._devices: tuple[Mapping[str, Any], ...] | None = None
        self._pool: Pool | None = None
        self._seen: dict[str, ResourceSlice] = {}
        self._written: dict[str, _Written] = {}
        self._watch_ready = False
        #: The highest generation written or seen, so a generation never goes back (not even after a wipe).
        self.generation = 0
        #: Bumped by set_devices(); `synced_version` catches up when the API server holds that version.
        self._version = 0
        self.synced_version = -1
        self._withdraw = False
        self._changed = trio.Event()
        self._synced = trio.Event()

    # -- the integrator's side ----------------------------------------------------------------------------------

    def set_devices(self, devices: Sequence[Mapping[str, Any]]) -> None:
        """Publish these devices (`devices[]` entries of a ResourceSlice) from now on. Never blocks."""
        devices = tuple(devices)
        if devices == self._devices:
            return
        self._devices = devices
        self._version += 1
        self._wake()

    def withdraw_on_stop(self, withdraw: bool = True) -> None:
        """Delete the slices when the publisher is stopped (the GPUs leave DRA); see the module docstring."""
        self._withdraw = withdraw

    async def wait_synced(self) -> int:
        """Until the API server holds the devices of the latest `set_devices()`; the pool's generation then."""
        while self.synced_version < self._version or self._devices is None:
            await self._synced.wait()
        return self.generation

    async def withdraw(self) -> int:
        """Delete every slice of the pool now; how many were deleted. Publishing stops until set_devices()."""
        self._devices = None
        deleted = 0
        for name, obj in sorted(self._current().items()):
            if await self._delete(name, obj.metadata.uid, ""):
                deleted += 1
        return deleted

    # -- the child ----------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Reports started at once: the API server may be down for a while, and the other
        children need not wait for it (`wait_synced()` says when the slices are there)."""
        self._watch_ready = False  # a restarted run trusts only its own watch
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch)
                await self._sync_loop()
        finally:
            if self._withdraw:
                with trio.move_on_after(self.options.withdraw_timeout_s) as scope:
                    scope.shield = True
                    try:
                        count = await self.withdraw()
                        log.info("withdrew %d ResourceSlice(s) of driver %s", count, self.driver)
                    except (SliceWriteError, ApiUnreachable) as exc:
                        log.warning("could not withdraw the ResourceSlices of driver %s: %s (the kubelet deletes "
                                    "them 30 s after the plugin unregistered)", self.driver, exc)

    async def _watch(self) -> None:
        async with watch_slices(self.client, self.node_name, self.driver, self.options.watch,
                                observer=self.watch_observer) as states:
            async for state in states:
                self._seen = state
                now = trio.current_time()
                for name, written in list(self._written.items()):
                    if written.until <= now or _shown(state, name, written.obj):
                        del self._written[name]
                self._watch_ready = True
                self._wake()

    def _current(self) -> dict[str, ResourceSlice]:
        """The slices as far as nvdp knows: what the watch shows, overlaid with own writes it has not shown yet."""
        current = dict(self._seen)
        now = trio.current_time()
        for name, written in self._written.items():
            if written.until > now:
                if written.obj is None:
                    current.pop(name, None)
                else:
                    current[name] = written.obj
        return current

    def _remember(self, name: str, obj: ResourceSlice | None) -> None:
        if _shown(self._seen, name, obj):
            # The watch was quicker than the write's answer.
            self._written.pop(name, None)
        else:
            self._written[name] = _Written(obj, trio.current_time() + self.options.write_memory_s)

    def _wake(self) -> None:
        self._changed.set()

    async def _ensure_pool(self, backoff: Backoff) -> Pool:
        while self._pool is None:
            try:
                uid = await node_uid(self.client, self.node_name)
                self._pool = Pool(self.node_name, uid, self.driver)
            except (SliceWriteError, ApiUnreachable) as exc:
                delay = backoff.next_delay()
                log.warning("cannot read Node %s for its ResourceSlices' owner: %s; retrying in %.1f s",
                            self.node_name, exc, delay)
                await trio.sleep(delay)
        backoff.reset()
        return self._pool

    async def _sync_loop(self) -> None:
        options = self.options
        backoff = Backoff(options.backoff_initial_s, options.backoff_max_s)
        bucket = _TokenBucket(options.writes_per_s, options.write_burst)
        pool = await self._ensure_pool(backoff)
        passes: list[float] = []  # when the writing passes for `churn_version` began
        churn_version = -1
        hold_until = -math.inf  # a fight with another writer: no pass before then
        held = False
        while True:
            await self._changed.wait()
            await trio.sleep(options.settle_s)
            if trio.current_time() < hold_until and self._version == churn_version:  # new devices never wait
                await trio.sleep_until(hold_until)
                held = True
            self._changed = trio.Event()
            if self._devices is None or not self._watch_ready:
                continue
            version, devices = self._version, self._devices
            current = self._current()
            plan = plan_sync(pool, devices, [s.state() for s in current.values()], self.generation)
            if plan.in_sync:
                self.generation = plan.generation
                self._report_synced(version, plan, current)
                continue
            now = trio.current_time()
            passes = [t for t in passes if t > now - options.churn_window_s] if version == churn_version else []
            churn_version = version
            if len(passes) >= options.churn_passes and not held:
                delay = backoff.next_delay()
                log.warning("the ResourceSlices of driver %s needed rewriting %d times in %.0f s without a change "
                            "of devices (another writer?); next try in %.1f s", self.driver, len(passes),
                            options.churn_window_s, delay)
                hold_until = now + delay
                self._wake()
                continue
            held = False
            passes.append(now)
            try:
                await self._execute(plan, current, bucket)
            except (SliceWriteError, ApiUnreachable) as exc:
                delay = backoff.next_delay()
                log.warning("publishing the ResourceSlices of driver %s: %s; retrying in %.1f s",
                            self.driver, exc, delay)
                if isinstance(exc, SliceWriteError) and exc.conflict:
                    await self._reread(exc.name)
                await trio.sleep(delay)
                self._wake()
                continue
            self.generation = max(self.generation, plan.generation)
            if len(passes) <= options.churn_passes:
                backoff.reset()
            log.info("published %d ResourceSlice(s) of driver %s for node %s at generation %d (%d write(s))",
                     len(plan.updates) + len(plan.creates), self.driver, self.node_name, plan.generation,
                     plan.writes)
            self._wake()  # check once more against what the server now holds

    def _report_synced(self, version: int, plan: SyncPlan, current: Mapping[str, ResourceSlice]) -> None:
        if self.observer is not None and self.synced_version != version:
            devices = sum(len(s.spec.get("devices") or ()) for s in current.values())
            self.observer.slices_published(self.driver, plan.generation, len(current), devices)
        self.synced_version = version
        self._synced.set()
        self._synced = trio.Event()

    async def _execute(self, plan: SyncPlan, current: Mapping[str, ResourceSlice], bucket: _TokenBucket) -> None:
        """Deletes, then updates, then creates (obsolete slices go first, as Kubernetes' own publisher does)."""
        for delete in plan.deletes:
            await bucket.take()
            await self._delete(delete.name, delete.uid, delete.resource_version)
        for update in plan.updates:
            await bucket.take()
            try:
                obj = await update_slice(self.client, update.name, update.body)
            except SliceWriteError as exc:
                self._count("update", False)
                if exc.not_found:
                    # Deleted under us: it is created again on the next pass.
                    self._remember(update.name, None)
                raise
            self._count("update", True)
            self._remember(obj.metadata.name, obj)
        for create in plan.creates:
            await bucket.take()
            try:
                obj = await create_slice(self.client, create.body)
            except SliceWriteError:
                self._count("create", False)
                raise
            self._count("create", True)
            self._remember(obj.metadata.name, obj)

    async def _delete(self, name: str, uid: str, resource_version: str) -> bool:
        try:
            deleted = await delete_slice(self.client, name, uid, resource_version)
        except SliceWriteError:
            self._count("delete", False)
            raise
        self._count("delete", True)
        self._remember(name, None)
        return deleted

    async def _reread(self, name: str) -> None:
        """After a conflict: the slice as it is now, so the next pass starts from it."""
        try:
            obj = await get_slice(self.client, name)
        except (SliceWriteError, ApiUnreachable) as exc:
            log.debug("re-reading ResourceSlice %s failed: %s", name, exc)
            return
        self._remember(name, obj)

    def _count(self, operation: str, ok: bool) -> None:
        if self.observer is not None:
            self.observer.slice_write(self.driver, operation, ok)


def _shown(seen: Mapping[str, ResourceSlice], name: str, written: ResourceSlice | None) -> bool:
    """Whether the watch's state already reflects an own write (`written` None: a delete).

    A resourceVersion is opaque to clients, but the API server's are etcd revisions: when both are integers, a
    later one shown by the watch also covers the write (someone wrote after nvdp); otherwise only the same one."""
    shown = seen.get(name)
    if written is None:
        return shown is None
    if shown is None:
        return False
    mine, theirs = written.metadata.resource_version, shown.metadata.resource_version
    if mine.isdigit() and theirs.isdigit():
        return int(theirs) >= int(mine)
    return theirs == mine
