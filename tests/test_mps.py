"""MPS control daemons against the fake `nvidia-cuda-mps-control`, their supervision, and the shm tmpfs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path

import pynvml
import pytest
import trio

from nvdp import mps, sim
from nvdp.core.plan.model import MpsDaemonSpec
from nvdp.mps import shm
from nvdp.mps.control_daemon import DaemonState, DaemonTimings
from nvdp.mps.launcher import make_dirs, read_pid_file
from nvdp.nvml import adapter
from tests.harness import LIMIT_S, eventually
from tests.helpers import gpu, write_node
from tests.test_mps_survival import kill_left_daemons

CONTROL = Path(sim.__file__).parent / "nvidia-cuda-mps-control"
# The venv's python3 first: the fake's `#!/usr/bin/env python3` then starts fast (no pyenv shim) and is a 3.11+.
PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
FAST = DaemonTimings(probe_interval_s=0.05, probe_timeout_s=0.5, start_timeout_s=2.0, stop_timeout_s=0.5,
                     restart_first_s=0.1, restart_max_s=1.0)
GPU0 = gpu(0)["uuid"]
GPU1 = gpu(1)["uuid"]


class FakeComputeMode:
    def __init__(self, modes: dict[str, int], fail: bool = False) -> None:
        self.modes = dict(modes)
        self.changes: list[tuple[str, int]] = []
        self.fail = fail

    def get(self, gpu_uuid: str) -> int:
        return self.modes[gpu_uuid]

    def set(self, gpu_uuid: str, mode: int) -> None:
        if self.fail:
            raise RuntimeError("insufficient permissions")
        self.modes[gpu_uuid] = mode
        self.changes.append((gpu_uuid, mode))


class Health:
    """Records on_health calls and waits for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool]] = []
        self._changed = trio.Event()

    def __call__(self, gpu_uuid: str, healthy: bool) -> None:
        self.events.append((gpu_uuid, healthy))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, gpu_uuid: str, healthy: bool, *, after: int = 0, limit_s: float = LIMIT_S) -> None:
        # A bound, not a speed claim: generous, so that a loaded machine cannot fail it.
        with trio.fail_after(max(limit_s, LIMIT_S)):
            while (gpu_uuid, healthy) not in self.events[after:]:
                await self._changed.wait()


async def until(predicate: Callable[[], bool], limit_s: float = LIMIT_S) -> None:
    """The condition is in files another process writes, with nothing to wait on: the harness's polled wait."""
    await eventually(predicate, limit_s=max(limit_s, LIMIT_S))


@pytest.fixture
def root() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="nvdp-mps-") as directory:
        try:
            yield Path(directory)
        finally:
            # Daemons outlive the tasks that started them: a test that failed half-way leaves its own running.
            kill_left_daemons(Path(directory))


def make_spec(root: Path, index: int = 0, mem_mib: int = 10240, pct: int = 25) -> MpsDaemonSpec:
    uuid = gpu(index)["uuid"]
    return MpsDaemonSpec(gpu_uuid=uuid, gpu_index=index, pipe_dir=str(root / uuid / "pipe"),
                         log_dir=str(root / uuid / "log"), pinned_mem_limit_mib=mem_mib, active_thread_percentage=pct)


def commands(spec: MpsDaemonSpec) -> list[str]:
    path = Path(spec.pipe_dir).parent / "commands.log"
    return path.read_text().splitlines() if path.exists() else []


def limit_commands(spec: MpsDaemonSpec) -> list[str]:
    return [c for c in commands(spec) if c.startswith("set_")]


def set_fake_mode(spec: MpsDaemonSpec, mode: str) -> None:
    directory = Path(spec.pipe_dir).parent
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fake-mode").write_text(mode)


def daemon_env(spec: MpsDaemonSpec) -> dict[str, object]:
    data: dict[str, object] = json.loads((Path(spec.pipe_dir).parent / "daemon-env.json").read_text())
    return data


def permissions(path: str) -> int:
    return Path(path).stat().st_mode & 0o777


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.asynccontextmanager
async def running(
    spec: MpsDaemonSpec,
    compute_mode: mps.ComputeModeControl,
    health: Health,
    timings: DaemonTimings = FAST,
) -> AsyncIterator[DaemonState]:
    """One GPU's daemon under MpsDaemons (the common supervisor restarts its lives); nvdp owns it (local
    launcher), so the end of the block removes it."""
    async with trio.open_nursery() as nursery:
        daemons = mps.MpsDaemons(nursery, CONTROL, compute_mode, health, timings=timings, path_env=PATH)
        with trio.fail_after(5):
            await daemons.apply([spec])
        yield daemons.running[spec.gpu_uuid].state
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------------------ one daemon


