"""The one daemon test harness: the daemon in-process with a start bound and a task-leak check, the process-level
leak checker every daemon test runs under, and the ways a test waits for something observable.

Leaks are checked at three levels:

- the trio tasks of the daemon: `daemon()` compares the run's task tree before the daemon starts and after it ends
  (a task that outlived its nursery would still be in the tree);
- threads, file descriptors and child processes of this process: the `no_leaks` fixture (tests/conftest.py; every
  test that uses the `kubelet` fixture, and every fault test) snapshots them before the test (before the kubelet
  emulator and the fake API server exist) and compares after everything is torn down, allowing a short settle for
  threads that are already ending;
- processes started as `python -m nvdp`: their own children (MPS control daemons) are checked by pid.

Waiting: never sleep and hope. `until` waits for the kubelet emulator's state (woken by every change), `LogWatch`
for a log record, `eventually` polls a condition that has nothing to wait on (a file, a metric). `LIMIT_S` is the
only timeout, generous so that a loaded machine cannot fail a test; it only costs time when the test fails anyway.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from nvdp.core.config.settings import Settings
from nvdp.daemon import run_daemon
from nvdp.kubelet.servers import ResourceServers
from nvdp.testing.kubelet_emulator import KubeletEmulator

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"
#: The bound of every wait for something that should happen (it happens in milliseconds on an idle machine).
LIMIT_S = 20.0
#: Every bounded wait for something leaked to go away.
SETTLE_S = 3.0
# trio's thread cache keeps idle workers for 10 s under this name; a worker busy with a job carries the job's name
# instead, so a stuck `to_thread.run_sync` is still caught.
_IDLE_TRIO_WORKER = re.compile(r"^Trio thread \d+$")
#: grpcio's threads (the kubelet emulator's): its server's worker pool, which outlives `grpc.Server.stop()` until
#: collected, and a channel's spin thread (`Thread-N (_run)`), which lives while a call it started is unwinding.
#: nvdp makes no such threads: its own are the asyncio loop ("nvdp-grpc") and trio's workers.
_EMULATOR_WORKER = re.compile(r"^kubelet-emulator_\d+$|^Thread-\d+ \(_run\)$")
#: grpcio's polling descriptors (an epoll set and an eventfd per completion queue) live as long as its channels,
#: which an emulator's handler thread may hold for up to its 10 s dial timeout after the test. nvdp's own epoll
#: sets belong to its asyncio loop and trio's run, both covered by the thread check and the run's end.
_GRPC_FDS = ("anon_inode:[eventpoll]", "anon_inode:[eventfd]")


# -------------------------------------------------------------------------------------------------- leak checker


@dataclass(frozen=True)
class Snapshot:
    threads: dict[int, str]
    fds: dict[int, str]
    children: dict[int, str]

    @classmethod
    def take(cls) -> Snapshot:
        threads = {t.ident: t.name for t in threading.enumerate()
                   if t.ident is not None and not _IDLE_TRIO_WORKER.match(t.name)
                   and not _EMULATOR_WORKER.match(t.name)}
        fds = {fd: target for fd, target in open_fds().items() if target not in _GRPC_FDS}
        return cls(threads, fds, children_of(os.getpid()))

    def new_since(self, before: Snapshot) -> dict[str, dict[int, str]]:
        """What exists now and did not before (an fd number reused for another file counts as new)."""
        return {
            "threads": {k: v for k, v in self.threads.items() if k not in before.threads},
            "fds": {k: v for k, v in self.fds.items() if before.fds.get(k) != v},
            "children": {k: v for k, v in self.children.items() if k not in before.children},
        }


def open_fds(pid: int | str = "self") -> dict[int, str]:
    fds = {}
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            fds[int(name)] = os.readlink(f"{directory}/{name}")
    return fds


def children_of(pid: int) -> dict[int, str]:
    """pid -> "comm state" for every process whose parent is `pid` (zombies included: unreaped is a leak too)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm is in parentheses and may contain spaces: split after the last ')'.
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid:
            found[int(entry)] = f"{comm} {state}"
    return found


