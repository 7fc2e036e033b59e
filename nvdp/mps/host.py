"""`nvdp mps-host`: a small long-lived process that owns the MPS control daemons, and nvdp's client for it.

In Kubernetes the kubelet kills every process of a container that restarts, and systemd every process of a unit's
cgroup. So for MPS clients to outlive an nvdp restart (an upgrade, a crash, an OOM kill), their control daemons run
as children of another process, with another lifetime: this host, in its own DaemonSet (never restarted by a chart
upgrade: `updateStrategy: OnDelete`) or its own systemd unit (`nvdp-mps-host.service`). nvdp keeps every decision
(adopt, start, restart, probe, limits); the host only starts, finds, watches and signals daemons when nvdp asks.

Protocol, on the Unix socket `<mps root>/nvdp-mps-host.sock` (mode 0600, so root only): one connection per request,
one JSON object on one line (at most `MAX_REQUEST` bytes) and one JSON line back, `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`:

    {"op": "start", "gpu": UUID}            start `<control> -f` for that GPU                 -> {"pid": N}
    {"op": "find",  "gpu": UUID}            the running daemon of that GPU (pid file, /proc)  -> {"pid": N | null}
    {"op": "wait",  "gpu": UUID, "pid": N}  answered once that daemon has exited               -> {"exit": "..."}
    {"op": "kill",  "gpu": UUID, "pid": N, "signal": "TERM" | "KILL"}   signal its process group -> {}

The host builds every command line itself: the control program it found at its own start, `-f`, and the GPU's
directories `<mps root>/<UUID>/{pipe,log}`; a request names a GPU by a validated UUID and nothing else (optional
`pipe_dir` and `log_dir` must equal what the host computed: a check that nvdp and the host agree on the MPS root).
It signals only a pid that is the recorded, verified daemon of that GPU (or its own child).

SIGTERM (or SIGINT) to the host is a removal: every daemon under the MPS root is quit (then SIGTERM, SIGKILL of its
group) and its GPU's compute mode restored. SIGKILL leaves them running; the next host finds them by their pid files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from nvdp.mps.control_daemon import (
    DEFAULT_PATH,
    DEFAULT_TIMINGS,
    ComputeModeControl,
    DaemonTimings,
    stop_mps_daemon,
)
from nvdp.mps.launcher import (
    DaemonPaths,
    LaunchError,
    LocalLauncher,
    daemon_pid,
    make_dirs,
)

log = logging.getLogger(__name__)

SOCKET_NAME = "nvdp-mps-host.sock"
#: The largest request line the host reads; anything longer is refused unread.
MAX_REQUEST = 4096
#: The largest answer line the client reads.
MAX_ANSWER = 65536
#: How long the host waits for a request line once connected.
REQUEST_TIMEOUT_S = 5.0
#: Connections served at once (each `wait` holds one for a daemon's lifetime: at most a few per GPU).
MAX_CONNECTIONS = 256
_UUID = re.compile(r"^GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
_OPS = ("start", "find", "wait", "kill")


class RequestError(Exception):
    """A request the host refuses (the message goes back to the client)."""


class _NoRequest(Exception):
    """The client hung up without sending anything (a liveness probe of the socket)."""


def default_socket(mps_root: str | Path) -> Path:
    return Path(mps_root) / SOCKET_NAME


def paths_for(mps_root: Path, gpu_uuid: str) -> DaemonPaths:
    root = Path(os.path.normpath(mps_root))
    return DaemonPaths(gpu_uuid, str(root / gpu_uuid / "pipe"), str(root / gpu_uuid / "log"))


def parse_request(line: bytes, mps_root: Path) -> tuple[str, DaemonPaths, dict[str, Any]]:
    """Validates one request line: (op, the GPU's paths, the request)."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("not a JSON object") from None
    if not isinstance(request, dict):
        raise RequestError("not a JSON object")
    unknown = set(request) - {"op", "gpu", "pid", "signal", "pipe_dir", "log_dir"}
    if unknown:
        raise RequestError(f"unknown fields: {', '.join(sorted(unknown))}")
    op, gpu = request.get("op"), request.get("gpu")
    if op not in _OPS:
        raise RequestError(f"op must be one of {', '.join(_OPS)}")
    if not isinstance(gpu, str) or not _UUID.match(gpu):
        raise RequestError("gpu must be a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    paths = paths_for(mps_root, gpu)
    for key, mine in (("pipe_dir", paths.pipe_dir), ("log_dir", paths.log_dir)):
        if key in request and request[key] != mine:
            raise RequestError(f"{key} {request[key]!r} is not this host's {mine!r}: nvdp and the MPS host must "
                               f"use the same MPS root (the host's is {mps_root})")
    if op in ("wait", "kill"):
        pid = request.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
            raise RequestError("pid must be a process id")
    if op == "kill" and request.get("signal") not in _SIGNALS:
        raise RequestError(f"signal must be one of {', '.join(_SIGNALS)}")
    return op, paths, request


def running_daemons(mps_root: Path) -> dict[str, int]:
    """GPU UUID -> pid of every verified control daemon recorded under the MPS root."""
    found: dict[str, int] = {}
    try:
        entries = sorted(Path(mps_root).iterdir())
    except OSError:
        return found
    for entry in entries:
        if _UUID.match(entry.name):
            pid = daemon_pid(paths_for(mps_root, entry.name))
            if pid is not None:
                found[entry.name] = pid
    return found


class MpsHost:
    """The host's state: its launcher (daemons are its children, reaped by a task each) and the MPS root."""

    def __init__(self, mps_root: Path, control: Path, path_env: str, nursery: trio.Nursery) -> None:
        self.mps_root = Path(mps_root)
        self.launcher = LocalLauncher(control, path_env, nursery=nursery)

    async def handle(self, op: str, paths: DaemonPaths, request: Mapping[str, Any]) -> dict[str, Any]:
        if op == "find":
            return {"pid": await self.launcher.find(paths)}
        if op == "start":
            running = await self.launcher.find(paths)
            if running is not None:
                raise RequestError(f"a control daemon already runs for {paths.gpu_uuid} (pid {running})")
            try:
                await trio.to_thread.run_sync(make_dirs, paths)
            except OSError as exc:
                raise RequestError(f"cannot create the MPS directories: {exc}") from None
            pid = await self.launcher.start(paths)
            log.info("started the MPS control daemon for %s: pid %d", paths.gpu_uuid, pid)
            return {"pid": pid}
        pid = int(request["pid"])
        if op == "wait":
            return {"exit": await self.launcher.wait(paths, pid)}
        signum = _SIGNALS[request["signal"]]
        if not self.launcher.has_child(pid) and await self.launcher.find(paths) != pid:
            raise RequestError(f"pid {pid} is not the control daemon of {paths.gpu_uuid}")
        log.info("sending SIG%s to the MPS control daemon for %s (pid %d)", request["signal"], paths.gpu_uuid, pid)
        await self.launcher.kill(paths, pid, signum)
        return {}

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    line = await _read_line(stream, MAX_REQUEST)
                op, paths, request = parse_request(line, self.mps_root)
                if op == "wait":
                    answer: dict[str, Any] = {"ok": True, **await self._wait(stream, paths, request)}
                else:
                    answer = {"ok": True, **await self.handle(op, paths, request)}
            except RequestError as exc:
                answer = {"ok": False, "error": str(exc)}
            except LaunchError as exc:
                answer = {"ok": False, "error": str(exc)}
            except trio.TooSlowError:
                answer = {"ok": False, "error": f"no request line within {REQUEST_TIMEOUT_S:.0f} s"}
            except _NoRequest:
                return
            if not answer["ok"]:
                log.warning("MPS host: refused a request: %s", answer["error"])
            # The client may have gone away (a `wait` whose nvdp ended).
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(answer).encode() + b"\n")

    async def _wait(self, stream: trio.SocketStream, paths: DaemonPaths, request: Mapping[str, Any]) -> dict[str, Any]:
        """`wait`, given up when the client hangs up first (an nvdp that ended): no task outlives its client."""
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                result.update(await self.handle("wait", paths, request))
                nursery.cancel_scope.cancel()

            async def hang_up() -> None:
                try:
                    while await stream.receive_some(MAX_REQUEST):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
            nursery.start_soon(hang_up)
        return result

    async def stop_all(self, compute_mode: ComputeModeControl | None, timings: DaemonTimings) -> None:
        """The removal: every daemon under the MPS root, concurrently."""
        daemons = await trio.to_thread.run_sync(running_daemons, self.mps_root)
        if not daemons:
            log.info("MPS host: no control daemon to stop")
        async with trio.open_nursery() as nursery:
            for uuid in daemons:
                nursery.start_soon(self._stop, uuid, compute_mode, timings)

    async def _stop(self, uuid: str, compute_mode: ComputeModeControl | None, timings: DaemonTimings) -> None:
        await stop_mps_daemon(paths_for(self.mps_root, uuid), control=self.launcher.control, launcher=self.launcher,
                              compute_mode=compute_mode, timings=timings, path_env=self.launcher.path_env)


async def _read_line(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    data = b""
    while b"\n" not in data:
        if len(data) > limit:
            raise RequestError(f"request longer than {limit} bytes")
        chunk = await stream.receive_some(limit + 1 - len(data) if len(data) <= limit else 1)
        if not chunk:
            break
        data += chunk
    if not data:
        raise _NoRequest
    line, newline, _ = data.partition(b"\n")
    if len(line) > limit:
        raise RequestError(f"request longer than {limit} bytes")
    if not newline:
        raise RequestError("the request ended without a newline")
    return line


async def listen(socket_path: Path) -> trio.SocketListener:
    """A Unix listening socket at `socket_path`, mode 0600 from the start (bound under umask 0177)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await _remove_stale(socket_path)
        old = os.umask(0o177)
        try:
            await sock.bind(str(socket_path))
        finally:
            os.umask(old)
        os.chmod(socket_path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _remove_stale(socket_path: Path) -> None:
    path = trio.Path(socket_path)
    if not await path.exists() and not await path.is_symlink():
        return
    probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with probe:
        try:
            await probe.connect(str(socket_path))
        except OSError:
            await path.unlink()  # left behind by a host that was killed
            return
    raise LaunchError(f"another MPS host already listens on {socket_path}")


async def serve_mps_host(
    mps_root: Path,
    *,
    control: Path,
    compute_mode: ComputeModeControl | None,
    socket_path: Path | None = None,
    path_env: str = DEFAULT_PATH,
    timings: DaemonTimings = DEFAULT_TIMINGS,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve requests until cancelled; then remove every daemon under the MPS root (shielded, bounded per daemon
    by `timings`) and the socket. `task_status.started(socket path)` once listening."""
    socket_path = socket_path or default_socket(mps_root)
    await trio.Path(mps_root).mkdir(mode=0o755, parents=True, exist_ok=True)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    # First: a second host fails here, before it touches anything.
    listener = await listen(socket_path)
    async with trio.open_nursery() as reapers:
        host = MpsHost(mps_root, control, path_env, reapers)
        found = await trio.to_thread.run_sync(running_daemons, host.mps_root)
        for uuid, pid in found.items():
            log.info("MPS host: found the control daemon for %s (pid %d) running; it is kept", uuid, pid)
        try:
            async with listener, trio.open_nursery() as nursery:
                log.info("MPS host: serving %s for the daemons under %s (control program %s)", socket_path,
                         mps_root, control)
                task_status.started(socket_path)

                async def serve(stream: trio.SocketStream) -> None:
                    async with limiter:
                        await host.serve_connection(stream)

                nursery.start_soon(trio.serve_listeners, serve, [listener])
        finally:
            with trio.CancelScope(shield=True):
                socket_path.unlink(missing_ok=True)
                log.info("MPS host: stopping; removing every MPS control daemon under %s", mps_root)
                await host.stop_all(compute_mode, timings)
        reapers.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------------------- client


class HostLauncher:
    """`Launcher` through `nvdp mps-host`: the daemons are the host's children, so nvdp's SIGTERM leaves them."""

    owns_daemons = False

    def __init__(self, socket_path: Path, timeout_s: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"<HostLauncher {self.socket_path}>"

    def describe(self) -> str:
        return f"started by the MPS host at {self.socket_path}"

    async def _request(self, request: dict[str, Any], *, bounded: bool = True) -> dict[str, Any]:
        try:
            stream = await trio.open_unix_socket(str(self.socket_path))
        except OSError as exc:
            raise LaunchError(f"the MPS host is not reachable at {self.socket_path}: "
                              f"{exc.strerror or exc} (is nvdp mps-host running?)") from None
        async with stream:
            try:
                with trio.fail_after(self.timeout_s if bounded else float("inf")):
                    await stream.send_all(json.dumps(request).encode() + b"\n")
                    line = await _read_line(stream, MAX_ANSWER)
            except trio.TooSlowError:
                raise LaunchError(f"the MPS host did not answer {request['op']} within {self.timeout_s:.0f} s") \
                    from None
            except (RequestError, _NoRequest, trio.BrokenResourceError, OSError) as exc:
                raise LaunchError(f"the MPS host went away during {request['op']} ({exc or 'no answer'})") from None
        try:
            answer = json.loads(line)
        except ValueError:
            raise LaunchError("the MPS host answered something that is not JSON") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise LaunchError(f"the MPS host refused {request['op']}: {error or answer!r}")
        return answer

    @staticmethod
    def _gpu(paths: DaemonPaths) -> dict[str, Any]:
        return {"gpu": paths.gpu_uuid, "pipe_dir": paths.pipe_dir, "log_dir": paths.log_dir}

    async def start(self, paths: DaemonPaths) -> int:
        answer = await self._request({"op": "start", **self._gpu(paths)})
        return _pid(answer.get("pid"))

    async def find(self, paths: DaemonPaths) -> int | None:
        answer = await self._request({"op": "find", **self._gpu(paths)})
        return None if answer.get("pid") is None else _pid(answer["pid"])

    async def wait(self, paths: DaemonPaths, pid: int) -> str:
        answer = await self._request({"op": "wait", **self._gpu(paths), "pid": pid}, bounded=False)
        return str(answer.get("exit", "exited"))

    async def kill(self, paths: DaemonPaths, pid: int, signum: int) -> None:
        name = {signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}.get(signal.Signals(signum))
        if name is None:
            raise LaunchError(f"the MPS host sends only SIGTERM and SIGKILL, not {signal.Signals(signum).name}")
        try:
            await self._request({"op": "kill", **self._gpu(paths), "pid": pid, "signal": name})
        except LaunchError as exc:
            if "is not the control daemon" in str(exc):
                return  # already gone (and maybe its pid file too)
            raise


def _pid(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 1:
        raise LaunchError(f"the MPS host answered an invalid pid {value!r}")
    return value