async def test_daemon_starts_with_minimal_env_and_limits(root: Path) -> None:
    spec = make_spec(root)
    modes = FakeComputeMode({GPU0: 0})
    health = Health()
    async with running(spec, modes, health) as state:
        assert health.events == [(GPU0, True)]  # started() only after it answered
        assert modes.changes == [(GPU0, mps.COMPUTEMODE_EXCLUSIVE_PROCESS)]
        assert limit_commands(spec) == ["set_default_device_pinned_mem_limit 0 10240M",
                                        "set_default_active_thread_percentage 25"]
        recorded = daemon_env(spec)
        assert recorded["pid"] == state.pid
        env = dict(recorded["env"])  # type: ignore[call-overload]
        env.pop("LC_CTYPE", None)  # Python's locale coercion may add it
        assert env == {"PATH": PATH, "CUDA_VISIBLE_DEVICES": GPU0, "CUDA_MPS_PIPE_DIRECTORY": spec.pipe_dir,
                       "CUDA_MPS_LOG_DIRECTORY": spec.log_dir}
        assert [permissions(d) for d in (spec.pipe_dir, spec.log_dir)] == [0o755, 0o755]
        await until(lambda: commands(spec).count("get_default_active_thread_percentage") >= 3)  # it keeps probing
    assert modes.changes[-1] == (GPU0, 0)


async def test_cancellation_sends_quit_and_leaves_nothing(root: Path) -> None:
    spec = make_spec(root)
    modes = FakeComputeMode({GPU0: 0})
    async with running(spec, modes, Health()) as state:
        assert state.pid is not None
        pid = state.pid
    assert commands(spec)[-1] == "quit"
    assert gone(pid)
    assert state.pid is None
    assert modes.changes == [(GPU0, 3), (GPU0, 0)]
    assert not (Path(spec.pipe_dir) / "control").exists()


async def test_compute_mode_on_the_simulated_node(root: Path, tmp_path: Path) -> None:
    assert (mps.COMPUTEMODE_DEFAULT, mps.COMPUTEMODE_EXCLUSIVE_PROCESS) == (
        pynvml.NVML_COMPUTEMODE_DEFAULT, pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
    adapter.shutdown()
    handle = sim.activate(sim.load_node(write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)])), tmp_path / "sim")
    adapter.init()
    try:
        spec = make_spec(root)
        async with running(spec, mps.NvmlComputeMode(), Health()):
            assert adapter.get_compute_mode(GPU0) == pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
        assert adapter.get_compute_mode(GPU0) == pynvml.NVML_COMPUTEMODE_DEFAULT
        assert handle.compute_mode_changes() == [(GPU0, 3), (GPU0, 0)]
    finally:
        adapter.shutdown()


async def test_gpu_left_exclusive_is_reset_to_default(root: Path) -> None:
    modes = FakeComputeMode({GPU0: mps.COMPUTEMODE_EXCLUSIVE_PROCESS})
    async with running(make_spec(root), modes, Health()):
        assert modes.changes == []
    assert modes.changes == [(GPU0, 0)]


async def test_compute_mode_failure_does_not_stop_mps(root: Path) -> None:
    health = Health()
    async with running(make_spec(root), FakeComputeMode({GPU0: 0}, fail=True), health):
        assert health.events == [(GPU0, True)]


async def test_killed_daemon_is_unhealthy_then_restarted(root: Path) -> None:
    spec = make_spec(root)
    health = Health()
    async with running(spec, FakeComputeMode({GPU0: 0}), health) as state:
        assert state.pid is not None
        first = state.pid
        os.kill(first, signal.SIGKILL)
        await health.wait_for(GPU0, False, limit_s=2)
        await health.wait_for(GPU0, True, after=2, limit_s=3)
        assert state.pid not in (None, first)
        assert state.starts == 2
        assert state.last_exit == "was killed by SIGKILL"
        assert limit_commands(spec) == 2 * ["set_default_device_pinned_mem_limit 0 10240M",
                                            "set_default_active_thread_percentage 25"]
    assert gone(first)


