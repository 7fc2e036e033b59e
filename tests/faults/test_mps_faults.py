"""MPS control daemons misbehaving under the running daemon: killed again and again, hung, refusing commands, and
their pipe directory removed. The fake `nvidia-cuda-mps-control` (nvdp/sim) takes its fault mode from
`<mps root>/<GPU uuid>/fake-mode`."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest

import nvdp.mps
from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import resolve
from nvdp.mps import MpsDaemons
from nvdp.mps.control_daemon import DaemonTimings
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, GPU1, answers, daemon, process_gone, until

# The supervision's periods, shortened so each fault is noticed in a fraction of a second (defaults: 1 s probes,
# 5 s stop bound); what happens is the same.
FAST = DaemonTimings(probe_interval_s=0.05, probe_timeout_s=0.3, start_timeout_s=3.0, stop_timeout_s=0.3,
                     restart_first_s=0.05, restart_max_s=0.5)
SLICED = "nvidia.com/gpu-10gb"
SLICES = {f"{GPU0}::10::0", f"{GPU0}::10::1"}


def slices(k: KubeletEmulator) -> set[str]:
    return set(k.devices(SLICED).values())


@asynccontextmanager
async def mps_daemon(node: Path, kubelet: KubeletEmulator, mps_root: Path,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    """The daemon with GPU 0 MPS-shared in two 10 GB slices; yields GPU 0's MPS state directory. On the way out:
    the control daemon was told to quit, is gone, and GPU 0's compute mode is back to what it was."""
    # The controller imports the MPS code when a plan first needs it, from `nvdp.mps`.
    monkeypatch.setattr(nvdp.mps, "MpsDaemons", partial(MpsDaemons, timings=FAST))
    config = parse_config("version: v1\nsharing:\n  mps:\n    resources:\n"
                          "    - {name: nvidia.com/gpu, rename: gpu-10gb, memoryGB: 10, replicas: 2, devices: ['0']}\n",
                          "config.yaml")
    s = resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "mps_root": str(mps_root),
                 "metrics_address": ""}, {}, config)
    state = mps_root / GPU0
    pids: list[int] = []
    async with daemon(s, search_path=os.environ["PATH"]):
        await until(kubelet, lambda k: set(k.devices(SLICED)) == SLICES and slices(k) == {"Healthy"})
        # The fake NVML logs every compute-mode change in its work directory, which goes with the daemon: keep a
        # second name for the log so it can be read afterwards.
        mode_log = Path(os.environ["NVDP_SIM_STATE"]).parent / "compute-mode.log"
        kept = mps_root / "compute-mode.log"
        os.link(mode_log, kept)
        yield state
        pids.append(json.loads((state / "daemon-env.json").read_text())["pid"])
    # Gone: told to quit, or (hung) terminated after the bounded wait. no_leaks also finds no child left.
    assert all(process_gone(pid) for pid in pids)
    changes = [line.split()[1:] for line in kept.read_text().splitlines()]
    assert changes[0] == [GPU0, "3"] and changes[-1] == [GPU0, "0"], changes


def current_pid(state: Path) -> int:
    pid: int = json.loads((state / "daemon-env.json").read_text())["pid"]
    return pid


@pytest.mark.slow  # a daemon killed again and again, each restart waited for
async def test_control_daemon_killed_repeatedly(
    two_gpu_node: Path, kubelet: KubeletEmulator, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with mps_daemon(two_gpu_node, kubelet, short_dir, monkeypatch) as state:
        for _ in range(5):
            pid = current_pid(state)
            os.kill(pid, signal.SIGKILL)
            await until(kubelet, lambda k: slices(k) == {"Unhealthy"}, what="slices Unhealthy after the kill")
            await until(kubelet, lambda k, pid=pid: slices(k) == {"Healthy"} and current_pid(state) != pid,
                        what="restarted and Healthy")
            assert process_gone(pid)
        # The whole GPU next to it never noticed.
        assert kubelet.devices("nvidia.com/gpu") == {GPU1: "Healthy"}
        await answers(kubelet, SLICED, f"{GPU0}::10::1", visible_as=GPU0)


# A hung daemon is only judged hung after its probe timeouts run out in real time (~3 s): the slow lane.
@pytest.mark.parametrize("mode", [pytest.param("hang", marks=pytest.mark.slow), "refuse"])
async def test_control_daemon_hung_or_refusing(
    two_gpu_node: Path, kubelet: KubeletEmulator, short_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    async with mps_daemon(two_gpu_node, kubelet, short_dir, monkeypatch) as state:
        (state / "fake-mode").write_text(mode)
        await until(kubelet, lambda k: slices(k) == {"Unhealthy"}, what=f"slices Unhealthy in mode {mode}")
        await answers(kubelet, "nvidia.com/gpu", GPU1)
        (state / "fake-mode").write_text("normal")
        await until(kubelet, lambda k: slices(k) == {"Healthy"}, what="Healthy again")
        if mode == "hang":
            # Hung again at shutdown: `quit` goes unanswered, and the bounded stop still ends it.
            (state / "fake-mode").write_text("hang")
            await until(kubelet, lambda k: slices(k) == {"Unhealthy"})


async def test_pipe_directory_removed(
    two_gpu_node: Path, kubelet: KubeletEmulator, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with mps_daemon(two_gpu_node, kubelet, short_dir, monkeypatch) as state:
        shutil.rmtree(state / "pipe")
        # The control socket is gone with it: the daemon no longer answers, and its slices say so.
        await until(kubelet, lambda k: slices(k) == {"Unhealthy"}, what="slices Unhealthy without a pipe")
        await answers(kubelet, "nvidia.com/gpu", GPU1)
        # Expected: the daemon is restarted (directories re-created) and the slices recover.
        await until(kubelet, lambda k: slices(k) == {"Healthy"}, 3.0, what="Healthy again after a restart")
