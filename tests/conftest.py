"""Shared fixtures: simulated nodes and the kubelet emulator."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdp.kubelet.emulator import KubeletEmulator
from nvdp.nvml import health
from tests.helpers import gpu, write_node


@pytest.fixture
def two_gpu_node(tmp_path: Path) -> Path:
    return write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)], nvlinks=[[0, 1, 12]])


@pytest.fixture
def kubelet() -> Iterator[KubeletEmulator]:
    # Unix socket paths are limited to 107 bytes and pytest's tmp_path can be long: use a short directory.
    with contextlib.ExitStack() as stack:
        short = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdp-t-")))
        yield stack.enter_context(KubeletEmulator(short / "device-plugins"))


#: The NVML event wait's bound in the daemons these tests run in-process. Stopping a daemon waits for the worker
#: thread blocked in that wait: at the product's 500 ms, every daemon test paid ~0.5 s in its teardown. A shorter
#: bound only makes the health loop go round more often; events are seen as soon as they are anyway.
TEST_EVENT_WAIT_MS = 20


@pytest.fixture(autouse=True)
def _short_nvml_event_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "EVENT_WAIT_MS", TEST_EVENT_WAIT_MS)
