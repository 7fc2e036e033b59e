"""Shared fixtures: simulated nodes, the kubelet emulator (leak-checked, see tests/harness.py), log records."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import trio

from nvdp.nvml import health
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import LogWatch, leak_checked
from tests.helpers import gpu, write_node

#: The NVML event wait's bound in the daemons these tests run in-process. Stopping a daemon no longer waits for the
#: worker thread blocked in that wait (it is abandoned), but the thread lives on until the bound, and the leak check
#: after each test (and the next daemon's `nvmlInit`, which waits for the abandoned wait's deferred shutdown) would
#: wait for it: at the product's 500 ms, every daemon test paid up to ~0.5 s. A shorter bound only makes the health
#: loop go round more often; events are seen as soon as they are anyway.
TEST_EVENT_WAIT_MS = 20


@pytest.fixture(autouse=True)
def _short_nvml_event_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "EVENT_WAIT_MS", TEST_EVENT_WAIT_MS)


#: The same for the daemons the tests start as processes (`python -m nvdp --simulate`), which inherit this: the
#: simulated library caps each wait (nvdp/sim/libnvidia-ml.c). Measurements (bench, soak) run without it.
SIM_WAIT_CAP = "NVDP_SIM_EVENT_WAIT_MAX_MS"
os.environ[SIM_WAIT_CAP] = str(TEST_EVENT_WAIT_MS)


@pytest.fixture
def two_gpu_node(tmp_path: Path) -> Path:
    return write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)], nvlinks=[[0, 1, 12]])


@pytest.fixture(scope="session")
def _grpc_warmed_up() -> None:
    """grpcio opens process-wide descriptors (its event engine) on first use and keeps them: open them once before
    any snapshot, so that the first test does not report them as its leak."""
    with tempfile.TemporaryDirectory(prefix="nvdp-w-") as tmp, KubeletEmulator(Path(tmp) / "dp") as kubelet:
        channel = grpc.insecure_channel(f"unix:{kubelet.socket}")
        grpc.channel_ready_future(channel).result(timeout=5)
        channel.close()


@pytest.fixture
def no_leaks(request: pytest.FixtureRequest, _grpc_warmed_up: None) -> Iterator[None]:
    """Threads, file descriptors and child processes of this process: none new after the test (tests/harness.py).
    Every test with the `kubelet` fixture has it (it is set up before the emulator, torn down after it)."""
    with leak_checked(request):
        yield


@pytest.fixture
def kubelet(no_leaks: None) -> Iterator[KubeletEmulator]:
    # Unix socket paths are limited to 107 bytes and pytest's tmp_path can be long: use a short directory.
    with contextlib.ExitStack() as stack:
        short = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdp-t-")))
        yield stack.enter_context(KubeletEmulator(short / "device-plugins"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths (MPS pipes, plugin sockets) must stay under 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="nvdp-f-") as tmp:
        yield Path(tmp)


@pytest.fixture
async def logs() -> AsyncIterator[LogWatch]:
    """The `nvdp` loggers' records during the test, and `await logs.wait(pattern)` for one to appear."""
    with LogWatch(trio.lowlevel.current_trio_token()).installed() as watch:
        yield watch


@pytest.fixture
def mps_root() -> Iterator[Path]:
    """A short MPS root (the daemon listens on a Unix socket in the pipe directory); daemons a failed test left
    running are killed by their verified pid files (they outlive the tasks that start them)."""
    from tests.test_mps_survival import kill_left_daemons

    with tempfile.TemporaryDirectory(prefix="nvdp-mps-") as directory:
        root = Path(directory)
        try:
            yield root
        finally:
            kill_left_daemons(root)