async def test_hung_daemon_is_unhealthy_and_recovers_and_is_terminated(root: Path) -> None:
    spec = make_spec(root)
    health = Health()
    timings = DaemonTimings(probe_interval_s=0.05, probe_timeout_s=0.2, stop_timeout_s=0.1)
    async with running(spec, FakeComputeMode({GPU0: 0}), health, timings) as state:
        assert state.pid is not None
        pid = state.pid
        set_fake_mode(spec, "hang")
        await health.wait_for(GPU0, False)
        set_fake_mode(spec, "normal")
        await health.wait_for(GPU0, True, after=2)
        assert state.pid == pid  # a hung daemon is not restarted
        set_fake_mode(spec, "hang")
        await health.wait_for(GPU0, False, after=3)
        start = trio.current_time()
    # quit went unanswered: SIGTERM after the bounds, not a wait forever.
    assert trio.current_time() - start < 2
    assert commands(spec)[-1] == "quit"
    assert gone(pid)


async def test_refusing_daemon_is_unhealthy(root: Path) -> None:
    spec = make_spec(root)
    health = Health()
    async with running(spec, FakeComputeMode({GPU0: 0}), health):
        set_fake_mode(spec, "refuse")
        await health.wait_for(GPU0, False)
        set_fake_mode(spec, "normal")
        await health.wait_for(GPU0, True, after=2)


async def test_daemon_that_never_answers_lets_start_go_on_unhealthy(root: Path) -> None:
    spec = make_spec(root)
    set_fake_mode(spec, "hang")
    health = Health()
    timings = DaemonTimings(probe_interval_s=0.05, probe_timeout_s=0.25, start_timeout_s=0.5, stop_timeout_s=0.1,
                            restart_first_s=0.05)
    async with running(spec, FakeComputeMode({GPU0: 0}), health, timings) as state:
        assert health.events == [(GPU0, False)]
        assert state.last_exit.startswith("did not answer within 0.5 s")
        set_fake_mode(spec, "normal")
        await health.wait_for(GPU0, True, limit_s=5)
        assert state.starts >= 2


def test_fake_client_without_daemon_fails(root: Path) -> None:
    result = subprocess.run([str(CONTROL)], input="get_default_active_thread_percentage\n", capture_output=True,
                            text=True, timeout=5, check=False,
                            env={"PATH": PATH, "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe")})
    assert result.returncode == 1
    assert "Cannot find MPS control daemon" in result.stderr


# ---------------------------------------------------------------------------------------------------- MpsDaemons


async def test_apply_reconciles_by_diff(root: Path) -> None:
    modes = FakeComputeMode({GPU0: 0, GPU1: 0})
    health = Health()
    a, b = make_spec(root, 0), make_spec(root, 1, mem_mib=20480, pct=50)
    async with trio.open_nursery() as nursery:
        daemons = mps.MpsDaemons(nursery, CONTROL, modes, health, timings=FAST, path_env=PATH)
        with trio.fail_after(5):
            await daemons.apply([a, b])
        assert daemons.healthy == {GPU0: True, GPU1: True}
        pid_a, pid_b = daemons.running[GPU0].state.pid, daemons.running[GPU1].state.pid
        assert "GPU 0: pid" in repr(daemons) and "healthy" in repr(daemons)

        b2 = make_spec(root, 1, mem_mib=20480, pct=40)
        with trio.fail_after(5):
            await daemons.apply([a, b2])
        assert daemons.running[GPU0].state.pid == pid_a  # unchanged: left alone
        assert daemons.running[GPU1].state.pid not in (None, pid_b)  # changed limits: restarted
        assert pid_b is not None and gone(pid_b)
        assert limit_commands(b2)[-1] == "set_default_active_thread_percentage 40"

        pid_b2 = daemons.running[GPU1].state.pid
        with trio.fail_after(5):
            await daemons.apply([a])
        assert daemons.healthy == {GPU0: True}
        assert pid_b2 is not None and gone(pid_b2)
        assert modes.modes[GPU1] == 0

        with pytest.raises(ValueError, match="two MPS daemons"):
            await daemons.apply([a, a])
        with trio.fail_after(5):
            await daemons.stop_all()
        assert pid_a is not None and gone(pid_a)
        assert repr(daemons) == "<MpsDaemons none>"
    assert modes.modes == {GPU0: 0, GPU1: 0}
    assert (GPU0, False) not in health.events  # stopping is not a health event


