"""The fault-injection suite's shared parts: the leak checker every scenario runs under, and the daemon in-process
with the checks that follow every fault ("nothing leaked, still answering").

Leaks are checked at three levels:

- the trio tasks of the daemon: `daemon()` compares the run's task tree before the daemon starts and after it ends
  (a task that outlived its nursery would still be in the tree);
- threads, file descriptors and child processes of this process: the autouse `no_leaks` fixture snapshots them
  before the test (before the kubelet emulator and the fake API server exist: fixtures it requests come first) and
  compares after everything is torn down, allowing a short settle for threads that are already ending;
- processes started as `python -m nvdp`: their own children (MPS control daemons) are checked by pid.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import tempfile
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
from nvdp.testing.kubelet_emulator import (
    KubeletEmulator,
)
from tests.helpers import wait_for

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"
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


def settle(check: Callable[[], bool], limit_s: float = SETTLE_S) -> bool:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="session", autouse=True)
def _grpc_warmed_up() -> None:
    """grpcio opens process-wide descriptors (its event engine) on first use and keeps them: open them once before
    any snapshot, so that the first test does not report them as its leak."""
    with tempfile.TemporaryDirectory(prefix="nvdp-w-") as tmp, KubeletEmulator(Path(tmp) / "dp") as kubelet:
        channel = grpc.insecure_channel(f"unix:{kubelet.socket}")
        grpc.channel_ready_future(channel).result(timeout=5)
        channel.close()


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "plugin_connection_leak: tolerate the reported plugin-server connection leak")


def unix_socket_paths() -> dict[str, str]:
    """"socket:[inode]" -> bound path, from /proc/net/unix (an accepted connection shows its listener's path)."""
    paths = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            paths[f"socket:[{fields[6]}]"] = fields[7]
    return paths


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    before = Snapshot.take()
    yield
    known_bug = request.node.get_closest_marker("plugin_connection_leak") is not None
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


# -------------------------------------------------------------------------------------------- the daemon in-process


#: Tasks the fake API server starts for itself (its proxy comes back with new tasks after `offline()`).
_NOT_THE_DAEMONS = ("tests.fake_apiserver.", "trio._highlevel_serve_listeners.", "hypercorn.")


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
async def daemon(settings: Settings, limit_s: float = 10.0, **kwargs: Any) -> AsyncIterator[ResourceServers | None]:
    """The daemon in-process until the block ends; yields once every resource is registered (None when NVML is
    unavailable and failOnInitError is false). On the way out: it must stop within `limit_s` and leave no task
    (the fake API server's tasks for the daemon's connections may take a moment to see them closed)."""
    before = task_tree()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(limit_s):
            servers = await nursery.start(partial(_run, settings, kwargs))
        yield servers
        nursery.cancel_scope.cancel()
    left: dict[int, str] = {}
    with trio.move_on_after(SETTLE_S):
        while left := {k: v for k, v in task_tree().items()  # noqa: ASYNC110 (nothing to wait on)
                       if k not in before and not v.startswith(_NOT_THE_DAEMONS)}:
            await trio.sleep(0.02)
    assert not left, f"task(s) outlived the daemon: {sorted(left.values())}"


async def _run(settings: Settings, kwargs: dict[str, Any], *, task_status: trio.TaskStatus[Any]) -> None:
    kwargs.setdefault("handle_signals", False)
    code = await run_daemon(settings, task_status=task_status, **kwargs)
    assert code == 0


def visible(kubelet: KubeletEmulator, resource: str = "nvidia.com/gpu") -> dict[str, str]:
    return kubelet.devices(resource)


async def answers(kubelet: KubeletEmulator, resource: str, device: str, limit_s: float = 5.0,
                  visible_as: str | None = None) -> None:
    """The daemon is still answering: an Allocate for `device` through the kubelet's current connection works.
    Retried within `limit_s`: right after a fault the kubelet may still be re-registering."""
    deadline = trio.current_time() + limit_s
    while True:
        try:
            response = await trio.to_thread.run_sync(kubelet.allocate, resource, [device], 2.0)
        except (grpc.RpcError, LookupError):
            if trio.current_time() > deadline:
                raise
            await trio.sleep(0.05)
            continue
        (container,) = response.container_responses
        assert (visible_as or device) in container.envs.get("NVIDIA_VISIBLE_DEVICES", ""), container.envs
        return


async def until(kubelet: KubeletEmulator, predicate: Callable[[KubeletEmulator], bool], limit_s: float = 5.0,
                what: str = "") -> None:
    assert await wait_for(kubelet, predicate, limit_s), (
        f"not within {limit_s} s: {what or predicate}: {describe(kubelet)}")


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


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths (MPS pipes, plugin sockets) must stay under 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="nvdp-f-") as tmp:
        yield Path(tmp)


@pytest.fixture
def kubelet() -> Iterator[KubeletEmulator]:
    with tempfile.TemporaryDirectory(prefix="nvdp-t-") as short, \
            KubeletEmulator(Path(short) / "device-plugins") as emulator:
        yield emulator
