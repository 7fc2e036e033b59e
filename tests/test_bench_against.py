"""`python -m bench --against PATH`: a foreign device plugin through the same scenarios, in alternating order, with
nvdp/foreign ratios. There is no Go toolchain here, so `tests/upstream_standin` plays NVIDIA's plugin: nvdp started
as the benchmark starts the Go binary (upstream's flags, sockets in /var/lib/kubelet/device-plugins/ inside a
private mount namespace, NVML from LD_LIBRARY_PATH), so every step of that path runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.against import Foreign, namespace_problem
from bench.harness import Unavailable
from tests.helpers import ROOT
from tests.test_bench_quick import BENCH_ENV

STANDIN = ROOT / "tests" / "upstream_standin"


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(tmp_path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=BENCH_ENV | {"NVDP_STANDIN_PYTHON": sys.executable})


@pytest.mark.slow
def test_against_runs_the_foreign_plugin_through_startup_and_base_and_reports_ratios(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--only", "startup", "base", "--against", str(STANDIN))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [json_file] = tmp_path.glob("quick-*.json")
    data = json.loads(json_file.read_text())
    assert data["against"] == str(STANDIN)
    figures = data["figures"]
    compared = ("startup.process", "shutdown.sigterm_to_exit", "allocate.whole_gpu", "allocate.cpu_per_call",
                "allocate.concurrent",
                "memory.rss_registered", "memory.rss_after_allocates", "startup.kubelet_restart")
    problem = namespace_problem()
    if problem is not None:
        # Not root here: said, not failed, and nvdp's own figures are still measured.
        assert figures["against:startup"]["status"] == "unavailable" and problem in figures["against:startup"]["reason"]
        assert all(figures[key]["status"] == "ok" for key in compared)
        return
    for key in compared:
        assert figures[key]["status"] == "ok", key
        assert figures["against:" + key]["status"] == "ok", (key, figures.get("against:" + key))
        assert "target" not in figures["against:" + key]  # targets are nvdp's
    # nvdp's start-up without .pyc is nvdp's alone: the foreign plugin is a binary.
    assert "against:startup.process_uncompiled" not in figures
    table = json_file.with_suffix(".md").read_text()
    assert "| Figure | Stat | nvdp | Go | nvdp/Go | Unit |" in table
    # The stand-in is nvdp: it served the same devices, and its Allocate answered (the figure checks the response).
    assert figures["against:allocate.whole_gpu"]["summary"]["p50"]["median"] > 0


def test_against_refuses_a_path_that_is_not_an_executable(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--only", "startup", "--against", str(tmp_path / "missing"))
    assert result.returncode == 2 and "not an executable file" in result.stderr


def test_without_root_the_foreign_plugin_is_unavailable_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(Unavailable, match="needs root"):
        Foreign(tmp_path, tmp_path / "node.yaml", binary=STANDIN).start()
