"""`python -m bench.hostile_grpc [--seconds N] [--only ATTACK ...]`: hostile clients of a plugin socket against nvdp.

Starts `python -m nvdp --simulate` (two GPUs) from the current directory's tree under the kubelet emulator, then
runs each attack for a few seconds while a separate client (the emulator's grpcio channel, as the kubelet) keeps
calling Allocate. Prints, per attack: the daemon's RSS before and after, the attack's volume, and the Allocate
latency of the separate client during the attack (p50/p99/max, errors). Figures for docs/security.md, "Resource
budgets"; not part of `python -m bench` (the attacks need raw HTTP/2, see tests/hostile_h2.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.helpers import gpu, write_node
from tests.hostile_h2 import ALLOCATE, H2Client, allocate_request, grpc_frame

GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reconnecting(path: Path, body: Callable[[H2Client], int], stop: threading.Event) -> int:
    """Run `body` on a connection, again on a new one whenever the server hangs up; the total it counted."""
    total = 0
    while not stop.is_set():
        try:
            with H2Client(path, timeout=2) as client:
                while not stop.is_set():
                    total += body(client)
        except (OSError, ConnectionError, TimeoutError):
            time.sleep(0.01)
        except Exception:
            time.sleep(0.01)
    return total


def rapid_reset(path: Path, stop: threading.Event) -> str:
    def body(client: H2Client) -> int:
        for _ in range(100):
            client.reset(client.open(ALLOCATE))
        if client.h2.open_outbound_streams > 1000:
            raise ConnectionError
        return 100
    return f"{reconnecting(path, body, stop)} streams opened and reset"


def big_message(path: Path, stop: threading.Event) -> str:
    sent = [0]

    def body(client: H2Client) -> int:
        stream_id = client.open(ALLOCATE)
        client.h2.send_data(stream_id, grpc_frame(b"", length=4 * 1024**3 - 1))
        client.flush()
        chunk = b"\0" * 16384
        answer = client.answers[stream_id]
        while not stop.is_set() and answer.status is None and answer.reset is None:
            if client.h2.local_flow_control_window(stream_id) >= len(chunk):
                client.h2.send_data(stream_id, chunk)
                client.flush()
                sent[0] += len(chunk)
            else:
                client.read_once(0.05)
        return 1
    calls = reconnecting(path, body, stop)
    return f"{calls} requests with a 4 GiB length prefix, {sent[0] / 1024**2:.1f} MiB of body taken in"


def ping_flood(path: Path, stop: threading.Event) -> str:
    frames = b"\x00\x00\x08\x06\x00\x00\x00\x00\x0012345678" * 60000
    sent = 0
    while not stop.is_set():
        try:
            with H2Client(path, timeout=0.5) as client:
                view = memoryview(frames)
                while not stop.is_set():
                    sent += client.sock.send(view)
        except (OSError, TimeoutError):
            continue
    return f"{sent / 1024**2:.0f} MiB of PING frames taken in (replies never read)"


def half_open(path: Path, stop: threading.Event) -> str:
    clients: list[H2Client] = []
    streams = 0
    with contextlib.ExitStack() as stack:
        while not stop.is_set() and len(clients) < 200:
            try:
                client = stack.enter_context(H2Client(path, timeout=1))
                for _ in range(100):
                    client.open(ALLOCATE)
                    streams += 1
                clients.append(client)
            except (OSError, Exception):
                time.sleep(0.01)
        stop.wait()
        alive = 0
        for client in clients:
            client.read_once(0.001)
            alive += not client.closed
    return (f"{len(clients)} connections, {streams} streams opened without a request; "
            f"{alive} connections open at the end")


def long_ids(path: Path, stop: threading.Event, size: int = 2 * 1024 * 1024) -> str:
    def body(client: H2Client) -> int:
        client.call(ALLOCATE, grpc_frame(allocate_request("G" * size)), timeout=600)
        return 1
    return f"{reconnecting(path, body, stop)} Allocates of a {size // 1024} KiB unknown ID answered"


def malformed(path: Path, stop: threading.Event) -> str:
    bodies = [b"", grpc_frame(b"x", compressed=True), grpc_frame(b"\x0a\x05", length=100), b"\x00\x00"]

    def body(client: H2Client) -> int:
        for b in bodies:
            client.call(ALLOCATE, b)
        return len(bodies)
    return f"{reconnecting(path, body, stop)} malformed requests answered"


def idle(path: Path, stop: threading.Event) -> str:
    stop.wait()
    return "no attack (the baseline)"


ATTACKS: dict[str, Callable[[Path, threading.Event], str]] = {
    "idle": idle, "rapid-reset": rapid_reset, "big-message": big_message, "ping-flood": ping_flood,
    "half-open": half_open, "long-id": long_ids, "malformed": malformed,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", nargs="+", choices=list(ATTACKS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nvdp-h-") as tmp, KubeletEmulator(Path(tmp) / "dp") as kubelet:
        node = write_node(Path(tmp) / "node.yaml", [gpu(0), gpu(1)])
        process = subprocess.Popen(
            [sys.executable, "-m", "nvdp", "--kubelet-socket", str(kubelet.socket), "--simulate", str(node)],
            env={**os.environ, "METRICS_ADDRESS": "127.0.0.1:0", "LOG_LEVEL": "warning"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert kubelet.wait_for(lambda k: bool(k.devices("nvidia.com/gpu")), 30)
            path = kubelet.plugin_dir / "nvidia-gpu.sock"
            for _ in range(300):
                kubelet.allocate("nvidia.com/gpu", [GPU1])
            print(f"{'attack':<12} {'RSS before':>10} {'after':>8}  Allocate p50/p99/max (ms), errors  volume")
            for name, attack in ATTACKS.items():
                if args.only and name not in args.only:
                    continue
                before = rss_mib(process.pid)
                stop = threading.Event()
                result: list[str] = []
                thread = threading.Thread(target=lambda a=attack, r=result, s=stop: r.append(a(path, s)))
                thread.start()
                latencies, errors = [], 0
                end = time.monotonic() + args.seconds
                time.sleep(0.2)
                while time.monotonic() < end:
                    started = time.perf_counter()
                    try:
                        kubelet.allocate("nvidia.com/gpu", [GPU1], timeout=5)
                        latencies.append((time.perf_counter() - started) * 1000)
                    except Exception:
                        errors += 1
                    time.sleep(0.005)
                stop.set()
                thread.join(120)
                after = rss_mib(process.pid)
                q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
                print(f"{name:<12} {before:>8.1f} M {after:>6.1f} M  {q[49]:.2f}/{q[98]:.2f}/"
                      f"{max(latencies, default=float('nan')):.1f} n={len(latencies)} err={errors}  "
                      f"{result[0] if result else 'attack still running'}", flush=True)
                if process.poll() is not None:
                    print(f"nvdp exited with {process.returncode}")
                    break
        finally:
            process.terminate()
            try:
                _, err = process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            lines = err.splitlines()
            print(f"daemon log: {len(lines)} lines, {sum('Traceback' in line for line in lines)} tracebacks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
