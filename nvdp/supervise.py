"""One supervisor for every long-lived child of nvdp: one child fails, one child restarts.

A `Supervisor` owns a set of children, each keyed (a resource name, a GPU UUID, a task name) and described by a
spec. `apply(wanted)` reconciles them with `nvdp.core.supervision.reconcile`: children whose spec changed or that
are no longer wanted are stopped first, new ones started second, unchanged ones left alone.

A child is `run(key, spec, task_status=...)`, a coroutine meant to run until cancelled. When it returns or raises,
the supervisor reports it down, waits a capped exponential backoff with jitter, and runs it again: the failure never
leaves the child's own task. `ChildFailed` is the expected way to ask for a restart (an MPS daemon that exited) and
is logged as a warning; any other exception is a bug or an unexpected foreign error and is logged once with its
traceback. Each restart is counted, and a child that keeps restarting is reported as flapping (a Node Event).

Only cancellation ends a child for good: `stop()`, `apply()` without it, or the nursery's end. Start-up errors that
must end the process are the caller's business: they are raised before a supervisor exists.

Starting waits until the child calls `task_status.started()` or fails its first attempt, so one broken child never
holds up the others (it keeps retrying in the background, and is reported down meanwhile).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import trio

from nvdp.core.supervision import Backoff, RestartWindow, reconcile

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")

#: Restart delays: 0.5 s doubling to 30 s (upstream retries its registration every 30 s), ±20 %.
DEFAULT_BACKOFF = Backoff()


class ChildFailed(Exception):
    """A child's expected failure, with a reason for the log: restarted after the backoff, no traceback logged."""


class SupervisionReporter(Protocol):
    """What supervisors tell the rest of nvdp (metrics, /readyz, Node Events: `nvdp.observe`)."""

    def child_up(self, child: str) -> None: ...

    def child_down(self, child: str, reason: str) -> None: ...

    def child_restarting(self, child: str, reason: str, delay_s: float, flapping: bool) -> None: ...

    def child_stopped(self, child: str) -> None: ...


class _Unreported:
    def child_up(self, child: str) -> None:
        pass

    def child_down(self, child: str, reason: str) -> None:
        pass

    def child_restarting(self, child: str, reason: str, delay_s: float, flapping: bool) -> None:
        pass

    def child_stopped(self, child: str) -> None:
        pass


ChildRun = Callable[..., Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Task:
    """A child that is one coroutine function and its arguments (a loop, a watch, an endpoint). Equal tasks are the
    same child, so a reconcile keeps it running; new arguments restart it."""

    fn: Callable[..., Awaitable[object]]
    args: tuple[object, ...] = ()


async def run_task(key: str, task: Task, *, task_status: trio.TaskStatus[None]) -> None:
    """The `run` of a `Supervisor[str, Task]`."""
    await task.fn(*task.args, task_status=task_status)


@dataclass(eq=False)
class Child(Generic[K, S]):
    """One supervised child, as its supervisor sees it."""

    key: K
    spec: S
    name: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)
    #: Set once the child called `task_status.started()` in its current run; cleared when the run ends.
    up: bool = False
    #: Runs that ended and were followed by a new one (not counting deliberate restarts).
    restarts: int = 0
    last_error: str = ""
    _changed: trio.Event = field(default_factory=trio.Event)

    def _set_up(self, up: bool) -> None:
        self.up = up
        self._changed.set()
        self._changed = trio.Event()

    async def wait_up(self) -> None:
        """Until the child runs and has called `task_status.started()` (at once if it has)."""
        while not self.up:
            await self._changed.wait()

    async def wait_down(self) -> None:
        while self.up:
            await self._changed.wait()

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<Child {self.name} {state} restarts={self.restarts}>"


class _ChildStatus:
    """The `task_status` a child sees: started() marks it up and, the first time, lets `start()` return."""

    def __init__(self, on_started: Callable[[], None]) -> None:
        self._on_started = on_started
        self._done = False

    def started(self, value: object = None) -> None:
        if self._done:
            raise RuntimeError("started() called twice")
        self._done = True
        self._on_started()


