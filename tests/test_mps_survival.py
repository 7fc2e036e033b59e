"""MPS clients outlive nvdp: `nvdp` as a process on a simulated MPS node, killed with SIGKILL and started again.

What is checked is what an operator sees from outside: the control daemon's pid file and process, its answers to a
client that was started before the kill, the kubelet's view of the slices, and nvdp's log. Every wait is for one of
those observables, bounded by a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nvdp.mps.launcher import DaemonPaths, is_daemon_process, process_state, read_pid_file
from nvdp.testing.kubelet_emulator import KubeletEmulator

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"
SLICED = "nvidia.com/gpu-10gb"
SLICES = {f"{GPU0}::10::0": "Healthy", f"{GPU0}::10::1": "Healthy"}
CONFIG = ("version: v1\nsharing:\n  mps:\n    resources:\n"
          "    - {name: nvidia.com/gpu, rename: gpu-10gb, memoryGB: 10, replicas: 2, devices: ['0']}\n")
# The venv's python3 first: the fake control program's `#!/usr/bin/env python3` then starts fast.
PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])
#: The bound on every wait below (a loaded 2-core machine starts a Python process in a second or two).
LIMIT_S = 30.0


def until(predicate: Callable[[], bool], what: str, limit_s: float = LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    # Polling: the observables are files and processes of other processes, with nothing to wait on.
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit_s:.0f} s: {what}")
        time.sleep(0.02)


class Nvdp:
    """`python -m nvdp` with its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "nvdp", *args], env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str) -> None:
        until(lambda: text in self.out, f"{text!r} in the log\n{self.out}")

    def end(self, signum: int) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(LIMIT_S)
        self._reader.join(LIMIT_S)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


