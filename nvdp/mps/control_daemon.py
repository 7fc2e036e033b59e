"""One MPS control daemon, supervised: `nvidia-cuda-mps-control -f` for one GPU, as a child task of a nursery.

Lifetime of `serve_mps_daemon(spec, ...)`, which never returns until cancelled:

1. create the pipe and log directories (0755), remember the GPU's compute mode and set EXCLUSIVE_PROCESS;
2. start `<control> -f` in the foreground, in its own session, with a minimal environment; its output is read by a
   task of the same nursery and logged (no `tail` child);
3. wait until it answers `get_default_active_thread_percentage`, then send the default pinned-memory limit and
   active thread percentage through the control program's stdin; healthy; `task_status.started()`;
4. probe every `probe_interval_s`: a probe that fails or times out reports the GPU unhealthy through `on_health`,
   an answer reports it healthy again. A hung daemon is not restarted: its MPS server may still serve running
   clients, and a restart would end them;
5. the daemon exits (or never answers its first probe within `start_timeout_s`): unhealthy, stop what is left of
   its process group, restart after a capped backoff (0.5 s doubling to 10 s), back to 3;
6. cancelled: shielded and bounded, send `quit`, wait, SIGTERM, SIGKILL the process group; restore the compute mode.

`task_status.started()` is called after the first answer, or after the first start attempt failed (having reported
the GPU unhealthy), so that one broken daemon cannot hold up the whole node: its replicas are advertised Unhealthy
and become Healthy when a later attempt answers.

No command ever goes through a shell: the daemon and every control command are exec'd with an argument list, and
control commands travel on stdin.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import trio

from nvdp.core.plan.model import MpsDaemonSpec

log = logging.getLogger(__name__)

CONTROL_BINARY = "nvidia-cuda-mps-control"
#: The PATH given to the daemon when the caller has none to pass.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# NVML compute modes (nvmlComputeMode_t). Spelled out here so that this module does not import pynvml; a test
# checks them against pynvml's constants.
COMPUTEMODE_DEFAULT = 0
COMPUTEMODE_EXCLUSIVE_PROCESS = 3
_MODE_NAMES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}


class MpsError(Exception):
    """An MPS daemon cannot be set up at all (no control program, no pipe directory)."""


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
    probe_timeout_s: float = 1.0
    #: How long a freshly started daemon may take to answer before it counts as a failed start.
    start_timeout_s: float = 10.0
    #: After `quit`: how long to wait for the daemon to exit before SIGTERM, and again before SIGKILL.
    stop_timeout_s: float = 5.0
    restart_first_s: float = 0.5
    restart_max_s: float = 10.0


DEFAULT_TIMINGS = DaemonTimings()


@dataclass(eq=False)
class DaemonState:
    """What a running `serve_mps_daemon` exposes (for `MpsDaemons`, logs and tests)."""

    #: None until the first probe answers or fails.
    healthy: bool | None = None
    #: The current daemon process, None between restarts.
    pid: int | None = None
    starts: int = 0
    last_exit: str = ""
    #: Seconds the last successful probe took (the control program's round trip).
    last_probe_s: float | None = None


def gpu_label(spec: MpsDaemonSpec) -> str:
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


async def serve_mps_daemon(
    spec: MpsDaemonSpec,
    *,
    control: Path,
    compute_mode: ComputeModeControl,
    on_health: Callable[[str, bool], None],
    timings: DaemonTimings = DEFAULT_TIMINGS,
    path_env: str = DEFAULT_PATH,
    state: DaemonState | None = None,
    on_probe: Callable[[str, float], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run and supervise the MPS control daemon of one GPU until cancelled (see the module docstring).

    `on_health(gpu_uuid, healthy)` is called on every change, from this task; `on_probe(gpu_uuid, seconds)` after
    every successful periodic probe. Raises `MpsError` before
    `task_status.started()` when the pipe or log directory cannot be created.
    """
    daemon = _Daemon(spec, control, compute_mode, on_health, timings, path_env, state or DaemonState(), on_probe)
    await daemon.run(task_status)


