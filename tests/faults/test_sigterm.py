"""SIGTERM at random moments (fixed seeds): during start-up, during registration, during a reload. `nvdp` runs as a
process with an MPS-shared GPU; afterwards: exit 0, no socket left, no MPS control daemon left, compute mode
restored.

The fake NVML logs compute-mode changes in the daemon's private sim work directory, which the daemon removes on its
way out and whose path the node YAML cannot set. So the process is `nvdp` behind a few lines that copy that log to
$NVDP_FAULTS_MODE_LOG just before the directory goes (WRAPPER): nothing else of nvdp changes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, LIMIT_S, process_gone, settle

WRAPPER = """
import os, shutil, sys, tempfile
cleanup = tempfile.TemporaryDirectory.cleanup
def keep_mode_log(self):
    log = os.path.join(self.name, "compute-mode.log")
    if os.path.basename(self.name).startswith("nvdp-sim-") and os.path.exists(log):
        shutil.copyfile(log, os.environ["NVDP_FAULTS_MODE_LOG"])
    cleanup(self)
tempfile.TemporaryDirectory.cleanup = keep_mode_log
from nvdp.__main__ import main  # what `python -m nvdp` and the `nvdp` script run: its early SIGTERM handler too
sys.exit(main())
"""

MPS_CONFIG = ("version: v1\nflags:\n  plugin:\n    deviceIDStrategy: {strategy}\nsharing:\n  mps:\n    resources:\n"
              "    - {{name: nvidia.com/gpu, rename: gpu-10gb, memoryGB: 10, replicas: 2, devices: ['0']}}\n")
#: Three moments in the default lane, all ten in the slow lane (each is a process start and stop).
SEEDS = [pytest.param(seed, marks=pytest.mark.slow) if seed >= 3 else seed for seed in range(10)]
#: SIGTERM after line 1 ("starting") to line 17: the daemon prints ~16 up to "ready", so the last moments are "ready".
MOMENTS = 17


@pytest.mark.parametrize("seed", SEEDS)
def test_sigterm_at_a_random_moment(
    seed: int, two_gpu_node: Path, kubelet: KubeletEmulator, short_dir: Path
) -> None:
    rng = random.Random(seed)
    config = short_dir / "config.yaml"
    config.write_text(MPS_CONFIG.format(strategy="uuid"))
    mps_root = short_dir / "mps"
    mode_log = short_dir / "compute-mode.log"
    env = {**os.environ, "METRICS_ADDRESS": "127.0.0.1:0", "NVDP_FAULTS_MODE_LOG": str(mode_log),
           # The venv's python3 first: the fake MPS control program starts with `#!/usr/bin/env python3`.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    process = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "--simulate", str(two_gpu_node), "--kubelet-socket", str(kubelet.socket),
         "--config-file", str(config), "--mps-root", str(mps_root)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # "Start-up" is measured from the daemon's first line: before it, Python is still importing and no handler
        # exists (see test_sigterm_before_the_daemon_runs).
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "starting" in first, first
        lines: list[str] = [first]
        # The signal watcher runs before the metrics endpoint starts: SIGHUP is only sent after that line, as an
        # earlier one would meet the default action (bug 5 in docs/faults.md).
        watching = threading.Event()

        def read() -> None:
            for line in process.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if "serving /metrics" in line:
                    watching.set()

        def printed(count: int) -> Callable[[], bool]:
            """The daemon has printed `count` lines, or is ready (it prints nothing more until signalled)."""
            return lambda: len(lines) >= count or any("ready: every resource" in line for line in lines)

        reader = threading.Thread(target=read, name="nvdp-output", daemon=True)
        reader.start()
        # The moment is the daemon's progress, not a time: SIGTERM as soon as its `term_after`-th line is read (from
        # "starting" to "ready" it prints ~16: NVML, MPS daemons, servers, registrations), so every seed hits the
        # same phase on any machine.
        term_after = rng.randint(1, MOMENTS)
        reload_after = rng.randint(3, term_after) if term_after >= 3 and rng.random() < 0.5 else None
        if reload_after is not None:
            # A reload that changes the Allocate responses (every server restarts), then SIGTERM while it runs.
            assert settle(lambda: watching.is_set() and printed(reload_after)(), LIMIT_S), "".join(lines)
            config.write_text(MPS_CONFIG.format(strategy="index"))
            process.send_signal(signal.SIGHUP)
        assert settle(printed(term_after), LIMIT_S, poll_s=0.001), "".join(lines)
        process.send_signal(signal.SIGTERM)
        process.wait(LIMIT_S)
        reader.join(LIMIT_S)
        process.stdout.close()
        out = "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdout is not None and not process.stdout.closed:
            process.stdout.close()
    moment = f"seed {seed}: SIGTERM after line {term_after}, reload after line {reload_after}"
    assert process.returncode == 0, f"{moment}: exit code {process.returncode}\n{out}"
    left = sorted(p.name for p in kubelet.plugin_dir.iterdir() if p.name != "kubelet.sock")
    # Reported bug (test_known_bugs.py::test_a_server_cancelled_while_binding_removes_its_socket): SIGTERM while a
    # server is binding leaves that server's socket. Tolerated only in that window (before every server is up);
    # remove this once fixed.
    starting = "ready: every resource is registered" not in out.split("received SIGTERM")[0]
    assert not left or starting, f"{moment}: sockets left: {left}\n{out}"
    if left:
        print(f"{moment}: tolerated (reported bug): sockets left {left}")
    state = mps_root / GPU0
    if (state / "daemon-env.json").exists():
        pid = json.loads((state / "daemon-env.json").read_text())["pid"]
        assert process_gone(pid), f"{moment}: MPS control daemon {pid} left running\n{out}"
    if mode_log.exists():
        last: dict[str, str] = {}
        for line in mode_log.read_text().splitlines():
            _, uuid, mode = line.split()
            last[uuid] = mode
        assert all(mode == "0" for mode in last.values()), f"{moment}: compute modes left {last}\n{out}"
    else:
        # The sim directory never existed (SIGTERM before NVML started): then no MPS daemon could have either.
        assert not (state / "daemon-env.json").exists(), f"{moment}\n{out}"
    print(f"{moment}: exit 0, {'MPS started' if (state / 'daemon-env.json').exists() else 'before MPS'}")


def test_sigterm_before_the_daemon_runs(two_gpu_node: Path, kubelet: KubeletEmulator) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "nvdp", "--simulate", str(two_gpu_node), "--kubelet-socket", str(kubelet.socket)],
        env={**os.environ, "METRICS_ADDRESS": "127.0.0.1:0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # The interpreter is up and nvdp's first handler is installed (SIGTERM is caught: /proc says so); nvdp's
    # imports, a few hundred ms, are not done.
    assert settle(lambda: catches_sigterm(process.pid), LIMIT_S, poll_s=0.001)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=LIMIT_S)
    assert process.returncode == 0, out
    assert b"starting" not in out, out  # it was before the daemon ran


def catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False
