"""Who starts an MPS control daemon, so that it outlives nvdp: the local launcher and the pid file.

An MPS control daemon must not depend on nvdp's lifetime (docs/mps.md, "Where the daemons run"): its clients keep
their server only as long as it runs. So every daemon is started

- in its own session and process group (a signal to nvdp's group never reaches it; one `killpg` ends it and the
  MPS servers it spawns),
- with its output appended to a file in its log directory, `<log dir>/control-daemon.out`, never to a pipe to nvdp
  (a dead reader would end it with SIGPIPE at its next line),
- with stdin from /dev/null and only the environment it needs,

and its pid is recorded in `<log dir>/control-daemon.pid`. A later nvdp (or MPS host) finds it through that file;
`daemon_pid` checks `/proc/<pid>` (not a zombie, its command line runs `nvidia-cuda-mps-control`, and, where
readable, its environment names this pipe directory) so that a reused pid is never taken for the daemon.

Two launchers implement `Launcher`:

- `LocalLauncher` (here): nvdp spawns the daemon itself, as a child in its own session. Killing nvdp (even with
  SIGKILL) leaves the daemon running; it is reparented to init. Used on a bare process, in tests and in the demo,
  and inside `nvdp mps-host`.
- `HostLauncher` (`nvdp.mps.host`): asks `nvdp mps-host`, a separate long-lived process (its own DaemonSet or
  systemd unit), to start the daemon as *its* child, so that a container or unit restart of nvdp leaves it alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from nvdp.core.plan.model import MpsDaemonSpec

log = logging.getLogger(__name__)

CONTROL_BINARY = "nvidia-cuda-mps-control"
PID_FILE = "control-daemon.pid"
OUTPUT_FILE = "control-daemon.out"
#: The GPU's compute mode before nvdp set EXCLUSIVE_PROCESS, restored when the daemon is removed.
COMPUTE_MODE_FILE = "compute-mode-before-mps"
#: How often a daemon that is not our child (no pidfd) is checked for its exit.
EXIT_POLL_S = 0.5


class LaunchError(Exception):
    """A daemon could not be started, found or signalled (the reason is in the message)."""


@dataclass(frozen=True, slots=True)
class DaemonPaths:
    """What a launcher needs of a daemon: the GPU it serves and its directories."""

    gpu_uuid: str
    pipe_dir: str
    log_dir: str

    @classmethod
    def of(cls, spec: MpsDaemonSpec | DaemonPaths) -> DaemonPaths:
        if isinstance(spec, DaemonPaths):
            return spec
        return cls(spec.gpu_uuid, spec.pipe_dir, spec.log_dir)

    @property
    def pid_file(self) -> Path:
        return Path(self.log_dir) / PID_FILE

    @property
    def output_file(self) -> Path:
        return Path(self.log_dir) / OUTPUT_FILE

    @property
    def compute_mode_file(self) -> Path:
        return Path(self.log_dir) / COMPUTE_MODE_FILE


class Launcher(Protocol):
    """Starts, finds, watches and signals MPS control daemons. Every method may raise `LaunchError`."""

    #: True: the daemons belong to this nvdp, and its clean SIGTERM removes them (quit, compute mode restored).
    #: False: they belong to another process (the MPS host); nvdp's SIGTERM leaves them running.
    owns_daemons: bool

    def describe(self) -> str: ...

    async def start(self, paths: DaemonPaths) -> int:
        """Start `<control> -f` for these paths, detached from the caller; record and return its pid."""
        ...

    async def find(self, paths: DaemonPaths) -> int | None:
        """The pid of the running daemon recorded for these paths, checked against pid reuse; None if none runs."""
        ...

    async def wait(self, paths: DaemonPaths, pid: int) -> str:
        """Return once that daemon has exited, saying how."""
        ...

    async def kill(self, paths: DaemonPaths, pid: int, signum: int) -> None:
        """Send `signum` to the daemon's process group (it and its MPS servers)."""
        ...


