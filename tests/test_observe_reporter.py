"""nvdp.observe.reporter: what a supervisor's reports become — the restart counter, /readyz naming the children that
are down (never /healthz), and one ChildRestarting Event when a child keeps failing, driven by a real Supervisor on
trio's MockClock."""

from __future__ import annotations

import trio
import trio.testing

from nvdp.core.supervision import Backoff, RestartWindow
from nvdp.observe.events import EventRecorder
from nvdp.observe.http import ProbeState
from nvdp.observe.metrics import Metrics
from nvdp.observe.reporter import Observer
from nvdp.supervise import ChildFailed, Supervisor
from tests.observe_fixtures import scrape
from tests.test_observe_events import FakePoster


async def test_a_failing_child_is_counted_named_on_readyz_and_becomes_one_event_when_it_flaps(
        autojump_clock: trio.testing.MockClock) -> None:
    metrics, probes = Metrics(), ProbeState()
    probes.set_pending([])
    recorder = EventRecorder("node-a", wall_clock=lambda: 1_700_000_000.0, metrics=metrics)
    observer = Observer(metrics, probes, recorder)
    poster = FakePoster()
    fail = {"times": 0}
    readiness_while_down: list[tuple[bool, str]] = []

    async def child(key: str, spec: int, *, task_status: trio.TaskStatus[None]) -> None:
        if fail["times"]:
            fail["times"] -= 1
            readiness_while_down.append(probes.readiness())
            raise ChildFailed("socket vanished")
        task_status.started()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.serve, poster)
        sup: Supervisor[str, int] = Supervisor(
            nursery, child, name=lambda key: f"server {key}", reporter=observer, rand=lambda: 0.5,
            backoff=Backoff(first_s=1, max_s=1), restart_window=lambda: RestartWindow(threshold=3, window_s=60))
        fail["times"] = 4
        await sup.start("nvidia.com/gpu", 1)
        # Down: /readyz says which child and why; /healthz stays OK so the pod is not killed for it.
        assert probes.readiness() == (False, "restarting after a failure: server nvidia.com/gpu (socket vanished)")
        assert probes.health() == (True, "ok")
        await sup.children["nvidia.com/gpu"].wait_up()
        assert probes.readiness() == (True, "ok")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    samples = scrape(metrics)
    assert samples.value("nvdp_child_restarts_total", child="server nvidia.com/gpu") == 4
    assert samples.value("nvdp_child_up", child="server nvidia.com/gpu") == 1
    # Four restarts within the window: flapping was reported once (at the third), not once per restart.
    restarting = [body for _, body in poster.posts if body["reason"] == "ChildRestarting"]
    assert len(restarting) == 1
    assert restarting[0]["type"] == "Warning"
    assert "server nvidia.com/gpu keeps failing" in restarting[0]["message"]
    assert "socket vanished" in restarting[0]["message"]
    assert len(readiness_while_down) == 4


async def test_a_child_stopped_on_purpose_leaves_no_trace(autojump_clock: trio.testing.MockClock) -> None:
    metrics, probes = Metrics(), ProbeState()
    observer = Observer(metrics, probes)

    async def child(key: str, spec: int, *, task_status: trio.TaskStatus[None]) -> None:
        raise ChildFailed("never starts")

    async with trio.open_nursery() as nursery:
        sup: Supervisor[str, int] = Supervisor(nursery, child, reporter=observer)
        await sup.start("mps GPU-1", 1)
        assert "mps GPU-1" in probes.down
        await sup.stop("mps GPU-1")
        nursery.cancel_scope.cancel()
    assert probes.down == {}
    assert scrape(metrics).get("nvdp_child_up") == []
