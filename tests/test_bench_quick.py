"""The benchmark's smoke test: `python -m bench --quick` runs end to end on this tree, so it never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

#: Every figure the issue asks for; each must be in the JSON, measured or marked unavailable with a reason.
FIGURES = {
    "allocate.whole_gpu", "allocate.time_slicing", "allocate.mps", "allocate.four_gpu_volume_mounts",
    "preferred.nvlink8_size2", "preferred.nvlink8_size4", "health.xid_to_unhealthy", "reload.file",
    "reload.file_broken_unchanged_streams", "reload.node_label", "reload.node_label_broken_unchanged_streams",
    "startup.process", "startup.kubelet_restart", "memory.rss_registered", "memory.rss_after_allocates",
    "memory.rss_growth", "idle_cpu.default", "idle_cpu.health_checks_disabled", "scale.list_and_watch_encode",
    "scale.startup", "scale.allocate", "scale.rss_registered",
    # issue 17
    "allocate.cpu_per_call", "allocate.concurrent", "startup.process_uncompiled", "shutdown.sigterm_to_exit",
    "memory.rss_after_restarts", "memory.rss_growth_total",
}


#: The benchmark measures: the simulated NVML waits as asked, not capped as for the tests (tests/conftest.py).
BENCH_ENV = {k: v for k, v in os.environ.items() if k != "NVDP_SIM_EVENT_WAIT_MAX_MS"} | {"PYTHONWARNINGS": "error"}


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180,
                            env=BENCH_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [json_file] = tmp_path.glob("quick-*.json")
    data = json.loads(json_file.read_text())
    assert data["mode"] == "quick"
    assert {"host", "cpu", "cpus", "python", "commit"} <= set(data["machine"])
    assert set(data["figures"]) == FIGURES
    for key, figure in data["figures"].items():
        assert figure["status"] in ("ok", "unavailable"), (key, figure)
        if figure["status"] == "ok":
            assert figure["summary"] and all({"min", "median", "max"} == set(s) for s in figure["summary"].values())
        else:
            assert figure["reason"], key
    # The figures whose features are all in the tree are always measured (the fake API server needs the test
    # extras, which this test runs with).
    for key in ("allocate.whole_gpu", "allocate.four_gpu_volume_mounts", "preferred.nvlink8_size4",
                "startup.process", "startup.process_uncompiled", "shutdown.sigterm_to_exit",
                "memory.rss_after_restarts", "memory.rss_growth_total", "allocate.cpu_per_call",
                "memory.rss_registered", "idle_cpu.default", "scale.list_and_watch_encode",
                "reload.file", "reload.file_broken_unchanged_streams", "reload.node_label",
                "reload.node_label_broken_unchanged_streams"):
        assert data["figures"][key]["status"] == "ok", key
    # A reload, by file or by node label, never breaks the stream of a resource it does not change.
    for key in ("reload.file_broken_unchanged_streams", "reload.node_label_broken_unchanged_streams"):
        assert data["figures"][key]["summary"]["value"]["max"] == 0, data["figures"][key]
    # The encode figure is per update; the one-time encoder build is reported apart.
    assert "encode_build_ms" in data["figures"]["scale.list_and_watch_encode"]["summary"]
    assert "| Figure |" in json_file.with_suffix(".md").read_text()


def test_the_simulated_nodes_files_go_to_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/performance.md: the benchmark's nvdp gets a TMPDIR of its own on tmpfs (where `--simulate` writes the
    node's files), removed with it; one the scenario sets is kept."""
    from bench import harness

    started: list[dict[str, str]] = []

    class Exited:
        pid, returncode = 0, 0

        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            started.append(kwargs["env"])

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(harness.subprocess, "Popen", Exited)
    monkeypatch.setattr(harness, "SCRATCH_PARENT", str(tmp_path))
    with harness.Nvdp(tmp_path, tmp_path / "node.yaml"):
        scratch = Path(started[0]["TMPDIR"])
        assert scratch.parent == tmp_path and scratch.is_dir()
    assert not scratch.exists()
    with harness.Nvdp(tmp_path, tmp_path / "node.yaml", env={"TMPDIR": "/elsewhere"}):
        assert started[1]["TMPDIR"] == "/elsewhere"
    monkeypatch.undo()  # the real parent: /dev/shm where it is writable
    assert ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None) == harness.SCRATCH_PARENT