class _Daemon:
    def __init__(
        self,
        spec: MpsDaemonSpec,
        control: Path,
        compute_mode: ComputeModeControl,
        on_health: Callable[[str, bool], None],
        timings: DaemonTimings,
        path_env: str,
        state: DaemonState,
        on_probe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.spec = spec
        self.control = control
        self.compute_mode = compute_mode
        self.on_health = on_health
        self.on_probe = on_probe
        self.timings = timings
        self.state = state
        self.label = gpu_label(spec)
        # Only what the daemon needs: nothing of nvdp's own environment (credentials, flags) leaks into it.
        self.env = {
            "PATH": path_env,
            "CUDA_VISIBLE_DEVICES": spec.gpu_uuid,
            "CUDA_MPS_PIPE_DIRECTORY": spec.pipe_dir,
            "CUDA_MPS_LOG_DIRECTORY": spec.log_dir,
        }
        #: The compute mode to put back on the way out; None when we never changed it.
        self.restore_mode: int | None = None
        self._started = False

    # ------------------------------------------------------------------------------------------------ lifetime

    async def run(self, task_status: trio.TaskStatus[None]) -> NoReturn:
        try:
            await trio.to_thread.run_sync(self._make_dirs)
        except OSError as exc:
            raise MpsError(f"cannot create the MPS directories of {self.label}: {exc}") from None

        def started() -> None:
            if not self._started:
                self._started = True
                task_status.started()

        try:
            await self._take_compute_mode()
            delay = self.timings.restart_first_s
            while True:
                began = trio.current_time()
                outcome = await self._run_once(started)
                self.state.last_exit = outcome
                self._set_health(False)
                # Let apply() go on: this GPU's replicas are advertised Unhealthy until a restart answers.
                started()
                if trio.current_time() - began >= self.timings.restart_max_s:
                    delay = self.timings.restart_first_s  # it ran a good while: not a crash loop
                log.warning("MPS daemon for %s %s; restarting in %.1f s", self.label, outcome, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.timings.restart_max_s)
        finally:
            with trio.CancelScope(shield=True):
                await self._restore_compute_mode()

    def _make_dirs(self) -> None:
        for directory in (Path(self.spec.pipe_dir), Path(self.spec.log_dir)):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; clients of any UID must reach the pipe directory.
            directory.chmod(0o755)

    async def _take_compute_mode(self) -> None:
        uuid = self.spec.gpu_uuid
        try:
            before = await trio.to_thread.run_sync(self.compute_mode.get, uuid)
            if before == COMPUTEMODE_EXCLUSIVE_PROCESS:
                # Most likely left behind by an nvdp that died without cleaning up: reset it to DEFAULT when this
                # daemon stops, as upstream does, rather than leave the GPU exclusive forever.
                log.info("%s is already in compute mode EXCLUSIVE_PROCESS; it is reset to DEFAULT when its MPS "
                         "daemon stops", self.label)
                self.restore_mode = COMPUTEMODE_DEFAULT
                return
            await trio.to_thread.run_sync(self.compute_mode.set, uuid, COMPUTEMODE_EXCLUSIVE_PROCESS)
        except Exception as exc:  # an NVML error from whatever backs the protocol
            # MPS still works in another mode; only non-MPS processes could then share the GPU as well.
            log.warning("cannot set compute mode EXCLUSIVE_PROCESS on %s: %s; starting its MPS daemon anyway",
                        self.label, exc)
            return
        self.restore_mode = before
        log.info("set compute mode of %s to EXCLUSIVE_PROCESS (was %s)", self.label, _mode_name(before))

    async def _restore_compute_mode(self) -> None:
        if self.restore_mode is None:
            return
        mode, self.restore_mode = self.restore_mode, None
        try:
            await trio.to_thread.run_sync(self.compute_mode.set, self.spec.gpu_uuid, mode)
        except Exception as exc:
            log.error("cannot restore compute mode %s on %s: %s", _mode_name(mode), self.label, exc)
            return
        log.info("restored compute mode %s on %s", _mode_name(mode), self.label)

    def _set_health(self, healthy: bool) -> None:
        if self.state.healthy is healthy:
            return
        self.state.healthy = healthy
        self.on_health(self.spec.gpu_uuid, healthy)

    # ---------------------------------------------------------------------------------------- one daemon process

    async def _run_once(self, started: Callable[[], None]) -> str:
        """Start the daemon and supervise it until it exits or fails to come up; says what happened."""
        try:
            process = await trio.lowlevel.open_process(
                [str(self.control), "-f"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Its own session: a Ctrl-C on nvdp's terminal does not reach it (nvdp stops it in order), and the
                # MPS server it spawns shares its process group, so one killpg ends both.
                start_new_session=True,
            )
        except OSError as exc:
            return f"could not start ({exc})"
        self.state.pid = process.pid
        self.state.starts += 1
        log.info("started the MPS control daemon for %s: pid %d, pipe directory %s", self.label, process.pid,
                 self.spec.pipe_dir)
        outcome = ""
        try:
            async with trio.open_nursery() as nursery:
                output_done = trio.Event()
                assert process.stdout is not None
                nursery.start_soon(self._log_output, process.stdout, output_done)
                nursery.start_soon(self._watch_exit, process, output_done, nursery.cancel_scope)
                failure = await self._bring_up()
                if failure is None:
                    self._set_health(True)
                    log.info("MPS daemon for %s answers; its replicas are healthy", self.label)
                    started()
                    failure = await self._probe_until_unreachable()
                outcome = failure or ""
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop(process)
                self.state.pid = None
        if not await trio.Path(self.spec.pipe_dir).is_dir():
            # The next start needs its directories back (they are created once, in run()).
            try:
                await trio.to_thread.run_sync(self._make_dirs)
            except OSError as exc:
                outcome = f"{outcome}; cannot re-create its directories ({exc})"
        if process.returncode is not None and not outcome:
            outcome = _describe_exit(process.returncode)
        return outcome or "stopped"

    async def _watch_exit(self, process: trio.Process, output_done: trio.Event, scope: trio.CancelScope) -> None:
        await process.wait()
        self._set_health(False)  # at once; the restart below takes a while
        # Keep the last lines (often the reason it died) unless a grandchild still holds the pipe open.
        with trio.move_on_after(0.2):
            await output_done.wait()
        scope.cancel()

    async def _log_output(self, stream: trio.abc.ReceiveStream, done: trio.Event) -> None:
        pending = b""
        try:
            while chunk := await stream.receive_some(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    log.info("MPS daemon for GPU %d: %s", self.spec.gpu_index, line.decode(errors="replace"))
            if pending:
                log.info("MPS daemon for GPU %d: %s", self.spec.gpu_index, pending.decode(errors="replace"))
        finally:
            done.set()

    async def _bring_up(self) -> str | None:
        """Wait for the first answer, then send the limits; None when done, else why it failed."""
        answer = ""
        with trio.move_on_after(self.timings.start_timeout_s):
            poll = 0.02
            while True:
                ok, answer = await self._command("get_default_active_thread_percentage")
                if ok:
                    break
                # The control socket appears a moment after the process starts; poll fast, then back off.
                await trio.sleep(poll)
                poll = min(poll * 2, self.timings.probe_interval_s)
            # Both limits in one run of the control program, which reads commands from stdin line by line.
            limits = self._limit_commands()
            ok, answer = await self._command("\n".join(limits))
            if not ok:
                return f"did not take its limits {limits} ({answer})"
            log.info("MPS daemon for %s: default pinned memory limit %d MiB, active thread percentage %d",
                     self.label, self.spec.pinned_mem_limit_mib, self.spec.active_thread_percentage)
            return None
        return f"did not answer within {self.timings.start_timeout_s:.1f} s (last: {answer or 'no output'})"

    def _limit_commands(self) -> list[str]:
        # Device 0: the daemon sees only this GPU (CUDA_VISIBLE_DEVICES=<uuid>), and MPS ignores UUIDs here.
        return [
            f"set_default_device_pinned_mem_limit 0 {self.spec.pinned_mem_limit_mib}M",
            f"set_default_active_thread_percentage {self.spec.active_thread_percentage}",
        ]

    async def _probe_until_unreachable(self) -> str:
        """Probe until the daemon cannot be reached any more; returns why. A daemon that is alive but hung stays
        (restarting it would end its clients): only one whose pipe directory is gone (its control socket with it;
        it can never answer again) is restarted."""
        while True:
            await trio.sleep(self.timings.probe_interval_s)
            began = trio.current_time()
            ok, answer = await self._command("get_default_active_thread_percentage")
            if ok and _is_number(answer):
                self.state.last_probe_s = trio.current_time() - began
                if self.on_probe is not None:
                    self.on_probe(self.spec.gpu_uuid, self.state.last_probe_s)
                if self.state.healthy is not True:
                    log.info("MPS daemon for %s answers again; its replicas are healthy", self.label)
                self._set_health(True)
                continue
            if self.state.healthy is not False:
                log.warning("MPS daemon for %s failed a probe (%s); its replicas are unhealthy until it "
                            "answers", self.label, answer or "no output")
            self._set_health(False)
            if not await trio.Path(self.spec.pipe_dir).is_dir():
                return f"lost its pipe directory {self.spec.pipe_dir}"

    async def _command(self, command: str) -> tuple[bool, str]:
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
            return False, f"{_describe_exit(result.returncode)}: {err or out or 'no output'}"
        return True, out

    async def _stop(self, process: trio.Process) -> None:
        """Shielded by the caller and bounded here: quit, then SIGTERM, then SIGKILL, for the whole group."""
        t = self.timings
        if process.returncode is None:
            ok, answer = await self._command("quit")
            if not ok:
                log.warning("MPS daemon for %s did not take quit (%s)", self.label, answer)
            with trio.move_on_after(t.stop_timeout_s):
                await process.wait()
        if process.returncode is None:
            log.warning("MPS daemon for %s still runs %.1f s after quit; sending SIGTERM", self.label,
                        t.stop_timeout_s)
            _signal_group(process.pid, signal.SIGTERM)
            with trio.move_on_after(t.stop_timeout_s):
                await process.wait()
        if process.returncode is None:
            log.warning("MPS daemon for %s ignored SIGTERM; sending SIGKILL", self.label)
        # Also when the daemon itself is gone: whatever it left in its group (an MPS server) goes with it.
        _signal_group(process.pid, signal.SIGKILL)
        with trio.move_on_after(t.stop_timeout_s):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
        if process.returncode is None:
            log.error("MPS daemon for %s (pid %d) survived SIGKILL", self.label, process.pid)
        else:
            log.info("MPS daemon for %s stopped (%s)", self.label, _describe_exit(process.returncode))


async def _kill_now(process: trio.Process) -> None:
    # A control client holds no state worth a graceful exit.
    process.kill()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with {returncode}"


def _mode_name(mode: int) -> str:
    return _MODE_NAMES.get(mode, str(mode))


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