def process_gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie left to a parent that does not reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def settle(check: Callable[[], bool], limit_s: float = SETTLE_S, poll_s: float = 0.02) -> bool:
    """For synchronous code (fixtures, threads): poll `check` until it holds, for at most `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


#: Reported bug (docs/faults.md finding 1): server-side plugin connections left open during kubelet restarts. One
#: path is fixed (test_known_bugs.py::test_stop_server_closes_a_connection_accepted_while_stopping); the 50-restart
#: scenario still finds others. A test marked `plugin_connection_leak` tolerates exactly that (an unclosed
#: server-side socket on an `nvidia-*.sock` path); remove the marker once the scenario passes without it.
PLUGIN_SOCKET = re.compile(r"/nvidia-[^/]+\.sock$")


def plugin_connection_leak(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a test that may hit the reported leak: tolerated by `no_leaks`, and its ResourceWarnings (when the
    collector closes such a connection during the test) are not errors."""
    for mark in (
        pytest.mark.plugin_connection_leak,
        pytest.mark.filterwarnings("ignore:unclosed transport <_SelectorSocketTransport:ResourceWarning"),
        pytest.mark.filterwarnings(r"ignore:unclosed <socket\.socket [^>]*/nvidia-[^/>]*\.sock>:ResourceWarning"),
    ):
        test = mark(test)
    return test


def unix_socket_paths() -> dict[str, str]:
    """"socket:[inode]" -> bound path, from /proc/net/unix (an accepted connection shows its listener's path)."""
    paths = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            paths[f"socket:[{fields[6]}]"] = fields[7]
    return paths


def check_no_leaks(before: Snapshot, known_bug: bool) -> None:
    """Asserts that nothing exists now that did not at `before` (after a settle), and that the collector closed
    nothing on its owner's behalf. With `known_bug`, the reported plugin connection leak is tolerated."""
    leaked: dict[str, dict[int, str]] = {}
    unclosed: list[str] = []
    tolerated: list[str] = []

    def clean() -> bool:
        nonlocal leaked
        # Collect first: grpcio's servers and channels (the emulator's) release their descriptors when collected.
        # Whatever the collector has to close itself is a leak too: it says so with a ResourceWarning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            gc.collect()
        for warning in caught:
            text = str(warning.message)
            if known_bug and (PLUGIN_SOCKET.search(text.rstrip(">")) or text.startswith("unclosed transport")):
                tolerated.append(text)
            else:
                unclosed.append(text)
        leaked = Snapshot.take().new_since(before)
        if known_bug:
            paths = unix_socket_paths()
            for fd, target in list(leaked["fds"].items()):
                if PLUGIN_SOCKET.search(paths.get(target, "")):
                    tolerated.append(f"fd {fd} on {paths[target]}")
                    del leaked["fds"][fd]
        return not any(leaked.values())

    assert settle(clean), f"leaked after the scenario: {leaked}"
    assert not unclosed, f"closed by the garbage collector, not by their owner: {unclosed}"
    if tolerated:
        print(f"tolerated (reported bug, plugin_connection_leak): {tolerated}")


@contextlib.contextmanager
def leak_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    before = Snapshot.take()
    yield
    check_no_leaks(before, request.node.get_closest_marker("plugin_connection_leak") is not None)


# -------------------------------------------------------------------------------------------- the daemon in-process


#: Tasks the fake API server starts for itself (its proxy comes back with new tasks after `offline()`).
_NOT_THE_DAEMONS = ("nvdp.testing.fake_apiserver.", "trio._highlevel_serve_listeners.", "hypercorn.")


def task_tree() -> dict[int, str]:
    """id -> name of every task in this trio run."""
    seen: dict[int, str] = {}
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        seen[id(task)] = task.name
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return seen


@contextlib.asynccontextmanager
async def daemon(settings: Settings, limit_s: float = LIMIT_S, **kwargs: Any) -> AsyncIterator[ResourceServers | None]:
    """The daemon in-process until the block ends; yields once every resource is registered (None when NVML is
    unavailable and failOnInitError is false). Keyword arguments go to `run_daemon` (`handle_signals` defaults to
    False). It must start within `limit_s`, end with exit code 0, and leave no task behind (the fake API server's
    tasks for the daemon's connections may take a moment to see them closed)."""
    before = task_tree()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(limit_s):
            servers = await nursery.start(partial(_run, settings, kwargs))
        yield servers
        nursery.cancel_scope.cancel()
    left: dict[int, str] = {}

    def daemons_tasks_gone() -> bool:
        nonlocal left
        left = {k: v for k, v in task_tree().items() if k not in before and not v.startswith(_NOT_THE_DAEMONS)}
        return not left

    with trio.move_on_after(SETTLE_S):
        await eventually(daemons_tasks_gone, "the daemon's tasks gone")
    assert not left, f"task(s) outlived the daemon: {sorted(left.values())}"


async def _run(settings: Settings, kwargs: dict[str, Any], *, task_status: trio.TaskStatus[Any]) -> None:
    kwargs.setdefault("handle_signals", False)
    code = await run_daemon(settings, task_status=task_status, **kwargs)
    assert code == 0