def daemon_env(paths: DaemonPaths, path_env: str) -> dict[str, str]:
    # Only what the daemon needs: nothing of nvdp's own environment (credentials, flags) leaks into it.
    return {
        "PATH": path_env,
        "CUDA_VISIBLE_DEVICES": paths.gpu_uuid,
        "CUDA_MPS_PIPE_DIRECTORY": paths.pipe_dir,
        "CUDA_MPS_LOG_DIRECTORY": paths.log_dir,
    }


def make_dirs(paths: DaemonPaths) -> None:
    """The pipe and log directories, mode 0755 (clients of any UID must reach the pipe directory)."""
    for directory in (Path(paths.pipe_dir), Path(paths.log_dir)):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask.
        directory.chmod(0o755)


# ------------------------------------------------------------------------------------------------ pid file, /proc


def read_pid_file(paths: DaemonPaths) -> int | None:
    try:
        text = paths.pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def write_pid_file(paths: DaemonPaths, pid: int) -> None:
    tmp = paths.pid_file.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(paths.pid_file)


def remove_pid_file(paths: DaemonPaths, pid: int) -> None:
    """Removes the pid file if it still names `pid` (a newer daemon's file stays)."""
    if read_pid_file(paths) == pid:
        with contextlib.suppress(FileNotFoundError):
            paths.pid_file.unlink()


def process_state(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The one-letter state of a process (R, S, Z, ...), None when there is no such process."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ")".
    return stat.rpartition(")")[2].split()[0] if ")" in stat else None


def is_daemon_process(pid: int, paths: DaemonPaths, proc: Path = Path("/proc")) -> bool:
    """Whether `pid` is a live MPS control daemon for this pipe directory (the guard against pid reuse).

    Its command line must run `nvidia-cuda-mps-control` (as argv[0], or as the script of an interpreter: the fake
    in nvdp/sim) with `-f` or `-d`; its environment, where readable (same user, or root), must name this pipe
    directory."""
    if process_state(pid, proc) in (None, "Z", "X"):
        return False
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # argv[0] for the real program; a script's path follows its interpreter (`python3 <path> -f`, and for a moment
    # after the exec, `/usr/bin/env python3 <path> -f`).
    names = [os.path.basename(arg.decode(errors="replace")) for arg in argv[:3]]
    if CONTROL_BINARY not in names or not ({b"-f", b"-d"} & set(argv)):
        return False
    try:
        environ = (proc / str(pid) / "environ").read_bytes().split(b"\0")
    except PermissionError:
        return True  # another user's process and we may not read it: the command line has to do
    except OSError:
        return False
    return f"CUDA_MPS_PIPE_DIRECTORY={paths.pipe_dir}".encode() in environ


def daemon_pid(paths: DaemonPaths) -> int | None:
    """The recorded daemon's pid if it still runs (and is what the file says it is), else None."""
    pid = read_pid_file(paths)
    return pid if pid is not None and is_daemon_process(pid, paths) else None


