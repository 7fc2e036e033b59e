"""The supervisor: the pure decisions (reconcile, backoff, flapping) and the trio shell on trio's MockClock."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from nvdp.core.supervision import Actions, Backoff, RestartWindow, reconcile
from nvdp.supervise import ChildFailed, Supervisor

# --- pure ---------------------------------------------------------------------------------------------------------


def test_reconcile_stops_changed_and_removed_starts_new_and_changed_keeps_the_rest() -> None:
    running = {"a": 1, "b": 2, "c": 3}
    wanted = {"a": 1, "b": 20, "d": 4}
    assert reconcile(wanted, running) == Actions(stop=("b", "c"), start=("b", "d"), keep=("a",))


def test_reconcile_of_equal_sets_changes_nothing() -> None:
    actions = reconcile({"a": 1}, {"a": 1})
    assert actions == Actions(stop=(), start=(), keep=("a",))
    assert not actions.changes


def test_backoff_doubles_up_to_the_cap_and_jitter_spreads_both_ways() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0, factor=2.0, jitter=0.2)
    assert [backoff.delay(n, 0.5) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(1, 0.0) == pytest.approx(0.4)
    assert backoff.delay(1, 0.999999) == pytest.approx(0.6, abs=1e-6)
    # No overflow after a very long crash loop.
    assert backoff.delay(10_000, 0.5) == 4.0


def test_backoff_resets_after_a_long_run() -> None:
    backoff = Backoff(reset_after_s=60.0)
    assert backoff.failures_after(5, ran_s=1.0) == 6
    assert backoff.failures_after(5, ran_s=60.0) == 1


@pytest.mark.parametrize("bad", [dict(first_s=0), dict(first_s=5, max_s=1), dict(jitter=1.0), dict(factor=0.5)])
def test_backoff_refuses_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**bad)


def test_restart_window_reports_flapping_once_per_window() -> None:
    window = RestartWindow(threshold=3, window_s=100.0)
    assert [window.record(t) for t in (0, 10, 20, 30, 40)] == [False, False, True, False, False]
    # Old restarts slide out; once the window has passed since the report, flapping is reported again.
    assert window.record(125.0) is True
    assert window.recent == 3
    # Restarts far apart are never flapping.
    sparse = RestartWindow(threshold=3, window_s=100.0)
    assert not any(sparse.record(t) for t in (0, 200, 400, 600))


# --- the shell ----------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def child_up(self, child: str) -> None:
        self.events.append(("up", child))

    def child_down(self, child: str, reason: str) -> None:
        self.events.append(("down", child, reason))

    def child_restarting(self, child: str, reason: str, delay_s: float, flapping: bool) -> None:
        self.events.append(("restarting", child, f"{delay_s:g}", str(flapping)))


class Script:
    """Children whose behaviour the test scripts: a list of outcomes per key, consumed one per run."""

    def __init__(self, outcomes: dict[str, list[BaseException | None]]) -> None:
        self.outcomes = outcomes
        self.runs: dict[str, int] = {}
        self.cancelled: list[str] = []

    async def run(self, key: str, spec: int, *, task_status: trio.TaskStatus[None]) -> None:
        self.runs[key] = self.runs.get(key, 0) + 1
        plan = self.outcomes.get(key, [])
        outcome = plan.pop(0) if plan else None
        if outcome is not None and isinstance(outcome, ChildFailed):
            raise outcome  # before started(): a failed start
        task_status.started()
        try:
            if outcome is not None:
                await trio.sleep(1)
                raise outcome
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.append(key)
            raise


def no_jitter() -> float:
    return 0.5


async def test_an_unexpected_exception_restarts_that_child_only(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    script = Script({"a": [KeyError("boom"), None]})
    reporter = Recorder()
    async with trio.open_nursery() as nursery:
        sup: Supervisor[str, int] = Supervisor(nursery, script.run, reporter=reporter, rand=no_jitter,
                                               backoff=Backoff(first_s=0.5, max_s=8))
        await sup.apply({"a": 1, "b": 2})
        assert sup.children["a"].up and sup.children["b"].up
        # a fails after 1 s and comes back after its 0.5 s backoff; b is never touched.
        await sup.children["a"].wait_down()
        await sup.children["a"].wait_up()
        assert sup.children["a"].restarts == 1
        assert sup.children["a"].last_error == "KeyError: 'boom'"
        assert script.runs == {"a": 2, "b": 1}
        assert script.cancelled == []
        nursery.cancel_scope.cancel()
    assert ("down", "a", "KeyError: 'boom'") in reporter.events
    assert ("restarting", "a", "0.5", "False") in reporter.events
    assert not any(e[1] == "b" and e[0] != "up" for e in reporter.events)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None, "one log line with the traceback per restart"


async def test_a_failed_first_start_does_not_hold_up_the_others_and_backs_off(
        autojump_clock: trio.testing.MockClock) -> None:
    script = Script({"a": [ChildFailed("no socket")] * 3})
    reporter = Recorder()
    async with trio.open_nursery() as nursery:
        sup: Supervisor[str, int] = Supervisor(nursery, script.run, reporter=reporter, rand=no_jitter,
                                               backoff=Backoff(first_s=1, max_s=3))
        began = trio.current_time()
        await sup.apply({"a": 1, "b": 2})
        # apply() came back at once, with a down and b up.
        assert trio.current_time() == began
        assert not sup.children["a"].up and sup.children["b"].up
        await sup.children["a"].wait_up()
        # Three failed starts waited 1 + 2 + 3 (capped) seconds.
        assert trio.current_time() - began == pytest.approx(6.0)
        assert sup.children["a"].restarts == 3
        nursery.cancel_scope.cancel()
    delays = [e[2] for e in reporter.events if e[0] == "restarting"]
    assert delays == ["1", "2", "3"]
    assert [e[3] for e in reporter.events if e[0] == "restarting"] == ["False", "False", "True"]


async def test_apply_reconciles_and_keeps_unchanged_children_running(autojump_clock: trio.testing.MockClock) -> None:
    script = Script({})
    async with trio.open_nursery() as nursery:
        sup: Supervisor[str, int] = Supervisor(nursery, script.run)
        await sup.apply({"a": 1, "b": 2, "c": 3})
        b = sup.children["b"]
        await sup.apply({"a": 10, "b": 2, "d": 4})
        assert sup.specs == {"a": 10, "b": 2, "d": 4}
        assert sup.children["b"] is b and script.runs["b"] == 1
        assert sorted(script.cancelled) == ["a", "c"]
        await sup.restart("b")
        assert script.runs["b"] == 2 and sup.children["b"].restarts == 0, "a deliberate restart is no failure"
        await sup.stop_all()
        assert sup.children == {}
        assert sorted(script.cancelled) == ["a", "a", "b", "b", "c", "d"]
        nursery.cancel_scope.cancel()


async def test_an_exception_group_from_a_childs_nursery_is_handled_like_any_failure(
        autojump_clock: trio.testing.MockClock) -> None:
    runs = 0

    async def child(key: str, spec: int, *, task_status: trio.TaskStatus[None]) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        if runs == 1:
            async with trio.open_nursery() as inner:
                inner.start_soon(trio.sleep_forever)
                raise AttributeError("'Connection' object has no attribute '_transport'")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        sup: Supervisor[str, int] = Supervisor(nursery, child, rand=no_jitter)
        await sup.start("grpc", 1)
        await sup.children["grpc"].wait_down()
        await sup.children["grpc"].wait_up()
        assert runs == 2
        assert "AttributeError" in sup.children["grpc"].last_error
        nursery.cancel_scope.cancel()


async def test_cancellation_is_never_taken_for_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    script = Script({})
    reporter = Recorder()
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            sup: Supervisor[str, int] = Supervisor(nursery, script.run, reporter=reporter)
            await sup.start("a", 1)
    assert script.cancelled == ["a"]
    assert [e[0] for e in reporter.events] == ["up"]


async def test_a_start_up_failure_can_be_the_callers_error(autojump_clock: trio.testing.MockClock) -> None:
    """first_failure_raises: what fails before started() on the first attempt is the caller's start-up error; the
    same child failing later is restarted like any other."""
    attempts = 0

    async def port_taken(key: str, spec: int, *, task_status: trio.TaskStatus[None]) -> None:
        raise OSError(98, "Address already in use")

    async def fails_later(key: str, spec: int, *, task_status: trio.TaskStatus[None]) -> None:
        nonlocal attempts
        attempts += 1
        task_status.started()
        if attempts == 1:
            async with trio.open_nursery():
                raise ChildFailed("lost its socket")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        sup: Supervisor[str, int] = Supervisor(nursery, port_taken)
        with pytest.raises(OSError, match="already in use"):
            await sup.start("http", 1, first_failure_raises=True)
        assert sup.children == {}
        later: Supervisor[str, int] = Supervisor(nursery, fails_later, rand=no_jitter)
        await later.start("watch", 1, first_failure_raises=True)
        await later.children["watch"].wait_down()
        await later.children["watch"].wait_up()
        assert attempts == 2
        assert later.children["watch"].last_error == "lost its socket"
        nursery.cancel_scope.cancel()
