"""Shared fixtures: simulated nodes and the kubelet emulator."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdp.testing.kubelet_emulator import KubeletEmulator
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
