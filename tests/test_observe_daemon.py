"""Observability end to end: nvdp as a process, its /metrics, /healthz, /readyz and JSON logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import LIMIT_S, settle
from tests.helpers import gpu, write_node

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"


def wait_until(predicate: object) -> bool:
    """Polls the process's endpoints (there is nothing to wait on across processes) for at most LIMIT_S."""
    return settle(predicate, LIMIT_S, poll_s=0.05)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_probes_and_json_logs_follow_the_daemon(tmp_path: Path, no_leaks: None) -> None:
    events = tmp_path / "xids"
    events.write_text("")
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)], eventsFile=str(events))
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="nvdp-o-") as short:
        kubelet = KubeletEmulator(Path(short) / "device-plugins")
        process = subprocess.Popen(
            [sys.executable, "-m", "nvdp", "--simulate", str(node), "--kubelet-socket", str(kubelet.socket),
             "--config-file", str(config)],
            env={**os.environ, "METRICS_ADDRESS": f"127.0.0.1:{port}", "LOG_FORMAT": "json"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # No kubelet yet: alive, not ready, and it says why.
            assert wait_until(lambda: get(base + "/healthz")[0] == 200)
            assert wait_until(lambda: get(base + "/readyz") == (
                503, "not registered with the kubelet: nvidia.com/gpu\n"))

            kubelet.start()
            assert wait_until(lambda: get(base + "/readyz")[0] == 200)
            assert kubelet.wait_for(lambda k: len(k.devices("nvidia.com/gpu")) == 2, LIMIT_S)
            text = get(base + "/metrics")[1]
            assert value(text, "nvdp_devices", resource="nvidia.com/gpu", health="Healthy") == 2
            assert value(text, "nvdp_config_generation") == 1
            allocs = value(text, "nvdp_allocate_duration_seconds_count", resource="nvidia.com/gpu")

            kubelet.allocate("nvidia.com/gpu", [GPU0])
            text = get(base + "/metrics")[1]
            assert value(text, "nvdp_allocate_duration_seconds_count", resource="nvidia.com/gpu") == allocs + 1

            with events.open("a") as f:
                # 13 is ignored by the default health policy: counted, with critical="false", and nothing changes.
                f.write(f"xid {GPU1} 13\n")
                f.write(f"xid {GPU0} 48\n")
            assert wait_until(lambda: value(get(base + "/metrics")[1], "nvdp_devices", resource="nvidia.com/gpu",
                                            health="Unhealthy") == 1)
            text = get(base + "/metrics")[1]
            assert value(text, "nvdp_xid_events_total", uuid=GPU0, xid="48", critical="true") == 1
            assert value(text, "nvdp_xid_events_total", uuid=GPU1, xid="13", critical="false") == 1

            config.write_text("version: v1\nflags:\n  plugin:\n    deviceIDStrategy: index\n")
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: value(get(base + "/metrics")[1], "nvdp_config_generation") == 2)
        finally:
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=LIMIT_S)
            kubelet.stop()
    assert process.returncode == 0, out
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("received SIGTERM" in r["message"] for r in records)