async def test_apply_goes_on_when_a_daemon_cannot_start(root: Path) -> None:
    health = Health()
    timings = DaemonTimings(restart_first_s=5)
    async with trio.open_nursery() as nursery:
        daemons = mps.MpsDaemons(nursery, Path("/bin/false"), FakeComputeMode({GPU0: 0}), health, timings=timings,
                                 path_env=PATH)
        with trio.fail_after(2):
            await daemons.apply([make_spec(root)])
        assert daemons.healthy == {GPU0: False}
        assert health.events == [(GPU0, False)]
        assert daemons.running[GPU0].state.last_exit == "exited with 1"
        await daemons.stop_all()


async def test_apply_raises_when_the_directories_cannot_be_made(root: Path) -> None:
    (root / "file").write_text("")
    spec = MpsDaemonSpec(GPU0, 0, str(root / "file/pipe"), str(root / "file/log"), 10240, 25)
    async with trio.open_nursery() as nursery:
        daemons = mps.MpsDaemons(nursery, CONTROL, FakeComputeMode({GPU0: 0}), Health(), path_env=PATH)
        with pytest.raises(mps.MpsError, match="cannot create the MPS directories of GPU 0"):
            await daemons.apply([spec])
        assert daemons.running == {}


# ------------------------------------------------------------------------------------------- finding the program


def test_find_control_binary(tmp_path: Path) -> None:
    on_path, driver_root = tmp_path / "bin", tmp_path / "driver"
    for directory in (on_path, driver_root / "usr/bin"):
        directory.mkdir(parents=True)
        program = directory / mps.CONTROL_BINARY
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    assert mps.find_control_binary(driver_root, f"/nonexistent:{on_path}") == on_path / mps.CONTROL_BINARY
    assert mps.find_control_binary(driver_root, "/nonexistent") == driver_root / "usr/bin" / mps.CONTROL_BINARY
    with pytest.raises(mps.MpsError) as info:
        mps.find_control_binary(tmp_path / "none", "/a:/b")
    message = str(info.value)
    assert "Looked on PATH (/a:/b)" in message and str(tmp_path / "none/usr/bin") in message
    assert str(tmp_path / "none/bin") in message


# ------------------------------------------------------------------------------------------------------------ shm

MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a
40 22 0:39 / /run/nvidia/mps rw,relatime - ext4 /dev/sda1 rw
41 40 0:40 / /run/nvidia/mps/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=1024k
42 22 0:41 / /mnt/with\\040space rw - tmpfs tmpfs rw
43 22 0:42 / /stacked rw - tmpfs tmpfs rw
44 43 0:43 / /stacked rw - ext4 /dev/sdb rw
"""


def test_parse_mountinfo() -> None:
    mounts = shm.parse_mountinfo(MOUNTINFO)
    assert mounts[2] == shm.Mount("/run/nvidia/mps/shm", "tmpfs", "shm", "rw,size=1024k")
    assert mounts[3].mount_point == "/mnt/with space"
    assert shm.mount_at(Path("/run/nvidia/mps/shm/"), MOUNTINFO) == mounts[2]
    assert shm.mount_at(Path("/run/nvidia"), MOUNTINFO) is None
    stacked = shm.mount_at(Path("/stacked"), MOUNTINFO)
    assert stacked is not None and stacked.fstype == "ext4"  # the topmost mount wins


def test_default_size_is_half_of_ram() -> None:
    assert shm.default_size_bytes("MemTotal:       16384000 kB\nMemFree: 1 kB\n") == 16384000 * 1024 // 2
    assert shm.default_size_bytes("") == shm.FALLBACK_SIZE_BYTES


def test_ensure_shm_leaves_an_existing_tmpfs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "shm"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"41 40 0:40 / {target} rw - tmpfs shm rw\n")

    def no_mount(*args: object) -> None:
        raise AssertionError("must not mount")

    monkeypatch.setattr(shm, "_mount", no_mount)
    assert shm.ensure_shm(target, mountinfo=mountinfo) is False
    mountinfo.write_text(f"41 40 0:40 / {target} rw - ext4 /dev/sda1 rw\n")
    with pytest.raises(shm.ShmError, match="is a ext4 mount, not a tmpfs"):
        shm.ensure_shm(target, mountinfo=mountinfo)


def test_ensure_shm_without_privilege_says_what_to_provide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []

    def refuse(*args: object) -> None:
        calls.append(args)
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\n")
    monkeypatch.setattr(shm, "_mount", refuse)
    with pytest.raises(shm.ShmError) as info:
        shm.ensure_shm(tmp_path / "shm", mountinfo=tmp_path / "mountinfo", meminfo=tmp_path / "meminfo")
    assert "CAP_SYS_ADMIN" in str(info.value) and "mps.shmFromHost" in str(info.value)
    assert calls == [("tmpfs", str(tmp_path / "shm"), "tmpfs", shm.MS_NOSUID | shm.MS_NODEV | shm.MS_NOEXEC,
                      "size=512000,mode=1777")]
    assert (tmp_path / "shm").is_dir()


def test_ensure_shm_mounts_a_tmpfs(tmp_path: Path) -> None:
    target = tmp_path / "shm"
    try:
        mounted = shm.ensure_shm(target, 1024 * 1024)
    except shm.ShmError as exc:
        pytest.skip(f"cannot mount here: {exc}")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        assert mounted
        assert shm.is_tmpfs(target)
        info = shm.mount_at(target, Path("/proc/self/mountinfo").read_text())
        assert info is not None and "size=1024k" in info.options
        assert shm.ensure_shm(target, 1024 * 1024) is False
    finally:
        assert libc.umount2(str(target).encode(), 0) == 0
    assert not shm.is_tmpfs(target)


# ---------------------------------------------------------------------------- one life, adoption and removal


async def start_life(nursery: trio.Nursery, spec: MpsDaemonSpec, launcher: mps.Launcher,
                     compute_mode: mps.ComputeModeControl, health: Health, state: DaemonState,
                     scope: trio.CancelScope) -> tuple[list[BaseException], trio.Event]:
    """One life in `scope`; returns the list its ending exception (DaemonFailed) lands in, and an event set when
    it has ended."""
    ended: list[BaseException] = []
    done = trio.Event()

    async def life(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            try:
                await mps.run_mps_daemon(spec, control=CONTROL, launcher=launcher, compute_mode=compute_mode,
                                         on_health=health, timings=FAST, path_env=PATH, state=state,
                                         task_status=task_status)
            except mps.DaemonFailed as exc:
                ended.append(exc)
            finally:
                done.set()

    with trio.fail_after(5):
        await nursery.start(life)
    return ended, done


async def test_a_cancelled_life_leaves_the_daemon_and_the_next_life_adopts_it(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nvdp")
    spec = make_spec(root)
    modes = FakeComputeMode({GPU0: 0})
    launcher = mps.LocalLauncher(CONTROL, PATH)
    paths = mps.DaemonPaths.of(spec)
    async with trio.open_nursery() as nursery:
        first = DaemonState()
        scope = trio.CancelScope()
        _, done = await start_life(nursery, spec, launcher, modes, Health(), first, scope)
        pid = first.pid
        assert pid is not None and first.starts == 1 and first.adoptions == 0
        assert read_pid_file(paths) == pid
        scope.cancel()  # nvdp stops supervising it: not a removal
        await done.wait()
        assert not gone(pid) and "quit" not in commands(spec)

        second, health = DaemonState(), Health()
        scope = trio.CancelScope()
        caplog.clear()
        await start_life(nursery, spec, launcher, modes, health, second, scope)
        assert second.pid == pid and second.adoptions == 1 and second.starts == 0
        assert health.events == [(GPU0, True)]
        assert f"adopted the MPS control daemon for GPU 0 (pid {pid})" in caplog.text
        assert len(limit_commands(spec)) == 2  # not sent again
        assert modes.changes == [(GPU0, 3)]  # compute mode untouched by the adoption
        scope.cancel()

        # The removal: quit, pid file gone, compute mode back.
        with trio.fail_after(5):
            await mps.stop_mps_daemon(spec, control=CONTROL, launcher=launcher, compute_mode=modes, timings=FAST,
                                      path_env=PATH)
        assert gone(pid) and commands(spec)[-1] == "quit"
        assert read_pid_file(paths) is None
        assert modes.changes == [(GPU0, 3), (GPU0, 0)]
        # Nothing left to remove: a second removal is a no-op.
        await mps.stop_mps_daemon(spec, control=CONTROL, launcher=launcher, compute_mode=modes, timings=FAST,
                                  path_env=PATH)
        assert modes.changes == [(GPU0, 3), (GPU0, 0)]


async def test_a_life_ends_with_daemon_failed_when_the_daemon_exits(root: Path) -> None:
    spec = make_spec(root)
    launcher = mps.LocalLauncher(CONTROL, PATH)
    health = Health()
    async with trio.open_nursery() as nursery:
        state = DaemonState()
        ended, _ = await start_life(nursery, spec, launcher, FakeComputeMode({GPU0: 0}), health, state,
                                    trio.CancelScope())
        assert state.pid is not None
        os.kill(state.pid, signal.SIGKILL)
        await health.wait_for(GPU0, False)
    assert [str(e) for e in ended] == ["was killed by SIGKILL"]


async def test_a_failed_start_raises_before_started(root: Path) -> None:
    spec = make_spec(root)
    async with trio.open_nursery() as nursery:
        with pytest.raises(mps.DaemonFailed, match="exited with 1"):
            await nursery.start(partial(
                mps.run_mps_daemon, spec, control=Path("/bin/false"), launcher=mps.LocalLauncher(Path("/bin/false"),
                                                                                                  PATH),
                compute_mode=FakeComputeMode({GPU0: 0}), on_health=Health(), timings=FAST, path_env=PATH))


async def test_a_reused_pid_is_not_adopted(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nvdp")
    spec = make_spec(root)
    paths = mps.DaemonPaths.of(spec)
    # The pid file names a live process that is not a control daemon (this test's own process).
    mps.launcher.make_dirs(paths)
    mps.launcher.write_pid_file(paths, os.getpid())
    assert not mps.launcher.is_daemon_process(os.getpid(), paths)
    launcher = mps.LocalLauncher(CONTROL, PATH)
    async with trio.open_nursery() as nursery:
        state = DaemonState()
        await start_life(nursery, spec, launcher, FakeComputeMode({GPU0: 0}), Health(), state, trio.CancelScope())
        assert state.pid not in (None, os.getpid()) and state.starts == 1
        assert "adopted" not in caplog.text
        # Another daemon's pipe directory does not make it ours either.
        other = mps.DaemonPaths(GPU1, str(root / "other/pipe"), paths.log_dir)
        assert mps.launcher.is_daemon_process(state.pid, paths)
        assert not mps.launcher.is_daemon_process(state.pid, other)
        with trio.fail_after(5):
            await mps.stop_mps_daemon(spec, control=CONTROL, launcher=launcher, compute_mode=None, timings=FAST,
                                      path_env=PATH)
        nursery.cancel_scope.cancel()


class BorrowedLauncher(mps.LocalLauncher):
    """Starts daemons like nvdp's own launcher but does not own them (as with the MPS host)."""

    owns_daemons = False


