"""A kubelet.sock that misbehaves must not stop nvdp (issue 14, item 1), with nvdp as a separate process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from nvdp.kubelet.api import v1beta1 as api
from nvdp.kubelet.registration import MAX_REASON_CHARS, RegistrationError, register
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import settle
from tests.helpers import gpu, write_node

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"


class RudeKubelet:
    """Listens on kubelet.sock and closes every connection it accepts, at once or after a few bytes of garbage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accepted = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(16)
        self._server.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rude-kubelet")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                if self.accepted % 2:
                    conn.sendall(b"\x00\x00\x04\x07\x00\x00\x00\x00\x00not http/2")
                self.accepted += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._server.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def nvdp_process(short_dir: Path) -> Iterator[tuple[KubeletEmulator, RudeKubelet, subprocess.Popen[str]]]:
    kubelet = KubeletEmulator(short_dir / "device-plugins")  # not started: the rude one holds kubelet.sock first
    kubelet.plugin_dir.mkdir(mode=0o750)
    rude = RudeKubelet(kubelet.socket)
    node = write_node(short_dir / "node.yaml", [gpu(0), gpu(1)])
    process = subprocess.Popen(
        [sys.executable, "-m", "nvdp", "--kubelet-socket", str(kubelet.socket), "--simulate", str(node)],
        env={**os.environ, "METRICS_ADDRESS": "127.0.0.1:0"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield kubelet, rude, process
    finally:
        rude.stop()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)
        kubelet.stop()


@pytest.mark.slow
def test_a_kubelet_socket_that_hangs_up_on_every_connection_does_not_stop_nvdp(
    nvdp_process: tuple[KubeletEmulator, RudeKubelet, subprocess.Popen[str]],
) -> None:
    kubelet, rude, process = nvdp_process
    # Registration retries 0.5 s, 1 s, 2 s, ...: four refusals (both kinds, twice) take about 3.5 s.
    assert settle(lambda: rude.accepted >= 4 or process.poll() is not None, 20), rude.accepted
    assert process.poll() is None, f"nvdp exited with {process.returncode}"
    # The real kubelet comes up in its place: kubelet.sock is created again and nvdp registers at once.
    rude.stop()
    kubelet.start()
    assert kubelet.wait_for(lambda k: k.devices("nvidia.com/gpu") == {GPU0: "Healthy", GPU1: "Healthy"}, 20)
    assert kubelet.allocate("nvidia.com/gpu", [GPU1]).container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == GPU1
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=10)
    assert process.returncode == 0, out
    assert "registering nvidia.com/gpu failed" in out, out
    print(f"kubelet.sock hung up on {rude.accepted} registration attempts; nvdp then registered")


def test_a_kubelets_refusal_cannot_forge_log_lines_or_flood_them(short_dir: Path) -> None:
    """Whatever text kubelet.sock answers a Register with goes into the log through RegistrationError: cut, escaped."""
    refusal = "no\nERROR forged line\x1b[2J" + "x" * 5000

    def refuse(request: api.RegisterRequest, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)

    path = short_dir / "kubelet.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubelet-emulator"))
    handler = grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=api.RegisterRequest.parse)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("v1beta1.Registration", {"Register": handler}),))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        with pytest.raises(RegistrationError) as error:
            asyncio.run(register(path, "nvidia-gpu.sock", "nvidia.com/gpu"))
    finally:
        server.stop(grace=None).wait(5)
    text = str(error.value)
    assert text.startswith("kubelet refused nvidia.com/gpu: no\\nERROR forged line\\x1b[2J"), text
    assert text.isprintable() and len(text) < MAX_REASON_CHARS + 80, text
