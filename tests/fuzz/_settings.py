"""Hypothesis settings shared by the fuzz suite: reproducible in CI, scalable by hand.

Every fuzz test states its own example count through `fuzz_settings()`, sized so that the whole directory runs in
well under a minute on a 2-core CI machine. `derandomize=True` makes each run draw the same examples (a CI failure
reproduces locally with the same command), and `database=None` keeps hypothesis from writing `.hypothesis/` into a
clean clone. For a longer, randomised run by hand:

    NVDP_FUZZ_SCALE=20 NVDP_FUZZ_RANDOM=1 .venv/bin/pytest -m slow tests/fuzz

The example counts recorded in docs/reliability.md are the CI ones (scale 1).
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("NVDP_FUZZ_SCALE", "1")))
RANDOM = os.environ.get("NVDP_FUZZ_RANDOM", "") not in ("", "0")


def fuzz_settings(max_examples: int, deadline_ms: int | None = 2000) -> settings:
    """Settings for one fuzz test. `deadline_ms` bounds each example: a config or request that makes nvdp take
    seconds is a finding (a hang), not noise, so it fails the test rather than being averaged away."""
    return settings(
        max_examples=max_examples * SCALE,
        deadline=None if deadline_ms is None else timedelta(milliseconds=deadline_ms),
        derandomize=not RANDOM,
        database=None,
        # The servers and fixtures are set up once per test, outside hypothesis: that is the point, not a mistake.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
        print_blob=True,
    )