async def test_supervision_ending_without_removal_leaves_the_daemon(root: Path) -> None:
    spec = make_spec(root)
    launcher = BorrowedLauncher(CONTROL, PATH)
    async with trio.open_nursery() as nursery:
        daemons = mps.MpsDaemons(nursery, CONTROL, FakeComputeMode({GPU0: 0}), Health(), timings=FAST,
                                 path_env=PATH, launcher=launcher)
        with trio.fail_after(5):
            await daemons.apply([spec])
        pid = daemons.running[GPU0].state.pid
        await daemons.release()
        nursery.cancel_scope.cancel()
    assert pid is not None and not gone(pid) and "quit" not in commands(spec)
    with trio.fail_after(5):
        await mps.stop_mps_daemon(spec, control=CONTROL, launcher=launcher, compute_mode=None, timings=FAST,
                                  path_env=PATH)
    assert gone(pid)


def test_limits_as_mps_prints_them() -> None:
    from nvdp.mps.control_daemon import _parse_mib, limits_differ

    assert [_parse_mib(t) for t in ("10240M", "10G", "0", "512MB", "2048", "x")] == [10240, 10240, 0, 512, 2048, None]
    assert not limits_differ((25.0, 10240.0), (25.0, 10240.0))
    assert limits_differ((30.0, 10240.0), (25.0, 10240.0))
    assert limits_differ((25.0, 0.0), (25.0, 10240.0))  # never set: a daemon nvdp did not bring up
    # Unreadable (an answer in a form not understood): not a reason to end every client.
    assert not limits_differ((25.0, None), (25.0, 10240.0))


