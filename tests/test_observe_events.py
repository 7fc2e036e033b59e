"""nvdp.observe.events: Events are rate-limited per (reason, subject), folded not lost, and never block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from nvdp.observe import events
from nvdp.observe.events import EventRecorder
from nvdp.observe.metrics import Metrics
from tests.observe_fixtures import scrape

GPU = "GPU-00000000-aaaa-bbbb-cccc-000000000000"


class FakePoster:
    def __init__(self, fail: BaseException | None = None, hang: bool = False) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail
        self.hang = hang

    async def post(self, path: str, body: Mapping[str, Any]) -> None:
        if self.hang:
            await trio.sleep_forever()
        self.posts.append((path, dict(body)))
        if self.fail is not None:
            raise self.fail


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_an_event_about_the_node(autojump_clock: trio.testing.MockClock) -> None:
    recorder = EventRecorder("node-a", node_uid="1234", wall_clock=lambda: 1_700_000_000.0)
    poster = FakePoster()
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.serve, poster)
        assert recorder.device_unhealthy(GPU, "XID 79 (GPU has fallen off the bus)", "nvidia.com/gpu")
        await settle()
        nursery.cancel_scope.cancel()
    ((path, body),) = poster.posts
    assert path == "/api/v1/namespaces/default/events"
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "1234"}
    assert body["metadata"]["namespace"] == "default" and body["metadata"]["name"].startswith("node-a.")
    assert (body["reason"], body["type"], body["count"]) == ("DeviceUnhealthy", "Warning", 1)
    assert body["message"] == f"device {GPU} (nvidia.com/gpu) is Unhealthy: XID 79 (GPU has fallen off the bus)"
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2023-11-14T22:13:20Z"
    assert body["source"] == {"component": "nvidia-device-plugin", "host": "node-a"}


async def test_repeats_are_folded_into_one_event_per_window(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    recorder = EventRecorder("node-a", interval_s=30, metrics=metrics)
    poster = FakePoster()
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.serve, poster)
        for n in range(5):
            recorder.record(events.DEVICE_UNHEALTHY, f"flap {n}", GPU)
            await settle()
        recorder.record(events.DEVICE_UNHEALTHY, "other GPU", "GPU-other")  # another subject: its own window
        recorder.record(events.CONFIG_APPLIED, "applied", "default")  # another reason: its own window
        await settle()
        assert [b["message"] for _, b in poster.posts] == ["flap 0", "other GPU", "applied"]
        await trio.sleep(31)  # the window ends: the 4 folded repeats go out as one Event
        assert [(b["message"], b["count"]) for _, b in poster.posts[3:]] == [("flap 4", 4)]
        recorder.record(events.DEVICE_UNHEALTHY, "again", GPU)  # a new window opened at the flush: folded
        await settle()
        assert len(poster.posts) == 4
        await trio.sleep(31)
        assert poster.posts[-1][1]["message"] == "again"
        await trio.sleep(120)  # quiet: nothing more is posted
        assert len(poster.posts) == 5
        recorder.record(events.DEVICE_UNHEALTHY, "much later", GPU)
        await settle()
        assert poster.posts[-1][1]["message"] == "much later"
        nursery.cancel_scope.cancel()
    samples = scrape(metrics)
    assert samples.value("nvdp_events_total", reason="DeviceUnhealthy", result="posted") == 5
    assert samples.value("nvdp_events_total", reason="DeviceUnhealthy", result="suppressed") == 5


async def test_recording_never_blocks_and_counts_drops() -> None:
    metrics = Metrics()
    recorder = EventRecorder("node-a", capacity=2, metrics=metrics)
    # Nothing is posting (the API is away). record() is synchronous, so it cannot wait by construction: a full
    # queue means a drop, counted.
    results = [recorder.config_rejected("c", f"error {n}") for n in range(5)]
    assert results == [True, True, False, False, False]
    assert recorder.dropped == 3
    assert scrape(metrics).value("nvdp_events_total", reason="ConfigRejected", result="dropped") == 3


async def test_failures_and_hangs_are_counted_and_do_not_stop_the_task(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = EventRecorder("node-a", post_timeout_s=5)
    failing = FakePoster(fail=RuntimeError("403 Forbidden"))
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.serve, failing)
        recorder.config_label_unknown("nope")
        recorder.config_applied("default", 2)
        await settle()
        nursery.cancel_scope.cancel()
    assert recorder.failed == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "403 Forbidden" in warnings[0].getMessage()  # once per outage

    hanging = FakePoster(hang=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.serve, hanging)
        recorder.config_applied("x", 3)
        recorder.config_applied("y", 4)
        await trio.sleep(11)
        nursery.cancel_scope.cancel()
    assert recorder.failed == 4  # each post gave up after 5 s; the second was not stuck behind the first


def test_unknown_reasons_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown Event reason"):
        EventRecorder("n").record("Whatever", "x")


def test_long_messages_are_truncated() -> None:
    body = EventRecorder("n").body(events.CONFIG_REJECTED, "x" * 5000, 1, 0.0, 0.0)
    assert len(body["message"]) == events.MAX_MESSAGE
