"""A node without GPUs, with failOnInitError=false: serving nothing is the intended state, so `/readyz` answers
200 with why (helm --wait and kubectl rollout status finish), and the log says it once."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import trio

from nvdp.core.config.settings import Settings
from nvdp.daemon import NO_GPU
from nvdp.observe.http import ProbeState
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import LogWatch, daemon
from tests.helpers import gpu, write_node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_no_gpu_is_ready_with_the_reason(tmp_path: Path, kubelet: KubeletEmulator, logs: LogWatch) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0)], initError=9)  # NVML cannot start: no driver, no GPU
    port = free_port()
    probes = ProbeState()
    settings = Settings(simulate=node, kubelet_socket=kubelet.socket, fail_on_init_error=False,
                        metrics_address=f"127.0.0.1:{port}")
    async with daemon(settings, probes=probes) as servers:
        assert servers is None
        assert probes.readiness() == (True, NO_GPU)
        assert probes.health() == (True, "ok")
        assert await trio.to_thread.run_sync(get, f"http://127.0.0.1:{port}/readyz") == (200, NO_GPU + "\n")
        assert await trio.to_thread.run_sync(get, f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        said = [m for m in logs.messages() if NO_GPU in m]
        assert len(said) == 1 and "failed to initialize NVML" in said[0]
        assert not kubelet.registrations