class Client:
    """A long-lived MPS "client": one process, started once, that asks the daemon on its pipe directory whenever it
    is told to (a line on stdin) and prints the answer."""

    CODE = """
import socket, sys
for line in sys.stdin:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sys.argv[1])
            s.sendall(b"get_default_active_thread_percentage\\n")
            s.shutdown(socket.SHUT_WR)
            print(s.makefile().read().strip() or "no answer", flush=True)
        except OSError as exc:
            print(f"ERR {exc}", flush=True)
"""

    def __init__(self, pipe_dir: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE, str(pipe_dir / "control")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("ask\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(LIMIT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()


def answers(pipe_dir: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(pipe_dir / "control"))
            s.sendall(b"get_default_active_thread_percentage\n")
            s.shutdown(socket.SHUT_WR)
            return s.makefile().read().startswith("OK ")
        except OSError:
            return False


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (already dead, waiting for its parent to reap it) is gone too.
    return process_state(pid) in (None, "Z", "X")


def kill_left_daemons(root: Path) -> None:
    """Whatever daemon a failed test left running under `root`: by its pid file, never by name."""
    for pid_file in root.glob("*/log/control-daemon.pid"):
        paths = DaemonPaths(pid_file.parent.parent.name, str(pid_file.parent.parent / "pipe"), str(pid_file.parent))
        pid = read_pid_file(paths)
        if pid is not None and is_daemon_process(pid, paths):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def start(kubelet: KubeletEmulator, two_gpu_node: Path, mps_root: Path, tmp_path: Path) -> Iterator[
        Callable[..., Nvdp]]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    started: list[Nvdp] = []

    def start_nvdp(*args: str, env: dict[str, str] | None = None) -> Nvdp:
        nvdp = Nvdp(["--simulate", str(two_gpu_node), "--kubelet-socket", str(kubelet.socket), "--config-file",
                     str(config), "--mps-root", str(mps_root), *args],
                    {**os.environ, "PATH": PATH, "METRICS_ADDRESS": "", **(env or {})})
        started.append(nvdp)
        return nvdp

    yield start_nvdp
    for nvdp in started:
        if nvdp.process.poll() is None:
            nvdp.end(signal.SIGKILL)


def registered(kubelet: KubeletEmulator, count: int) -> bool:
    """`count` registrations of the sliced resource so far, the last one serving both slices, Healthy."""
    return (sum(1 for r in kubelet.registrations if r.resource == SLICED) >= count
            and kubelet.devices(SLICED) == SLICES
            and kubelet.devices("nvidia.com/gpu") == {GPU1: "Healthy"})


def limit_commands(state: Path) -> list[str]:
    return [c for c in (state / "commands.log").read_text().splitlines() if c.startswith("set_")]


@pytest.mark.slow  # nvdp started, killed and started again as processes: a long scenario
def test_kill_9_of_nvdp_leaves_the_daemon_and_its_client_and_a_new_nvdp_adopts_it(
    start: Callable[..., Nvdp], kubelet: KubeletEmulator, mps_root: Path
) -> None:
    state = mps_root / GPU0
    paths = DaemonPaths(GPU0, str(state / "pipe"), str(state / "log"))
    first = start()
    until(lambda: registered(kubelet, 1), f"first nvdp registered\n{first.out}")
    pid = read_pid_file(paths)
    assert pid is not None and is_daemon_process(pid, paths), first.out
    assert (state / "log" / "control-daemon.out").exists()
    limits = limit_commands(state)
    assert limits == ["set_default_device_pinned_mem_limit 0 10240M", "set_default_active_thread_percentage 25"]
    client = Client(state / "pipe")
    try:
        assert client.ask() == "OK 25.0"

        assert first.end(signal.SIGKILL) == -signal.SIGKILL
        # nvdp is gone; its daemon and the daemon's client are not.
        assert not gone(pid) and is_daemon_process(pid, paths)
        assert client.ask() == "OK 25.0"

        second = start()
        until(lambda: registered(kubelet, 2), f"second nvdp registered\n{second.out}")
        second.wait_for_line(f"adopted the MPS control daemon for GPU 0 (pid {pid})")
        assert read_pid_file(paths) == pid and is_daemon_process(pid, paths)
        assert limit_commands(state) == limits  # adopted as it runs: not even the limits were sent again
        assert "started the MPS control daemon" not in second.out
        assert "set compute mode" not in second.out  # compute mode untouched while clients run
        assert client.ask() == "OK 25.0"
        # The new nvdp probes it like its own (the witness that it supervises it, not only found it).
        probes = (state / "commands.log").read_text().count("get_default_active_thread_percentage")
        until(lambda: (state / "commands.log").read_text().count("get_default_active_thread_percentage")
              > probes + 1, "the adopted daemon probed")
        response = kubelet.allocate(SLICED, [f"{GPU0}::10::1"])
        assert response.container_responses[0].envs["CUDA_MPS_PIPE_DIRECTORY"] == str(state / "pipe")

        # A daemon killed while nvdp is down is started again by the next nvdp.
        assert second.end(signal.SIGKILL) == -signal.SIGKILL
        assert client.ask() == "OK 25.0"
        os.kill(pid, signal.SIGKILL)
        until(lambda: gone(pid), "the daemon killed")
        assert client.ask().startswith("ERR")
        third = start()
        until(lambda: registered(kubelet, 3), f"third nvdp registered\n{third.out}")
        new_pid = read_pid_file(paths)
        assert new_pid not in (None, pid) and is_daemon_process(new_pid, paths), third.out
        assert f"started the MPS control daemon for GPU 0 ({GPU0}): pid {new_pid}" in third.out
        assert "adopted" not in third.out
        assert answers(state / "pipe") and client.ask() == "OK 25.0"

        # A clean SIGTERM of nvdp with the local launcher is a removal: the daemon is quit, its pid file gone.
        assert third.end(signal.SIGTERM) == 0, third.out
        assert new_pid is not None and gone(new_pid)
        assert read_pid_file(paths) is None
        assert (state / "commands.log").read_text().splitlines()[-1] == "quit"
        assert "restored compute mode" in third.out
    finally:
        client.close()


@pytest.mark.slow
def test_a_daemon_serving_other_limits_is_restarted(
    start: Callable[..., Nvdp], kubelet: KubeletEmulator, mps_root: Path
) -> None:
    state = mps_root / GPU0
    paths = DaemonPaths(GPU0, str(state / "pipe"), str(state / "log"))
    first = start()
    until(lambda: registered(kubelet, 1), f"first nvdp registered\n{first.out}")
    pid = read_pid_file(paths)
    assert pid is not None
    assert first.end(signal.SIGKILL) == -signal.SIGKILL
    # Someone changed the daemon's limits while nvdp was down.
    subprocess.run([str(Path(__file__).parents[1] / "nvdp/sim/nvidia-cuda-mps-control")],
                   input="set_default_active_thread_percentage 30\n", text=True, check=True, capture_output=True,
                   env={"PATH": PATH, "CUDA_MPS_PIPE_DIRECTORY": str(state / "pipe")}, timeout=LIMIT_S)
    second = start()
    until(lambda: registered(kubelet, 2), f"second nvdp registered\n{second.out}")
    assert "serves active thread percentage 30 and pinned memory limit 10240 MiB, the plan wants active thread " \
           "percentage 25 and pinned memory limit 10240 MiB: restarting it" in second.out
    new_pid = read_pid_file(paths)
    assert new_pid not in (None, pid) and gone(pid)
    assert limit_commands(state)[-1] == "set_default_active_thread_percentage 25"
    assert second.end(signal.SIGTERM) == 0
