"""The fault-injection suite runs on the shared harness (tests/harness.py): every scenario here is leak-checked,
with or without the kubelet emulator. The names below are re-exported for the modules that import them from here."""

from __future__ import annotations

import pytest

from tests.harness import (  # noqa: F401 (re-exported)
    GPU0,
    GPU1,
    answers,
    daemon,
    describe,
    plugin_connection_leak,
    process_gone,
    until,
    visible,
)


@pytest.fixture(autouse=True)
def _leak_checked(no_leaks: None) -> None:
    """Every fault scenario, with or without the kubelet emulator, runs under the leak checker."""