async def wait_pid_exit(pid: int, poll_s: float = EXIT_POLL_S) -> None:
    """Return once `pid` has exited; works for a process that is not our child (a pidfd, else polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):
        fd = -1
    if fd >= 0:
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return
    # No pidfd (an old kernel): poll /proc.
    while process_state(pid) not in (None, "Z", "X"):  # noqa: ASYNC110
        await trio.sleep(poll_s)


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with {returncode}"


def output_tail(paths: DaemonPaths, lines: int = 5, max_bytes: int = 4096) -> list[str]:
    """The last lines the daemon wrote (often why it died)."""
    try:
        with paths.output_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return []
    return [line.decode(errors="replace") for line in data.splitlines()[-lines:] if line.strip()]


# ------------------------------------------------------------------------------------------------ local launcher

#: Every daemon this process started and has not reaped, by pid, shared by all local launchers: a daemon outlives the
#: launcher (and the task) that started it, and its `trio.Process` must too, or its exit status is lost (and Python
#: warns about a child dropped while it runs).
_CHILDREN: dict[int, trio.Process] = {}
#: How the last few reaped children exited, by pid (a later `wait` still says how; their process groups may still
#: hold an MPS server to kill). A pid leaves when it is started again, or when older than the last `_EXITS_KEPT`.
_EXITS: dict[int, str] = {}
_EXITS_KEPT = 64


def _reaped(pid: int, returncode: int) -> str:
    _CHILDREN.pop(pid, None)
    outcome = _EXITS[pid] = describe_exit(returncode)
    while len(_EXITS) > _EXITS_KEPT:
        del _EXITS[next(iter(_EXITS))]
    return outcome


class LocalLauncher:
    """Starts daemons as children of this process, each in its own session, output to its log directory.

    A child stays a child: this process reaps it when `wait` is called (or, with a `nursery`, at once in a task of
    its own, as `nvdp mps-host` does). A daemon started by an earlier process (adopted) is watched by pid.
    """

    owns_daemons = True

    def __init__(self, control: Path, path_env: str, nursery: trio.Nursery | None = None) -> None:
        self.control = control
        self.path_env = path_env
        self._nursery = nursery
        self._children = _CHILDREN

    def __repr__(self) -> str:
        return f"<LocalLauncher {self.control} children={sorted(self._children)}>"

    def describe(self) -> str:
        return "started by nvdp"

    async def start(self, paths: DaemonPaths) -> int:
        try:
            # Truncated at each start: one life's output, bounded; its tail is logged when it exits.
            out = os.open(paths.output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LaunchError(f"cannot open {paths.output_file}: {exc.strerror or exc}") from None
        try:
            process = await trio.lowlevel.open_process(
                [str(self.control), "-f"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=daemon_env(paths, self.path_env),
                cwd="/",
                # Its own session: no signal to nvdp's process group or terminal reaches it, and the MPS servers
                # it spawns share its process group, so one killpg ends them all.
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"could not start ({exc})") from None
        finally:
            os.close(out)
        _EXITS.pop(process.pid, None)
        self._children[process.pid] = process
        # Shielded: a daemon is running now, and a cancellation here (SIGTERM while it starts) would leave it with no
        # pid file, so that neither `stop_mps_daemon` nor a later nvdp could find it.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(write_pid_file, paths, process.pid)
            except OSError as exc:
                log.warning("cannot write %s: %s; a later nvdp will not adopt this daemon", paths.pid_file, exc)
        if self._nursery is not None:
            self._nursery.start_soon(self._reap, process)
        return process.pid

    async def _reap(self, process: trio.Process) -> None:
        _reaped(process.pid, await process.wait())

    async def find(self, paths: DaemonPaths) -> int | None:
        pid = read_pid_file(paths)
        child = self._children.get(pid) if pid is not None else None
        if pid is not None and child is not None:
            if (returncode := child.poll()) is not None:
                _reaped(pid, returncode)
                return None  # our own child, exited (and now reaped)
            # Our own child, running: its pid cannot be reused before we reap it, so /proc need not vouch for it
            # (just after the spawn it may still be between `env` and the interpreter's exec).
            return pid
        return await trio.to_thread.run_sync(daemon_pid, paths)

    async def wait(self, paths: DaemonPaths, pid: int) -> str:
        child = self._children.get(pid)
        if child is not None:
            return _reaped(pid, await child.wait())
        if pid in _EXITS:
            return _EXITS[pid]
        if not await trio.to_thread.run_sync(is_daemon_process, pid, paths):
            return "exited"  # already; and the pid may be someone else's by now
        await wait_pid_exit(pid)
        return "exited"

    async def kill(self, paths: DaemonPaths, pid: int, signum: int) -> None:
        # Our own child's process group is ours even after the child exited (its id cannot be reused while any
        # member lives); anyone else's only while the pid still is that daemon.
        if self.has_child(pid) or await trio.to_thread.run_sync(is_daemon_process, pid, paths):
            signal_group(pid, signum)

    def has_child(self, pid: int) -> bool:
        """Whether `pid` is (or was, recently) a daemon this process started."""
        return pid in self._children or pid in _EXITS