# ------------------------------------------------------------------------------------------------------- waiting


async def eventually(check: Callable[[], bool], what: str | Callable[[], object] = "", limit_s: float = LIMIT_S,
                     poll_s: float = 0.01) -> None:
    """Waits until `check()` holds, for a condition with nothing to wait on (a file another thread writes, a
    metric, a task tree). Polled on trio's clock; `limit_s` is the only bound. `what` (or what it returns, when
    called at the failure) goes into the failure message."""
    try:
        with trio.fail_after(limit_s):
            while not check():  # noqa: ASYNC110 (the point: a condition with no event to wait on)
                await trio.sleep(poll_s)
    except trio.TooSlowError:
        raise AssertionError(f"not within {limit_s} s: {(what() if callable(what) else what) or check}") from None


async def wait_for(kubelet: KubeletEmulator, predicate: Callable[[KubeletEmulator], bool],
                   limit_s: float = LIMIT_S) -> bool:
    """Waits (in a thread, woken by every change of the emulator's state) until `predicate` holds; False if it did
    not within `limit_s`."""
    return await trio.to_thread.run_sync(kubelet.wait_for, predicate, limit_s)


async def until(kubelet: KubeletEmulator, predicate: Callable[[KubeletEmulator], bool], limit_s: float = LIMIT_S,
                what: str = "") -> None:
    """Like `wait_for`, but a failure is an assertion that says what the kubelet knows. The bound is at least
    LIMIT_S whatever the caller asks: it is a timeout for something that must happen, never a speed claim (a
    shorter one only makes the test fail on a loaded machine; speed is bench/'s business)."""
    limit_s = max(limit_s, LIMIT_S)
    assert await wait_for(kubelet, predicate, limit_s), (
        f"not within {limit_s} s: {what or predicate}: {describe(kubelet)}")


def visible(kubelet: KubeletEmulator, resource: str = "nvidia.com/gpu") -> dict[str, str]:
    return kubelet.devices(resource)


async def answers(kubelet: KubeletEmulator, resource: str, device: str, limit_s: float = LIMIT_S,
                  visible_as: str | None = None) -> None:
    """The daemon is still answering: an Allocate for `device` through the kubelet's current connection works.
    Retried within `limit_s` (at least LIMIT_S, as for `until`): right after a fault the kubelet may still be
    re-registering."""
    deadline = trio.current_time() + max(limit_s, LIMIT_S)
    while True:
        try:
            response = await trio.to_thread.run_sync(kubelet.allocate, resource, [device], 5.0)
        except (grpc.RpcError, LookupError):
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.05)
            continue
        (container,) = response.container_responses
        assert (visible_as or device) in container.envs.get("NVIDIA_VISIBLE_DEVICES", ""), container.envs
        return


def describe(kubelet: KubeletEmulator) -> str:
    """What the kubelet knows, for failure messages."""
    lines = [repr(kubelet)]
    for resource in kubelet.resources():
        endpoint = kubelet.endpoint(resource)
        if endpoint is not None:
            lines.append(f"{resource}: {endpoint.devices} updates={endpoint.updates} "
                         f"stream_ended={endpoint.stream_ended}")
    fresh = [(r.resource, round(r.at - kubelet.started_at, 3)) for r in kubelet.registrations[-6:]]
    lines.append(f"last registrations (s after the current kubelet start): {fresh}")
    return "\n".join(lines)


class LogWatch(logging.Handler):
    """Every record of the `nvdp` loggers (DEBUG and up) while installed, and a way to wait for one: the positive
    witness that the daemon got somewhere (it decided, retried, rejected). Records from other threads wake waiters
    through the trio token."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._token = token
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def matching(self, pattern: str, after: int = 0) -> list[logging.LogRecord]:
        """Records from index `after` on whose message matches `pattern` (a regular expression, searched)."""
        return [r for r in self.records[after:] if re.search(pattern, r.getMessage())]

    async def wait(self, pattern: str, after: int = 0, count: int = 1,
                   limit_s: float = LIMIT_S) -> list[logging.LogRecord]:
        """Waits until `count` records from index `after` on match `pattern`; returns them."""
        try:
            with trio.fail_after(limit_s):
                while len(found := self.matching(pattern, after)) < count:
                    await self._changed.wait()
        except trio.TooSlowError:
            raise AssertionError(f"no {count} log record(s) matching {pattern!r} within {limit_s} s; "
                                 f"seen: {self.messages()[after:][-20:]}") from None
        return found

    @contextlib.contextmanager
    def installed(self, logger_name: str = "nvdp") -> Iterator[LogWatch]:
        logger = logging.getLogger(logger_name)
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