class Supervisor(Generic[K, S]):
    """Owns children in `nursery`; only one task (the controller, or the code that created it) calls the async
    methods, so reconciles never interleave."""

    def __init__(
        self,
        nursery: trio.Nursery,
        run: ChildRun,
        *,
        name: Callable[[K], str] = str,
        backoff: Backoff = DEFAULT_BACKOFF,
        reporter: SupervisionReporter | None = None,
        restart_window: Callable[[], RestartWindow] = RestartWindow,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._nursery = nursery
        self._run = run
        self._name = name
        self.backoff = backoff
        self._reporter: SupervisionReporter = reporter or _Unreported()
        self._new_window = restart_window
        self._rand = rand
        self._children: dict[K, Child[K, S]] = {}

    def __repr__(self) -> str:
        return f"<Supervisor {list(self._children.values())!r}>"

    @property
    def children(self) -> Mapping[K, Child[K, S]]:
        return self._children

    @property
    def specs(self) -> dict[K, S]:
        return {key: child.spec for key, child in self._children.items()}

    async def apply(self, wanted: Mapping[K, S]) -> None:
        actions = reconcile(wanted, self.specs)
        await self.stop_many(actions.stop)
        await self.start_many([(key, wanted[key]) for key in actions.start])

    async def start(self, key: K, spec: S, *, first_failure_raises: bool = False) -> Child[K, S]:
        """Start one child; returns once it is up or its first attempt failed.

        With `first_failure_raises`, a first attempt that fails before `task_status.started()` raises its exception
        here instead and the child is not restarted: for children whose failure at start-up is a start-up error of
        the whole process (the metrics port is taken, the config cannot be read).
        """
        if key in self._children:
            raise ValueError(f"{self._name(key)} is already running")
        child: Child[K, S] = Child(key, spec, self._name(key))
        self._children[key] = child
        try:
            await self._nursery.start(self._supervise, child, first_failure_raises)
        except BaseException:
            self._children.pop(key, None)
            raise
        return child

    async def start_many(self, items: Sequence[tuple[K, S]]) -> None:
        """Start several children concurrently: a node of 8 GPUs waits for the slowest, not for the sum."""
        if len(items) == 1:
            await self.start(*items[0])
            return
        async with trio.open_nursery() as starting:
            for key, spec in items:
                starting.start_soon(self.start, key, spec)

    def update_spec(self, key: K, spec: S) -> None:
        """A change the running child takes on its own (a limit sent to it): no restart; its next run, if any, gets
        `spec`, and a later `apply` with `spec` keeps it."""
        self._children[key].spec = spec

    async def stop(self, key: K) -> None:
        child = self._children.pop(key, None)
        if child is None:
            return
        child.scope.cancel()
        await child.stopped.wait()
        self._reporter.child_stopped(child.name)

    async def stop_many(self, keys: Sequence[K]) -> None:
        # Concurrently: each stop may take its full bound (a hung MPS daemon), and they are independent.
        if len(keys) == 1:
            await self.stop(keys[0])
            return
        async with trio.open_nursery() as stopping:
            for key in keys:
                stopping.start_soon(self.stop, key)

    async def stop_all(self) -> None:
        await self.stop_many(list(self._children))

    async def restart(self, key: K) -> None:
        """A deliberate restart (the kubelet came back, a socket was deleted): at once, no backoff, not counted as
        a failure."""
        child = self._children.get(key)
        if child is None:
            return
        await self.stop(key)
        await self.start(key, child.spec)

    async def restart_all(self) -> None:
        specs = self.specs
        await self.stop_many(list(specs))
        await self.start_many(list(specs.items()))

    # ------------------------------------------------------------------------------------------------ the loop

    async def _supervise(
        self, child: Child[K, S], first_failure_raises: bool, *, task_status: trio.TaskStatus[None]
    ) -> None:
        announced = False  # whether start() was let go on
        window = self._new_window()
        failures = 0

        def started() -> None:
            nonlocal announced
            child._set_up(True)
            self._reporter.child_up(child.name)
            if not announced:
                announced = True
                task_status.started()

        try:
            with child.scope:
                while True:
                    began = trio.current_time()
                    try:
                        await self._run(child.key, child.spec, task_status=_ChildStatus(started))
                        reason = "ended"
                    except BaseException as exc:
                        if first_failure_raises and not announced:
                            raise  # a start-up error: start()'s caller decides
                        reason = self._failure(child, exc)
                    child.last_error = reason
                    child._set_up(False)
                    self._reporter.child_down(child.name, reason)
                    if not announced:
                        # Let the caller go on: this child retries in the background, reported down meanwhile.
                        announced = True
                        task_status.started()
                    failures = self.backoff.failures_after(failures, trio.current_time() - began)
                    delay = self.backoff.delay(failures, self._rand())
                    child.restarts += 1
                    flapping = window.record(trio.current_time())
                    self._reporter.child_restarting(child.name, reason, delay, flapping)
                    log.warning("%s: restarting in %.1f s (restart %d)", child.name, delay, child.restarts)
                    await trio.sleep(delay)
        finally:
            child._set_up(False)
            child.stopped.set()

    @staticmethod
    def _failure(child: Child[K, S], exc: BaseException) -> str:
        """Why a run ended, logged once; cancellation (and the process exiting) passes through untouched."""
        leaf = _single(exc)
        if isinstance(leaf, ChildFailed):
            reason = str(leaf) or "failed"
            log.warning("%s failed: %s", child.name, reason)
            return reason
        failure, rest = _split(exc)
        if rest is not None:
            # Being cancelled: the failure, if any, happened on the way out.
            if failure is not None:
                log.error("%s failed while stopping", child.name, exc_info=failure)
            raise rest from None
        assert failure is not None
        reason = _describe(failure)
        log.error("%s failed unexpectedly: %s", child.name, reason, exc_info=failure)
        return reason


def _split(exc: BaseException) -> tuple[Exception | None, BaseException | None]:
    """(the part a supervisor handles, the part it must let through: Cancelled, KeyboardInterrupt, SystemExit)."""
    if isinstance(exc, BaseExceptionGroup):
        failure, rest = exc.split(Exception)
        return failure, rest
    if isinstance(exc, Exception):
        return exc, None
    return None, exc


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (what a child's nursery wraps a lone error in)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    exc = _single(exc)
    text = str(exc)
    # Foreign errors often say little on their own (`KeyError: 'x'`): the type is part of the reason.
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

