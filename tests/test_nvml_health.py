"""watch_nvml_health against the fake libnvidia-ml.so.1: events injected through the simulated node's events file
reach the tracker, the devices and the log."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nvdp import sim
from nvdp.core.health import ALL_GPUS, HealthTracker, XidPolicy
from nvdp.core.plan.model import Device
from nvdp.nvml import adapter, health
from nvdp.nvml.adapter import NvmlError
from nvdp.nvml.health import watch_nvml_health
from tests.harness import eventually
from tests.helpers import gpu, write_node

GPU0 = gpu(0)["uuid"]
GPU1 = gpu(1)["uuid"]
GPU2 = gpu(2)["uuid"]
GPUS = [GPU0, GPU1, GPU2]


def device(device_id: str, gpu_uuid: str, replica: int | None = None, mig: tuple[int, int] | None = None) -> Device:
    return Device(id=device_id, physical_id=device_id.split("::")[0], index="0", gpu_uuid=gpu_uuid, gpu_index=0,
                  paths=(), replica=replica, mig_placement=mig)


# GPU 0: MIG on, two instances. GPU 1: plain, shared as two replicas. GPU 2: too old for health events.
MIG_A = device("MIG-a", GPU0, mig=(1, 0))
MIG_B = device("MIG-b", GPU0, mig=(2, 0))
GPU1_REPLICAS = [device(f"{GPU1}::0", GPU1, 0), device(f"{GPU1}::1", GPU1, 1)]
GPU2_WHOLE = device(GPU2, GPU2)
DEVICES = [MIG_A, MIG_B, *GPU1_REPLICAS, GPU2_WHOLE]


def node_file(tmp_path: Path, **gpu1: Any) -> Path:
    migs = [
        {"uuid": "MIG-a", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 1, "ci": 0},
        {"uuid": "MIG-b", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 2, "ci": 0},
    ]
    return write_node(tmp_path / "node.yaml",
                      [gpu(0, migEnabled=True, migDevices=migs), gpu(1, **gpu1), gpu(2, eventsSupported=False)])


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., sim.SimHandle]]:
    """Activates the simulated node (GPU 1 overridable) and initializes NVML; shuts it down afterwards."""

    def _start(**gpu1: Any) -> sim.SimHandle:
        adapter.shutdown()
        handle = sim.activate(sim.load_node(node_file(tmp_path, **gpu1)), tmp_path / "sim")
        adapter.init()
        return handle

    yield _start
    adapter.shutdown()


@pytest.fixture
def node(start: Callable[..., sim.SimHandle]) -> sim.SimHandle:
    return start()


class Changes:
    """The on_change callback: records when it was called, and lets a test wait for the n-th call."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._called = trio.Event()

    def __call__(self) -> None:
        self.times.append(trio.current_time())
        self._called.set()
        self._called = trio.Event()

    def __len__(self) -> int:
        return len(self.times)

    async def reach(self, count: int, limit_s: float = 10.0) -> None:
        with trio.fail_after(limit_s):
            while len(self.times) < count:
                await self._called.wait()


#: A bound far above what a test waits for: a wait that ends sooner was cut short (or woken by an event).
WAIT_BOUND_MS = 10_000


def record_wait_timeouts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The timeout of every event wait the loop starts, in order. The wait itself is capped at 20 ms, so that a
    large bound costs nothing (the loop simply waits again: what a timeout is to it)."""
    timeouts: list[int] = []
    real = adapter.EventSet.wait

    def wait(self: adapter.EventSet, timeout_ms: int) -> adapter.XidEvent | None:
        timeouts.append(timeout_ms)
        return real(self, min(timeout_ms, 20))

    monkeypatch.setattr(adapter.EventSet, "wait", wait)
    return timeouts


def record_backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delay of every backoff sleep the loop takes, in order."""
    delays: list[float] = []
    real = health._Watcher._sleep_backoff

    async def sleep_backoff(self: health._Watcher) -> None:
        delays.append(min(self.backoff, health.BACKOFF_MAX_S))
        await real(self)

    monkeypatch.setattr(health._Watcher, "_sleep_backoff", sleep_backoff)
    return delays


@contextlib.asynccontextmanager
async def watching(tracker: HealthTracker, wait_ms: int = 50) -> AsyncIterator[Changes]:
    """Runs the loop until the block ends."""
    changes = Changes()
    with trio.fail_after(20):  # nothing here may hang the suite
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(watch_nvml_health, GPUS, tracker, changes, wait_ms=wait_ms))
            yield changes
            nursery.cancel_scope.cancel()