async def test_a_daemon_that_does_not_answer_a_new_life_is_restarted(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nvdp")
    spec = make_spec(root)
    launcher = mps.LocalLauncher(CONTROL, PATH)
    modes = FakeComputeMode({GPU0: 0})
    async with trio.open_nursery() as nursery:
        first = DaemonState()
        scope = trio.CancelScope()
        _, done = await start_life(nursery, spec, launcher, modes, Health(), first, scope)
        old = first.pid
        assert old is not None
        scope.cancel()
        await done.wait()
        set_fake_mode(spec, "hang")  # hung while no nvdp watched it

        async def heal_once_gone() -> None:
            await until(lambda: gone(old), limit_s=5)
            set_fake_mode(spec, "normal")  # the fresh daemon answers

        nursery.start_soon(heal_once_gone)
        second = DaemonState()
        await start_life(nursery, spec, launcher, modes, Health(), second, trio.CancelScope())
        assert second.pid not in (None, old) and second.starts == 1 and second.adoptions == 0
        assert f"(pid {old}) does not answer" in caplog.text
        assert modes.changes == [(GPU0, 3)]  # still exclusive from the first start: not flipped
        with trio.fail_after(5):
            await mps.stop_mps_daemon(spec, control=CONTROL, launcher=launcher, compute_mode=modes, timings=FAST,
                                      path_env=PATH)
        assert modes.changes == [(GPU0, 3), (GPU0, 0)]
        nursery.cancel_scope.cancel()


async def test_mps_daemons_through_the_host_leave_on_shutdown_and_quit_on_removal(root: Path) -> None:
    from nvdp.mps.host import HostLauncher, serve_mps_host

    modes = FakeComputeMode({GPU0: 0})
    spec = make_spec(root)
    async with trio.open_nursery() as host_nursery:
        with trio.fail_after(5):
            socket_path = await host_nursery.start(partial(serve_mps_host, root, control=CONTROL, compute_mode=None,
                                                           path_env=PATH, timings=FAST))
        launcher = HostLauncher(socket_path)
        async with trio.open_nursery() as nursery:
            daemons = mps.MpsDaemons(nursery, CONTROL, modes, Health(), timings=FAST, path_env=PATH,
                                     launcher=launcher)
            with trio.fail_after(5):
                await daemons.apply([spec])
            pid = daemons.running[GPU0].state.pid
            assert pid is not None
            # A removal (the plan no longer wants it): quit, compute mode restored, even though the host owns it.
            with trio.fail_after(5):
                await daemons.apply([])
            assert gone(pid) and commands(spec)[-1] == "quit"
            assert modes.changes == [(GPU0, 3), (GPU0, 0)]
            with trio.fail_after(5):
                await daemons.apply([spec])
            pid = daemons.running[GPU0].state.pid
            assert pid is not None
            nursery.cancel_scope.cancel()  # nvdp's shutdown: the host's daemon stays
        assert not gone(pid) and commands(spec)[-1] != "quit"
        assert modes.changes == [(GPU0, 3), (GPU0, 0), (GPU0, 3)]
        host_nursery.cancel_scope.cancel()  # the host's SIGTERM: the removal
    assert gone(pid) and commands(spec)[-1] == "quit"


async def test_a_daemon_started_as_its_start_is_cancelled_can_still_be_found_and_removed(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM right after the control daemon was spawned (seen once in tests/faults/test_sigterm.py): the pid file is
    written all the same, so the removal finds the daemon instead of leaving it running."""
    spec = make_spec(root)
    paths = mps.DaemonPaths.of(spec)
    make_dirs(paths)
    launcher = mps.LocalLauncher(CONTROL, PATH)
    scope = trio.CancelScope()
    spawn = trio.lowlevel.open_process

    async def spawn_then_cancel(*args: object, **kwargs: object) -> trio.Process:
        process = await spawn(*args, **kwargs)  # type: ignore[arg-type]
        scope.cancel()  # the signal lands now: the daemon exists, nvdp has not recorded it yet
        return process

    monkeypatch.setattr(trio.lowlevel, "open_process", spawn_then_cancel)
    with scope:
        pid = await launcher.start(paths)
    assert read_pid_file(paths) == pid
    with trio.fail_after(5):
        await mps.stop_mps_daemon(spec, control=CONTROL, launcher=launcher, compute_mode=None, timings=FAST,
                                  path_env=PATH)
    assert gone(pid) and read_pid_file(paths) is None
