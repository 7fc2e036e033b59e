"""`nvdp mps-host`: its request protocol and bounds in-process, and, as processes, nvdp driving it: nvdp's SIGTERM
leaves the daemons (they are the host's), the host's SIGTERM removes them."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from nvdp import sim
from nvdp.mps.control_daemon import DaemonTimings
from nvdp.mps.host import MAX_REQUEST, HostLauncher, parse_request, paths_for, serve_mps_host
from nvdp.mps.launcher import DaemonPaths, LaunchError, is_daemon_process, read_pid_file
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.test_mps_survival import (
    GPU0,
    LIMIT_S,
    PATH,
    Client,
    Nvdp,
    answers,
    gone,
    kill_left_daemons,
    registered,
    until,
)

CONTROL = Path(sim.__file__).parent / "nvidia-cuda-mps-control"
FAST = DaemonTimings(probe_interval_s=0.05, probe_timeout_s=0.5, start_timeout_s=2.0, stop_timeout_s=0.5)


@pytest.fixture
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nvdp-h-") as directory:
        try:
            yield Path(directory)
        finally:
            kill_left_daemons(Path(directory))


# ---------------------------------------------------------------------------------------------- the protocol


def test_requests_are_validated(root: Path) -> None:
    op, paths, _ = parse_request(json.dumps({"op": "find", "gpu": GPU0}).encode(), root)
    assert (op, paths) == ("find", DaemonPaths(GPU0, str(root / GPU0 / "pipe"), str(root / GPU0 / "log")))
    refused = {
        b"not json": "not a JSON object",
        b"[1]": "not a JSON object",
        json.dumps({"op": "exec", "gpu": GPU0}).encode(): "op must be one of",
        json.dumps({"op": "start", "gpu": "../../etc"}).encode(): "gpu must be a GPU UUID",
        json.dumps({"op": "start", "gpu": GPU0, "argv": ["/bin/sh"]}).encode(): "unknown fields: argv",
        json.dumps({"op": "start", "gpu": GPU0, "pipe_dir": "/tmp/x"}).encode(): "must use the same MPS root",
        json.dumps({"op": "wait", "gpu": GPU0, "pid": 1}).encode(): "pid must be a process id",
        json.dumps({"op": "wait", "gpu": GPU0, "pid": True}).encode(): "pid must be a process id",
        json.dumps({"op": "kill", "gpu": GPU0, "pid": 1234, "signal": "HUP"}).encode(): "signal must be one of",
    }
    for line, message in refused.items():
        with pytest.raises(Exception, match=message):
            parse_request(line, root)


@asynccontextmanager
async def host(root: Path) -> AsyncIterator[Path]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(LIMIT_S):
            socket_path = await nursery.start(partial(serve_mps_host, root, control=CONTROL, compute_mode=None,
                                                      path_env=PATH, timings=FAST))
        yield socket_path
        nursery.cancel_scope.cancel()


async def raw(socket_path: Path, data: bytes) -> dict[str, object]:
    stream = await trio.open_unix_socket(str(socket_path))
    async with stream:
        await stream.send_all(data)
        received = b""
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            # The host closed with our unread bytes still queued: the kernel resets the connection, and the
            # answer may be lost with it.
            return {"ok": False, "error": "reset"}
    answer: dict[str, object] = json.loads(received)
    return answer


async def test_host_starts_finds_waits_and_refuses(root: Path) -> None:
    paths = paths_for(root, GPU0)
    async with host(root) as socket_path:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        # Bounded: a request line longer than MAX_REQUEST is refused without reading on.
        answer = await raw(socket_path, b"x" * (MAX_REQUEST * 4) + b"\n")
        assert answer["ok"] is False and answer["error"] in (f"request longer than {MAX_REQUEST} bytes", "reset")
        answer = await raw(socket_path, json.dumps({"op": "start", "gpu": "GPU-x"}).encode() + b"\n")
        assert answer["ok"] is False

        launcher = HostLauncher(socket_path)
        with trio.fail_after(LIMIT_S):
            assert await launcher.find(paths) is None
            pid = await launcher.start(paths)
            assert read_pid_file(paths) == pid
            await until_async(lambda: answers(Path(paths.pipe_dir)))
            assert await launcher.find(paths) == pid
            with pytest.raises(LaunchError, match="already runs"):
                await launcher.start(paths)
            # Only the daemon's own pid can be signalled.
            with pytest.raises(LaunchError, match="is not the control daemon"):
                await launcher._request({"op": "kill", "gpu": GPU0, "pid": os.getpid(), "signal": "KILL"})
            async with trio.open_nursery() as nursery:
                exits: list[str] = []

                async def wait() -> None:
                    exits.append(await launcher.wait(paths, pid))

                nursery.start_soon(wait)
                await launcher.kill(paths, pid, signal.SIGKILL)
            assert exits == ["was killed by SIGKILL"]
            assert gone(pid)
            pid = await launcher.start(paths)
            await until_async(lambda: answers(Path(paths.pipe_dir)))
    # The host's end is a removal: the daemon was quit.
    assert gone(pid)
    assert read_pid_file(paths) is None
    assert (root / GPU0 / "commands.log").read_text().splitlines()[-1] == "quit"
    assert not socket_path.exists()
    with pytest.raises(LaunchError, match="not reachable"):
        await HostLauncher(socket_path).find(paths)


async def test_a_second_host_does_not_steal_the_socket_and_a_stale_one_is_replaced(root: Path) -> None:
    async with host(root) as socket_path:
        with pytest.raises(LaunchError, match="another MPS host already listens"):
            await serve_mps_host(root, control=CONTROL, compute_mode=None, path_env=PATH)
        assert await HostLauncher(socket_path).find(paths_for(root, GPU0)) is None  # the first still serves
    # A socket file left by a host killed with SIGKILL: nothing answers on it, so the next host replaces it.
    import socket as stdlib_socket

    with stdlib_socket.socket(stdlib_socket.AF_UNIX) as stale:
        stale.bind(str(socket_path))
    async with host(root) as again:
        assert again == socket_path
        assert await HostLauncher(socket_path).find(paths_for(root, GPU0)) is None


async def until_async(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(LIMIT_S):
        while not predicate():  # noqa: ASYNC110  (the daemon is another process)
            await trio.sleep(0.02)


# ------------------------------------------------------------------------------------------- as processes


@pytest.mark.slow  # the host and nvdp as processes, each stopped: a long scenario
def test_nvdp_sigterm_leaves_the_hosts_daemon_and_the_hosts_sigterm_removes_it(
    kubelet: KubeletEmulator, two_gpu_node: Path, mps_root: Path, tmp_path: Path
) -> None:
    from tests.test_mps_survival import CONFIG

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    env = {**os.environ, "PATH": PATH, "METRICS_ADDRESS": ""}
    socket_path = mps_root / "nvdp-mps-host.sock"
    state = mps_root / GPU0
    paths = paths_for(mps_root, GPU0)
    processes: list[Nvdp] = []

    def start(*args: str) -> Nvdp:
        process = Nvdp(list(args), env)
        processes.append(process)
        return process

    def start_nvdp() -> Nvdp:
        return start("--simulate", str(two_gpu_node), "--kubelet-socket", str(kubelet.socket), "--config-file",
                     str(config), "--mps-root", str(mps_root), "--mps-host-socket", str(socket_path))

    client = None
    try:
        mps_host = start("mps-host", "--mps-root", str(mps_root), "--simulate", str(two_gpu_node))
        mps_host.wait_for_line("MPS host: serving")
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600

        first = start_nvdp()
        until(lambda: registered(kubelet, 1), f"nvdp registered\n{first.out}\n{mps_host.out}")
        pid = read_pid_file(paths)
        assert pid is not None and is_daemon_process(pid, paths)
        # The daemon is the host's child, not nvdp's.
        ppid = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("PPid:")))
        assert ppid == mps_host.process.pid
        assert f"started the MPS control daemon for {GPU0}: pid {pid}" in mps_host.out
        client = Client(state / "pipe")
        assert client.ask() == "OK 25.0"

        # nvdp's clean SIGTERM: a restart, not a removal. The daemon and its client carry on.
        assert first.end(signal.SIGTERM) == 0, first.out
        assert "stopping the MPS control daemon" not in first.out
        assert is_daemon_process(pid, paths) and client.ask() == "OK 25.0"
        assert "quit" not in (state / "commands.log").read_text().splitlines()

        second = start_nvdp()
        until(lambda: registered(kubelet, 2), f"second nvdp registered\n{second.out}")
        second.wait_for_line(f"adopted the MPS control daemon for GPU 0 (pid {pid})")
        assert client.ask() == "OK 25.0"
        assert second.end(signal.SIGKILL) == -signal.SIGKILL

        # The host's SIGTERM: the removal. Quit, pid file gone, compute mode restored.
        assert mps_host.end(signal.SIGTERM) == 0, mps_host.out
        assert gone(pid)
        assert read_pid_file(paths) is None
        assert (state / "commands.log").read_text().splitlines()[-1] == "quit"
        assert f"restored compute mode DEFAULT on GPU {GPU0}" in mps_host.out
        assert not socket_path.exists()
        assert client.ask().startswith("ERR")
    finally:
        if client is not None:
            client.close()
        for process in processes:
            if process.process.poll() is None:
                process.end(signal.SIGKILL)


@pytest.mark.slow
def test_a_bare_host_killed_and_started_again_keeps_the_daemon_and_nvdp_adopts_it_again(
    kubelet: KubeletEmulator, two_gpu_node: Path, mps_root: Path, tmp_path: Path
) -> None:
    from tests.test_mps_survival import CONFIG, SLICED

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    env = {**os.environ, "PATH": PATH, "METRICS_ADDRESS": ""}
    socket_path = mps_root / "nvdp-mps-host.sock"
    paths = paths_for(mps_root, GPU0)
    processes: list[Nvdp] = []

    def start(*args: str) -> Nvdp:
        process = Nvdp(list(args), env)
        processes.append(process)
        return process

    def slices(health: str) -> bool:
        return set(kubelet.devices(SLICED).values()) == {health}

    try:
        first_host = start("mps-host", "--mps-root", str(mps_root), "--simulate", str(two_gpu_node))
        first_host.wait_for_line("MPS host: serving")
        nvdp = start("--simulate", str(two_gpu_node), "--kubelet-socket", str(kubelet.socket), "--config-file",
                     str(config), "--mps-root", str(mps_root), "--mps-host-socket", str(socket_path))
        until(lambda: registered(kubelet, 1), f"nvdp registered\n{nvdp.out}")
        pid = read_pid_file(paths)
        assert pid is not None

        # A bare host process (no container or unit to take its children along) dies: its daemon runs on.
        assert first_host.end(signal.SIGKILL) == -signal.SIGKILL
        until(lambda: slices("Unhealthy"), f"slices Unhealthy without the host\n{nvdp.out}")
        assert is_daemon_process(pid, paths) and answers(Path(paths.pipe_dir))
        second_host = start("mps-host", "--mps-root", str(mps_root), "--simulate", str(two_gpu_node))
        second_host.wait_for_line(f"found the control daemon for {GPU0} (pid {pid}) running; it is kept")
        until(lambda: slices("Healthy"), f"slices Healthy again\n{nvdp.out}")
        assert read_pid_file(paths) == pid
        assert f"adopted the MPS control daemon for GPU 0 (pid {pid})" in nvdp.out
        assert "started the MPS control daemon" not in second_host.out

        assert nvdp.end(signal.SIGTERM) == 0
        assert is_daemon_process(pid, paths)
        assert second_host.end(signal.SIGTERM) == 0, second_host.out
        assert gone(pid)
    finally:
        for process in processes:
            if process.process.poll() is None:
                process.end(signal.SIGKILL)


def test_mps_host_needs_an_mps_root() -> None:
    import subprocess

    result = subprocess.run([sys.executable, "-m", "nvdp", "mps-host"], capture_output=True, text=True,
                            timeout=LIMIT_S, env={**os.environ, "MPS_ROOT": ""}, check=False)
    assert result.returncode == 1
    assert "needs an absolute MPS root" in result.stderr
