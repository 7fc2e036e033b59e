"""`python -m bench.dra` in a tiny mode: it runs end to end on this tree and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.test_bench_quick import BENCH_ENV


@pytest.mark.slow
def test_the_dra_benchmark_runs_and_reports_its_figures() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.dra", "--rounds", "3", "--warmup", "1", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=BENCH_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["startup"]["devices"] == 4  # bench.nodes.four_gpus, every GPU DRA's
    assert figures["startup"]["registered"] > 0 and figures["startup"]["slices"] > 0
    for call in ("prepare", "unprepare"):
        assert figures[call]["n"] == 3
        assert 0 < figures[call]["p50"] <= figures[call]["p99"]
    assert set(figures["loadavg"]) == {"before", "after"}