async def test_an_xid_marks_every_device_of_its_gpu(node: sim.SimHandle, caplog: pytest.LogCaptureFixture) -> None:
    # How fast is bench/'s business (health.xid_to_unhealthy); here: that it happens, and to which devices.
    caplog.set_level(logging.INFO, "nvdp.nvml.health")
    tracker = HealthTracker(XidPolicy())
    async with watching(tracker) as changes:
        node.inject_xid(GPU1, 48)
        await changes.reach(1)
    assert tracker.unhealthy(DEVICES) == {d.id: "XID 48 (double-bit ECC error)" for d in GPU1_REPLICAS}
    assert f"XID 48 (double-bit ECC error) on {GPU1}: marking its devices Unhealthy; probing again after 300 s" in (
        caplog.text)


async def test_an_ignored_xid_changes_nothing(node: sim.SimHandle, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nvdp.nvml.health")
    tracker = HealthTracker(XidPolicy())
    async with watching(tracker) as changes:
        node.inject_xid(GPU1, 13)
        node.inject_xid(GPU0, 48)  # a marker: events arrive in order, so once it is seen the 13 was handled
        await changes.reach(1)
    assert set(tracker.unhealthy(DEVICES)) == {MIG_A.id, MIG_B.id}
    assert f"XID 13 (graphics engine exception) on {GPU1}: not critical under the health policy" in caplog.text


async def test_an_xid_on_a_mig_device_marks_only_that_device(node: sim.SimHandle) -> None:
    tracker = HealthTracker(XidPolicy())
    async with watching(tracker) as changes:
        node.inject_xid("MIG-b", 94)
        await changes.reach(1)
    assert tracker.unhealthy(DEVICES) == {MIG_B.id: "XID 94 (contained ECC error) in MIG instance (gi 2, ci 0)"}


async def test_a_double_bit_ecc_event_marks_the_gpu(node: sim.SimHandle) -> None:
    tracker = HealthTracker(XidPolicy())
    async with watching(tracker) as changes:
        node.inject(f"ecc {GPU0}")
        await changes.reach(1)
    assert set(tracker.unhealthy(DEVICES)) == {MIG_A.id, MIG_B.id}


async def test_devices_recover_after_a_quiet_period(
        node: sim.SimHandle, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, "nvdp.nvml.health")
    timeouts = record_wait_timeouts(monkeypatch)
    tracker = HealthTracker(XidPolicy(), quiet_period_s=0.2)
    async with watching(tracker, wait_ms=WAIT_BOUND_MS) as changes:
        node.inject_xid(GPU1, 48)
        await changes.reach(1)
        assert tracker.unhealthy(DEVICES) != {}
        await changes.reach(2)
    assert changes.times[1] - changes.times[0] >= 0.2  # not before the quiet period
    # The probe starts on time: the wait is cut short for it (to the probe's due time, well under the bound).
    assert timeouts[0] == WAIT_BOUND_MS
    assert min(timeouts) <= 200, timeouts
    assert tracker.unhealthy(DEVICES) == {}
    assert f"{GPU1} answers NVML again after 0.2 s without a critical error: its devices are Healthy again" in (
        caplog.text)


async def test_a_lost_gpu_stays_unhealthy(node: sim.SimHandle, caplog: pytest.LogCaptureFixture) -> None:
    tracker = HealthTracker(XidPolicy(), quiet_period_s=0.05)
    async with watching(tracker) as changes:
        node.inject_lost(GPU1)  # the fake reports XID 79 to registered sets
        await changes.reach(1)
        # No probe may revive it. The witness that quiet periods passed and probes ran: an XID on GPU 0, injected
        # after the loss, marks it and then recovers (changes 2 and 3); GPU 1's fault is untouched by then.
        node.inject_xid(GPU0, 48)
        await changes.reach(3)
        assert tracker.next_probe_at() is None  # nothing left to probe: the lost GPU never is
    assert len(changes) == 3
    assert set(tracker.unhealthy(DEVICES).values()) == {"XID 79 (GPU has fallen off the bus)"}
    assert "permanent until nvdp restarts" in caplog.text


async def test_nothing_listens_when_checks_are_disabled(
        node: sim.SimHandle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "nvdp.nvml.health")

    def no_event_sets() -> None:
        raise AssertionError("no event set may be created with DP_DISABLE_HEALTHCHECKS=all")

    monkeypatch.setattr(adapter, "EventSet", no_event_sets)
    tracker = HealthTracker(XidPolicy.from_env("all", None))
    async with watching(tracker) as changes:
        node.inject_xid(GPU1, 48)
        node.inject_lost(GPU0)
        # Nothing could hear them: started without an event set (creating one would have failed the test), and
        # it said so.
        assert "health checks disabled by policy: not listening to NVML events" in caplog.text
    assert len(changes) == 0
    assert tracker.faults == ()


async def test_an_old_gpu_is_served_unchecked(node: sim.SimHandle, caplog: pytest.LogCaptureFixture) -> None:
    tracker = HealthTracker(XidPolicy())
    async with watching(tracker) as changes:
        pass
    assert len(changes) == 0 and tracker.faults == ()
    assert f"{GPU2} is too old to support health checking" in caplog.text


async def test_a_gpu_lost_before_start_is_permanently_unhealthy(start: Callable[..., sim.SimHandle]) -> None:
    start(lost=True)
    tracker = HealthTracker(XidPolicy(), quiet_period_s=0.01)
    async with watching(tracker) as changes:
        pass
    assert len(changes) == 1
    (fault,) = tracker.faults
    assert (fault.gpu_uuid, fault.permanent) == (GPU1, True)
    assert tracker.next_probe_at() is None


async def test_a_failed_registration_is_retried_by_the_recovery_probe(
        node: sim.SimHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    real = adapter.EventSet
    failures = [NvmlError(999, "injected failure", "nvmlDeviceRegisterEvents")]

    class FlakyRegistration(real):
        def register(self, gpu_uuid: str, event_types: int = adapter.HEALTH_EVENTS) -> None:
            if gpu_uuid == GPU1 and failures:
                raise failures.pop()
            super().register(gpu_uuid, event_types)

    monkeypatch.setattr(adapter, "EventSet", FlakyRegistration)
    tracker = HealthTracker(XidPolicy(), quiet_period_s=0.05)
    async with watching(tracker) as changes:
        assert set(tracker.unhealthy(DEVICES)) == {d.id for d in GPU1_REPLICAS}
        await changes.reach(2)  # probed, registered again, Healthy
        assert tracker.unhealthy(DEVICES) == {}
        node.inject_xid(GPU1, 48)  # and its events are heard now
        await changes.reach(3)
    assert set(tracker.unhealthy(DEVICES)) == {d.id for d in GPU1_REPLICAS}


class FailingWaits:
    """An event set whose first `failures` waits fail; later waits time out like a quiet node."""

    instances: list[FailingWaits] = []

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.waits: list[float] = []
        self.freed = False
        FailingWaits.instances.append(self)

    def register(self, gpu_uuid: str) -> None:
        pass

    def wait(self, timeout_ms: int) -> None:
        self.waits.append(time.monotonic())  # a worker thread: no trio clock here
        if self.failures:
            self.failures -= 1
            raise NvmlError(999, "injected failure", "nvmlEventSetWait")
        time.sleep(timeout_ms / 1000)

    def free(self) -> None:
        self.freed = True


async def test_a_failing_wait_marks_every_device_backs_off_and_recovers(
        node: sim.SimHandle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    events = FailingWaits(failures=2)
    monkeypatch.setattr(adapter, "EventSet", lambda: events)
    tracker = HealthTracker(XidPolicy(), quiet_period_s=0.05)
    backoffs = record_backoffs(monkeypatch)
    async with watching(tracker, wait_ms=20) as changes:
        await changes.reach(1)
        assert set(tracker.unhealthy(DEVICES)) == {d.id for d in DEVICES}
        assert tracker.faults[0].gpu_uuid == ALL_GPUS
        await changes.reach(2)  # waits work again, quiet period passed, every GPU answers
    assert tracker.unhealthy(DEVICES) == {}
    assert backoffs == [0.1, 0.2]  # one backoff sleep per failed wait, doubling: no hot loop
    assert events.freed
    assert "waiting for NVML health events failed: nvmlEventSetWait: injected failure" in caplog.text
    assert "trying again in 0.2 s" in caplog.text


async def test_cancellation_is_prompt_and_frees_the_event_set(
        node: sim.SimHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    real = adapter.EventSet
    freed: list[bool] = []

    class Recording(real):
        def free(self) -> None:
            freed.append(True)
            super().free()

    monkeypatch.setattr(adapter, "EventSet", Recording)
    timeouts = record_wait_timeouts(monkeypatch)
    async with watching(HealthTracker(XidPolicy()), wait_ms=100):
        await eventually(lambda: bool(timeouts), "a wait in progress")
        cancelled_after = len(timeouts)
    # Cancellation waits for the wait in progress, bounded by wait_ms, and starts no other.
    assert len(timeouts) == cancelled_after and max(timeouts) <= 100, timeouts
    assert freed == [True]


async def test_an_event_set_that_cannot_be_created_is_retried(
        node: sim.SimHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    real = adapter.EventSet
    attempts: list[None] = []

    def flaky_create() -> adapter.EventSet:
        attempts.append(None)
        if len(attempts) == 1:
            raise NvmlError(adapter.ERROR_UNINITIALIZED, "injected failure", "nvmlEventSetCreate")
        return real()

    monkeypatch.setattr(adapter, "EventSet", flaky_create)
    backoffs = record_backoffs(monkeypatch)
    tracker = HealthTracker(XidPolicy(), quiet_period_s=0.05)
    async with watching(tracker) as changes:
        assert set(tracker.unhealthy(DEVICES)) == {d.id for d in DEVICES}  # already when started
        await changes.reach(2)  # created on the second try; every GPU answers after the quiet period
        assert tracker.unhealthy(DEVICES) == {}
        node.inject_xid(GPU1, 48)
        await changes.reach(3)
    assert len(attempts) == 2 and backoffs == [0.1]  # backed off once, not retried at once
