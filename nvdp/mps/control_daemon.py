"""One MPS control daemon: one life of it (`run_mps_daemon`), its removal (`stop_mps_daemon`), and a restart loop.

The daemon does not live and die with nvdp: a `Launcher` (`nvdp.mps.launcher`) starts it detached from nvdp, in
its own session, its output in its log directory and its pid in a pid file there, either as nvdp's own child
(`LocalLauncher`) or as a child of `nvdp mps-host` (`HostLauncher`). So ending the task that supervises a daemon
does not end the daemon; only `stop_mps_daemon` does, and only its owner calls that, for a removal.

One life, `run_mps_daemon(spec, ...)`, never returns:

1. create the pipe and log directories (0755); `MpsError` if it cannot;
2. **adopt**: if the pid file names a live control daemon for this pipe directory and it answers
   `get_default_active_thread_percentage` and `get_default_device_pinned_mem_limit 0` with the limits of `spec`, it
   is adopted as it runs (logged "adopted the MPS control daemon for GPU n (pid p)"): no restart, compute mode
   untouched. A daemon that does not answer, or serves other limits, is stopped (quit, SIGTERM, SIGKILL of its
   group) and a fresh one started; so is whatever answers on the pipe directory without a recorded process;
3. **start** (nothing adopted): set the GPU's compute mode to EXCLUSIVE_PROCESS (the mode before is kept in the log
   directory, for the removal), start the daemon through the launcher, wait until it answers, send the limits.
   A daemon that exits or does not answer within `start_timeout_s` is stopped and `DaemonFailed` raised, before
   `task_status.started()`;
4. healthy: `on_health(uuid, True)`, `task_status.started()`;
5. probe every `probe_interval_s`; `probe_failures` consecutive failed probes (each bounded by `probe_timeout_s`)
   report the GPU unhealthy, one answer healthy again. A hung daemon
   is not restarted (its MPS server may still serve running clients); the life ends when the daemon process exits
   (seen through the launcher at once) or its pipe directory is gone (it can never answer again: it is stopped);
6. raise `DaemonFailed(reason)`: the caller restarts it (a new life, which adopts or starts).

Cancelled, a life leaves the daemon as it is: a cancellation is "nvdp stops supervising", not "remove the daemon".
`stop_mps_daemon(spec, ...)` is the removal: quit, SIGTERM, SIGKILL of the group, pid file removed, compute mode
restored. The owner calls it, shielded, when the plan no longer wants the daemon (a config change) and, with a
launcher that `owns_daemons` (local), on nvdp's clean SIGTERM. With the MPS host, nvdp's SIGTERM leaves the daemons
running; the host's own SIGTERM removes them.

Lives follow one another under `nvdp.mps.supervisor.MpsDaemons`, one child of the common supervisor per GPU
(`nvdp.supervise`: backoff 0.5 s doubling to 10 s, ±20 %).

No command ever goes through a shell: the daemon and every control command are exec'd with an argument list, and
control commands travel on stdin.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import trio

from nvdp.core.plan.model import MpsDaemonSpec
from nvdp.mps.errors import MpsError
from nvdp.mps.launcher import (
    CONTROL_BINARY,
    DaemonPaths,
    Launcher,
    LaunchError,
    daemon_env,
    describe_exit,
    make_dirs,
    output_tail,
    remove_pid_file,
)

log = logging.getLogger(__name__)

#: The PATH given to the daemon when the caller has none to pass.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# NVML compute modes (nvmlComputeMode_t). Spelled out here so that this module does not import pynvml; a test
# checks them against pynvml's constants.
COMPUTEMODE_DEFAULT = 0
COMPUTEMODE_EXCLUSIVE_PROCESS = 3
_MODE_NAMES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}


class DaemonFailed(Exception):
    """One life of a daemon ended (it exited, never answered, lost its pipe directory): restart it (`MpsDaemons`
    turns it into the supervisor's `ChildFailed`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ComputeModeControl(Protocol):
    """Reads and sets a GPU's NVML compute mode. Blocking; called through `trio.to_thread`."""

    def get(self, gpu_uuid: str) -> int: ...

    def set(self, gpu_uuid: str, mode: int) -> None: ...


class NvmlComputeMode:
    """`ComputeModeControl` through `nvdp.nvml.adapter` (NVML must be initialized)."""

    def get(self, gpu_uuid: str) -> int:
        from nvdp.nvml import adapter

        return adapter.get_compute_mode(gpu_uuid)

    def set(self, gpu_uuid: str, mode: int) -> None:
        from nvdp.nvml import adapter

        adapter.set_compute_mode(gpu_uuid, mode)


@dataclass(frozen=True, slots=True)
class DaemonTimings:
    """Every period and bound of a daemon's supervision, in seconds."""

    probe_interval_s: float = 1.0
    #: Bound on one control command (probe, limit, quit); the control program is killed when it runs over.
    #: `--mps-probe-timeout` (env MPS_PROBE_TIMEOUT).
    probe_timeout_s: float = 3.0
    #: Consecutive failed probes before a running daemon's replicas are reported Unhealthy: one slow answer on a
    #: busy node is not an outage. `--mps-probe-failures` (env MPS_PROBE_FAILURES). A daemon that exits is
    #: reported at once, whatever this says.
    probe_failures: int = 3
    #: How long a freshly started daemon may take to answer before it counts as a failed start.
    start_timeout_s: float = 10.0
    #: After `quit`: how long to wait for the daemon to exit before SIGTERM, and again before SIGKILL.
    stop_timeout_s: float = 5.0
    restart_first_s: float = 0.5
    restart_max_s: float = 10.0


DEFAULT_TIMINGS = DaemonTimings()


@dataclass(eq=False)
class DaemonState:
    """What a running daemon's supervision exposes (for `MpsDaemons`, logs and tests); shared by its lives."""

    #: None until the first probe answers or fails.
    healthy: bool | None = None
    #: The current daemon process, None between lives.
    pid: int | None = None
    #: Daemon processes started (not counting adopted ones).
    starts: int = 0
    #: Running daemons adopted from an earlier nvdp (or life).
    adoptions: int = 0
    last_exit: str = ""
    #: Seconds the last successful probe took (the control program's round trip).
    last_probe_s: float | None = None


def gpu_label(spec: MpsDaemonSpec | DaemonPaths) -> str:
    if isinstance(spec, DaemonPaths):
        return f"GPU {spec.gpu_uuid}"
    return f"GPU {spec.gpu_index} ({spec.gpu_uuid})"


def find_control_binary(driver_root: Path, path_env: str) -> Path:
    """`nvidia-cuda-mps-control` from PATH, else from the driver root's `usr/bin` or `bin`."""
    searched = [Path(entry) for entry in path_env.split(os.pathsep) if entry]
    searched += [driver_root / "usr/bin", driver_root / "bin"]
    for directory in searched:
        candidate = directory / CONTROL_BINARY
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise MpsError(
        f"{CONTROL_BINARY} not found; MPS sharing needs it from the NVIDIA driver. Looked on PATH "
        f"({path_env or 'empty'}) and under the driver root {driver_root} ({driver_root / 'usr/bin'}, "
        f"{driver_root / 'bin'})")


# --------------------------------------------------------------------------------------------- the public API


async def run_mps_daemon(
    spec: MpsDaemonSpec,
    *,
    control: Path,
    launcher: Launcher,
    compute_mode: ComputeModeControl,
    on_health: Callable[[str, bool], None],
    timings: DaemonTimings = DEFAULT_TIMINGS,
    path_env: str = DEFAULT_PATH,
    state: DaemonState | None = None,
    on_probe: Callable[[str, float], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """One life of the daemon of one GPU (module docstring): adopt or start, bring up, `task_status.started()` once
    healthy, probe; raises `DaemonFailed` when the daemon is gone (or never came up: then before `started()`), and
    `MpsError` (before `started()`) when its directories cannot be created. `on_health(gpu_uuid, healthy)` is called
    on every change, `on_probe(gpu_uuid, seconds)` after every successful periodic probe. Cancellation leaves the
    daemon running (see `stop_mps_daemon`)."""
    daemon = _Daemon(spec, control, launcher, compute_mode, on_health, timings, path_env, state or DaemonState(),
                     on_probe)
    await daemon.life(task_status)


async def stop_mps_daemon(
    spec: MpsDaemonSpec | DaemonPaths,
    *,
    control: Path,
    launcher: Launcher,
    compute_mode: ComputeModeControl | None,
    timings: DaemonTimings = DEFAULT_TIMINGS,
    path_env: str = DEFAULT_PATH,
    state: DaemonState | None = None,
) -> None:
    """Remove the GPU's daemon: `quit`, then SIGTERM, then SIGKILL of its process group, each bounded by
    `stop_timeout_s`; its pid file removed; the GPU's compute mode restored to what it was before nvdp set
    EXCLUSIVE_PROCESS (kept in the log directory; nothing is restored when nvdp never changed it, or with
    `compute_mode=None`). Never raises for a daemon that is already gone. Call it shielded: it waits for the
    daemon."""
    paths = DaemonPaths.of(spec)
    daemon = _Daemon(spec, control, launcher, compute_mode, lambda uuid, healthy: None, timings, path_env,
                     state or DaemonState(), None)
    try:
        pid = await launcher.find(paths)
    except LaunchError as exc:
        log.warning("MPS daemon for %s: %s", daemon.label, exc)
        pid = None
    if pid is not None:
        log.info("stopping the MPS control daemon for %s (pid %d)", daemon.label, pid)
        await daemon.terminate(pid)
    else:
        ok, _ = await daemon.command("get_default_active_thread_percentage")
        if ok:
            # Someone answers on the pipe directory that no pid file names (started by hand?): ask it to go.
            await daemon.quit_unknown()
    daemon.state.pid = None
    await daemon.restore_compute_mode()


async def set_daemon_limits(
    spec: MpsDaemonSpec,
    *,
    control: Path,
    launcher: Launcher,
    timings: DaemonTimings = DEFAULT_TIMINGS,
    path_env: str = DEFAULT_PATH,
) -> None:
    """Send `spec`'s limits to its running daemon, without a restart: as defaults (MPS applies them to servers it
    starts afterwards) and to each MPS server running now (for its clients that connect afterwards; clients
    connected already keep theirs). Raises `MpsError` when the daemon does not take the defaults; a server that
    does not take them is logged (it may have ended meanwhile)."""
    daemon = _Daemon(spec, control, launcher, None, lambda uuid, healthy: None, timings, path_env, DaemonState())
    limits = daemon._limit_commands()
    ok, answer = await daemon.command("\n".join(limits))
    if not ok:
        raise MpsError(f"the MPS control daemon for {daemon.label} did not take its limits {limits}: {answer}")
    ok, answer = await daemon.command("get_server_list")
    servers = answer.split() if ok else []
    for pid in servers:
        if not pid.isdigit():
            continue
        per_server = [f"set_device_pinned_mem_limit {pid} 0 {spec.pinned_mem_limit_mib}M",
                      f"set_active_thread_percentage {pid} {spec.active_thread_percentage}"]
        ok, answer = await daemon.command("\n".join(per_server))
        if not ok:
            log.warning("MPS server %s of %s did not take the new limits: %s", pid, daemon.label, answer)
    log.info("MPS daemon for %s: default pinned memory limit now %d MiB, active thread percentage %d (%d running "
             "server(s) updated)", daemon.label, spec.pinned_mem_limit_mib, spec.active_thread_percentage,
             len(servers))


async def served_limits(
    spec: MpsDaemonSpec,
    *,
    control: Path,
    launcher: Launcher,
    timings: DaemonTimings = DEFAULT_TIMINGS,
    path_env: str = DEFAULT_PATH,
) -> tuple[int, int] | None:
    """(pinned MiB, active thread percentage) the daemon on `spec`'s pipe directory serves as defaults now, or None
    when none answers or an answer is not understood: what a caller whose wanted limits changed while nvdp was
    down adopts first, to change them in place (`set_daemon_limits`) rather than restart the daemon."""
    daemon = _Daemon(spec, control, launcher, None, lambda uuid, healthy: None, timings, path_env, DaemonState())
    ok, answer = await daemon.command("get_default_active_thread_percentage")
    if not ok:
        return None
    percentage, memory = await daemon._served_limits(answer)
    if percentage is None or memory is None:
        return None
    return round(memory), round(percentage)


class _Daemon:
    def __init__(
        self,
        spec: MpsDaemonSpec | DaemonPaths,
        control: Path,
        launcher: Launcher,
        compute_mode: ComputeModeControl | None,
        on_health: Callable[[str, bool], None],
        timings: DaemonTimings,
        path_env: str,
        state: DaemonState,
        on_probe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.spec = spec
        self.paths = DaemonPaths.of(spec)
        self.control = control
        self.launcher = launcher
        self.compute_mode = compute_mode
        self.on_health = on_health
        self.on_probe = on_probe
        self.timings = timings
        self.state = state
        self.label = gpu_label(spec)
        self.env = daemon_env(self.paths, path_env)

    def _set_health(self, healthy: bool) -> None:
        if self.state.healthy is healthy:
            return
        self.state.healthy = healthy
        self.on_health(self.paths.gpu_uuid, healthy)

    # ------------------------------------------------------------------------------------------------ one life

    async def life(self, task_status: trio.TaskStatus[None]) -> NoReturn:
        try:
            await trio.to_thread.run_sync(make_dirs, self.paths)
        except OSError as exc:
            raise MpsError(f"cannot create the MPS directories of {self.label}: {exc}") from None
        pid = await self._adopt()
        if pid is None:
            pid = await self._start()
        self.state.pid = pid
        self._set_health(True)
        task_status.started()
        raise DaemonFailed(await self._supervise(pid))

    async def _adopt(self) -> int | None:
        """The running daemon, if it is ours to keep (module docstring, step 2); else None, with any daemon that
        was there stopped."""
        try:
            pid = await self.launcher.find(self.paths)
        except LaunchError as exc:
            raise DaemonFailed(f"cannot be looked up: {exc}") from None
        ok, answer = await self.command("get_default_active_thread_percentage")
        if pid is None:
            if ok:
                log.warning("something answers on the pipe directory of %s (%s) but no recorded control daemon "
                            "runs: asking it to quit and starting a fresh one", self.label, self.paths.pipe_dir)
                await self.quit_unknown()
            return None
        if not ok:
            log.warning("the MPS control daemon for %s (pid %d) does not answer (%s): restarting it", self.label,
                        pid, answer or "no output")
            await self.terminate(pid)
            return None
        serves = await self._served_limits(answer)
        wanted = self._wanted_limits()
        if limits_differ(serves, wanted):
            log.warning("the MPS control daemon for %s (pid %d) serves %s, the plan wants %s: restarting it",
                        self.label, pid, _describe_limits(serves), _describe_limits(wanted))
            await self.terminate(pid)
            return None
        if None in serves:
            # A driver that prints a limit in a form not understood here: restarting would end every client for
            # nothing known to be wrong.
            log.warning("the MPS control daemon for %s (pid %d) serves %s: what could not be read is assumed to be "
                        "what the plan wants", self.label, pid, _describe_limits(serves))
        self.state.adoptions += 1
        log.info("adopted the MPS control daemon for GPU %s (pid %d): it answers with %s; its compute mode and "
                 "clients are left as they are", self._index(), pid, _describe_limits(wanted))
        return pid

    def _index(self) -> str:
        return str(self.spec.gpu_index) if isinstance(self.spec, MpsDaemonSpec) else self.paths.gpu_uuid

    def _full_spec(self) -> MpsDaemonSpec:
        # A life needs the limits; only a removal (stop_mps_daemon) works from the paths alone.
        assert isinstance(self.spec, MpsDaemonSpec), "a daemon's life needs its MpsDaemonSpec"
        return self.spec

    def _wanted_limits(self) -> tuple[float | None, float | None]:
        spec = self._full_spec()
        return float(spec.active_thread_percentage), float(spec.pinned_mem_limit_mib)

    async def _served_limits(self, percentage: str) -> tuple[float | None, float | None]:
        ok, memory = await self.command("get_default_device_pinned_mem_limit 0")
        return _parse_number(percentage), _parse_mib(memory) if ok else None

    async def _start(self) -> int:
        """A fresh daemon, answering and with its limits; raises `DaemonFailed` (having stopped it) otherwise."""
        await self._take_compute_mode()
        try:
            pid = await self.launcher.start(self.paths)
        except LaunchError as exc:
            raise DaemonFailed(str(exc)) from None
        self.state.pid = pid
        self.state.starts += 1
        log.info("started the MPS control daemon for %s: pid %d (%s), pipe directory %s", self.label, pid,
                 self.launcher.describe(), self.paths.pipe_dir)
        failure: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                exited: list[str] = []
                nursery.start_soon(self._watch_exit, pid, exited, nursery.cancel_scope)
                failure = await self._bring_up()
                nursery.cancel_scope.cancel()
            if exited:
                failure = exited[0]
        except BaseException:
            # Cancelled while coming up (or a bug): a daemon without its limits is no use to anyone.
            with trio.CancelScope(shield=True):
                await self.terminate(pid)
            raise
        if failure is not None:
            self._log_output()
            with trio.CancelScope(shield=True):
                await self.terminate(pid)
            raise DaemonFailed(failure)
        return pid

    async def _watch_exit(self, pid: int, exited: list[str], scope: trio.CancelScope,
                          unwatched: list[str] | None = None) -> None:
        """Appends how the daemon exited to `exited`; or, with `unwatched`, why it cannot be watched any more (the
        MPS host went away: the daemon may well run on) to that list instead."""
        try:
            outcome = await self.launcher.wait(self.paths, pid)
        except LaunchError as exc:
            if unwatched is None:
                outcome = f"cannot be watched: {exc}"
            else:
                unwatched.append(f"cannot be watched ({exc}); it is left as it is, to be found again")
                scope.cancel()
                return
        self._set_health(False)  # at once; the restart takes a while
        exited.append(outcome)
        scope.cancel()

    async def _supervise(self, pid: int) -> str:
        """Probe until the daemon is gone (or cannot be watched); says why."""
        exited: list[str] = []
        unwatched: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_exit, pid, exited, nursery.cancel_scope, unwatched)
            lost = await self._probe_until_unreachable()
            nursery.cancel_scope.cancel()
        if unwatched:
            # Nothing is known about the daemon but that it ran: no kill, and its pid file stays for the next life
            # (through the host, once it is back) to find and adopt it.
            self.state.pid = None
            return unwatched[0]
        if exited:
            self._log_output()
            with trio.CancelScope(shield=True):
                # Whatever the daemon left in its group (an MPS server) goes with it.
                await self._kill_leftovers(pid)
            return exited[0]
        # Alive but unreachable for good: stop it, so that the next life starts a fresh one.
        with trio.CancelScope(shield=True):
            await self.terminate(pid)
        return lost

    def _log_output(self) -> None:
        for line in output_tail(self.paths):
            log.info("MPS daemon for %s: %s", self.label, line)

    async def _bring_up(self) -> str | None:
        """Wait for the first answer, then send the limits; None when done, else why it failed."""
        answer = ""
        with trio.move_on_after(self.timings.start_timeout_s):
            poll = 0.02
            while True:
                ok, answer = await self.command("get_default_active_thread_percentage")
                if ok:
                    break
                # The control socket appears a moment after the process starts; poll fast, then back off.
                await trio.sleep(poll)
                poll = min(poll * 2, self.timings.probe_interval_s)
            # Both limits in one run of the control program, which reads commands from stdin line by line.
            limits = self._limit_commands()
            ok, answer = await self.command("\n".join(limits))
            if not ok:
                return f"did not take its limits {limits} ({answer})"
            spec = self._full_spec()
            log.info("MPS daemon for %s: default pinned memory limit %d MiB, active thread percentage %d",
                     self.label, spec.pinned_mem_limit_mib, spec.active_thread_percentage)
            return None
        return f"did not answer within {self.timings.start_timeout_s:.1f} s (last: {answer or 'no output'})"

    def _limit_commands(self) -> list[str]:
        spec = self._full_spec()
        # Device 0: the daemon sees only this GPU (CUDA_VISIBLE_DEVICES=<uuid>), and MPS ignores UUIDs here.
        return [
            f"set_default_device_pinned_mem_limit 0 {spec.pinned_mem_limit_mib}M",
            f"set_default_active_thread_percentage {spec.active_thread_percentage}",
        ]

    async def _probe_until_unreachable(self) -> str:
        """Probe until the daemon cannot be reached any more; returns why. A daemon that is alive but hung stays
        (restarting it would end its clients): only one whose pipe directory is gone (its control socket with it;
        it can never answer again) is given up. Its replicas turn unhealthy only after `probe_failures` failed probes
        in a row."""
        failures = 0
        while True:
            await trio.sleep(self.timings.probe_interval_s)
            began = trio.current_time()
            ok, answer = await self.command("get_default_active_thread_percentage")
            if ok and _parse_number(answer) is not None:
                failures = 0
                self.state.last_probe_s = trio.current_time() - began
                if self.on_probe is not None:
                    self.on_probe(self.paths.gpu_uuid, self.state.last_probe_s)
                if self.state.healthy is not True:
                    log.info("MPS daemon for %s answers again; its replicas are healthy", self.label)
                self._set_health(True)
                continue
            failures += 1
            if not await trio.Path(self.paths.pipe_dir).is_dir():
                self._set_health(False)
                return f"lost its pipe directory {self.paths.pipe_dir}"
            if failures < self.timings.probe_failures:
                log.info("MPS daemon for %s failed a probe (%s), %d of %d in a row before its replicas count as "
                         "unhealthy", self.label, answer or "no output", failures, self.timings.probe_failures)
                continue
            if self.state.healthy is not False:
                log.warning("MPS daemon for %s failed %d probes in a row (last: %s); its replicas are unhealthy "
                            "until it answers", self.label, failures, answer or "no output")
            self._set_health(False)

    # ------------------------------------------------------------------------------------------- compute mode

    async def _take_compute_mode(self) -> None:
        if self.compute_mode is None:
            return
        uuid, saved_file = self.paths.gpu_uuid, self.paths.compute_mode_file
        try:
            before = await trio.to_thread.run_sync(self.compute_mode.get, uuid)
        except Exception as exc:  # an NVML error from whatever backs the protocol
            log.warning("cannot read the compute mode of %s: %s; starting its MPS daemon anyway", self.label, exc)
            return
        saved = await trio.to_thread.run_sync(_read_mode, saved_file)
        if before == COMPUTEMODE_EXCLUSIVE_PROCESS:
            if saved is None:
                # Most likely left behind by an nvdp that died without cleaning up: reset it to DEFAULT when this
                # daemon is removed, as upstream does, rather than leave the GPU exclusive forever.
                log.info("%s is already in compute mode EXCLUSIVE_PROCESS; it is reset to DEFAULT when its MPS "
                         "daemon is removed", self.label)
                await trio.to_thread.run_sync(_write_mode, saved_file, COMPUTEMODE_DEFAULT)
            return
        # Written first: an nvdp killed right after the change still knows what to restore.
        await trio.to_thread.run_sync(_write_mode, saved_file, before)
        try:
            await trio.to_thread.run_sync(self.compute_mode.set, uuid, COMPUTEMODE_EXCLUSIVE_PROCESS)
        except Exception as exc:
            await trio.to_thread.run_sync(_remove_mode, saved_file)
            # MPS still works in another mode; only non-MPS processes could then share the GPU as well.
            log.warning("cannot set compute mode EXCLUSIVE_PROCESS on %s: %s; starting its MPS daemon anyway",
                        self.label, exc)
            return
        log.info("set compute mode of %s to EXCLUSIVE_PROCESS (was %s)", self.label, _mode_name(before))

    async def restore_compute_mode(self) -> None:
        saved_file = self.paths.compute_mode_file
        mode = await trio.to_thread.run_sync(_read_mode, saved_file)
        if mode is None or self.compute_mode is None:
            return
        try:
            await trio.to_thread.run_sync(self.compute_mode.set, self.paths.gpu_uuid, mode)
        except Exception as exc:
            log.error("cannot restore compute mode %s on %s: %s", _mode_name(mode), self.label, exc)
            return
        await trio.to_thread.run_sync(_remove_mode, saved_file)
        log.info("restored compute mode %s on %s", _mode_name(mode), self.label)

    # ------------------------------------------------------------------------------------------------ stopping

    async def terminate(self, pid: int) -> None:
        """Bounded: quit, then SIGTERM, then SIGKILL, for the whole group; the pid file goes."""
        t = self.timings
        ok, answer = await self.command("quit")
        if not ok:
            log.warning("MPS daemon for %s did not take quit (%s)", self.label, answer)
        outcome = await self._wait_exit(pid, t.stop_timeout_s)
        if outcome is None:
            log.warning("MPS daemon for %s still runs %.1f s after quit; sending SIGTERM", self.label,
                        t.stop_timeout_s)
            await self._kill(pid, signal.SIGTERM)
            outcome = await self._wait_exit(pid, t.stop_timeout_s)
        if outcome is None:
            log.warning("MPS daemon for %s ignored SIGTERM; sending SIGKILL", self.label)
        # Also when the daemon itself is gone: whatever it left in its group (an MPS server) goes with it.
        await self._kill(pid, signal.SIGKILL)
        if outcome is None:
            outcome = await self._wait_exit(pid, t.stop_timeout_s)
        if outcome is None:
            log.error("MPS daemon for %s (pid %d) survived SIGKILL", self.label, pid)
        else:
            log.info("MPS daemon for %s stopped (%s)", self.label, outcome)
        await trio.to_thread.run_sync(remove_pid_file, self.paths, pid)
        if self.state.pid == pid:
            self.state.pid = None

    async def _kill_leftovers(self, pid: int) -> None:
        await self._kill(pid, signal.SIGKILL)
        await trio.to_thread.run_sync(remove_pid_file, self.paths, pid)

    async def quit_unknown(self) -> None:
        """`quit` to whatever answers on the pipe directory, then wait (bounded) until nothing answers."""
        await self.command("quit")
        with trio.move_on_after(self.timings.stop_timeout_s):
            # Polling: nothing to wait on but the other process's socket.
            while (await self.command("get_default_active_thread_percentage"))[0]:  # noqa: ASYNC110
                await trio.sleep(0.05)

    async def _wait_exit(self, pid: int, bound_s: float) -> str | None:
        with trio.move_on_after(bound_s):
            try:
                return await self.launcher.wait(self.paths, pid)
            except LaunchError as exc:
                return f"gone ({exc})"
        return None

    async def _kill(self, pid: int, signum: int) -> None:
        try:
            await self.launcher.kill(self.paths, pid, signum)
        except LaunchError as exc:
            log.warning("cannot signal the MPS daemon for %s: %s", self.label, exc)

    # ---------------------------------------------------------------------------------------- control program

    async def command(self, command: str) -> tuple[bool, str]:
        """Runs the control program in client mode with `command` on stdin, bounded by `probe_timeout_s`."""
        try:
            with trio.move_on_after(self.timings.probe_timeout_s) as scope:
                result = await trio.run_process(
                    [str(self.control)],
                    stdin=command.encode() + b"\n",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=self.env,
                    deliver_cancel=_kill_now,
                )
        except OSError as exc:
            return False, f"cannot run {self.control}: {exc}"
        if scope.cancelled_caught:
            return False, f"no answer within {self.timings.probe_timeout_s:.1f} s"
        out = result.stdout.decode(errors="replace").strip()
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            return False, f"{describe_exit(result.returncode)}: {err or out or 'no output'}"
        return True, out


async def _kill_now(process: trio.Process) -> None:
    # A control client holds no state worth a graceful exit.
    process.kill()


def _read_mode(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _write_mode(path: Path, mode: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{mode}\n")
    tmp.replace(path)


def _remove_mode(path: Path) -> None:
    path.unlink(missing_ok=True)


def _mode_name(mode: int) -> str:
    return _MODE_NAMES.get(mode, str(mode))


def _parse_number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_MIB_PER_UNIT = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


def _parse_mib(text: str) -> float | None:
    """A pinned-memory limit as MPS prints it (`10240M`, `10G`, `0`), in MiB; a bare number is MiB."""
    match = _SIZE.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _MIB_PER_UNIT[match.group(2).upper()]


def limits_differ(served: tuple[float | None, float | None], wanted: tuple[float | None, float | None]) -> bool:
    """Whether a daemon's (active thread percentage, pinned memory MiB) differ from the plan's; a value that could
    not be read (None) differs from nothing."""
    return any(s is not None and w is not None and abs(s - w) >= 0.5 for s, w in zip(served, wanted, strict=True))


def _describe_limits(limits: tuple[float | None, float | None]) -> str:
    percentage, memory = limits
    pct = "?" if percentage is None else f"{percentage:g}"
    mem = "?" if memory is None else f"{memory:g} MiB"
    return f"active thread percentage {pct} and pinned memory limit {mem}"

