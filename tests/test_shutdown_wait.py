"""Shutdown never waits for an NVML event wait (issue 17): a real driver's `nvmlEventSetWait` ends only at its
timeout, so the daemon abandons the waiting thread, and the adapter keeps NVML safe: the set is freed, and
`nvmlShutdown` called, by that thread once the wait returns, never while it is inside NVML.

The fake wait below blocks until the test releases it, so "exit did not wait" is shown by order, not by a clock:
the daemon is gone while the wait is still blocked."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pynvml
import pytest
import trio

from nvdp.core.config.settings import Settings
from nvdp.nvml import adapter
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import LIMIT_S, daemon, eventually


class BlockingWait:
    """Stands in for `nvmlEventSetWait_v2`: blocks until released, then times out as the driver would; records the
    order of the NVML calls that matter for a safe shutdown."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.order: list[str] = []
        real_free, real_shutdown = pynvml.nvmlEventSetFree, pynvml.nvmlShutdown

        def free(event_set: Any) -> None:
            self.order.append("nvmlEventSetFree")
            real_free(event_set)

        def shutdown() -> None:
            self.order.append("nvmlShutdown")
            real_shutdown()

        monkeypatch.setattr(pynvml, "nvmlEventSetWait_v2", self.wait)
        monkeypatch.setattr(pynvml, "nvmlEventSetFree", free)
        monkeypatch.setattr(pynvml, "nvmlShutdown", shutdown)

    def wait(self, event_set: Any, timeout_ms: int) -> Any:
        self.order.append("wait entered")
        self.entered.set()
        if not self.released.wait(LIMIT_S) or len(self.order) > 1:
            time.sleep(timeout_ms / 1000)  # later waits (of a second daemon): an ordinary quiet timeout
        self.order.append("wait returned")
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)


async def test_exit_does_not_wait_for_an_event_wait_and_nvml_shuts_down_after_it(
        two_gpu_node: Path, kubelet: KubeletEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = BlockingWait(monkeypatch)
    try:
        async with daemon(Settings(simulate=two_gpu_node, kubelet_socket=kubelet.socket)):
            await eventually(fake.entered.is_set, "the health loop waiting for NVML events")
        # The daemon has returned (exit code 0, every task gone) while the wait is still blocked inside "NVML".
        assert not fake.released.is_set()
        assert adapter.waits_in_flight() == 1
        # Neither the set nor NVML itself was released under the waiting thread.
        assert fake.order == ["wait entered"]
        # Its sockets are gone already: shutdown did not stop half-way.
        assert not list(kubelet.socket.parent.glob("nvidia-*.sock"))
    finally:
        fake.released.set()
    # Once the wait returns, its thread frees the set and then shuts NVML down: in that order, each once.
    await eventually(lambda: "nvmlShutdown" in fake.order, "the deferred nvmlShutdown")
    assert fake.order == ["wait entered", "wait returned", "nvmlEventSetFree", "nvmlShutdown"]
    assert adapter.waits_in_flight() == 0


async def test_a_new_session_after_an_abandoned_wait_starts_from_a_real_init(
        two_gpu_node: Path, kubelet: KubeletEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process restarts (tests, the demo): `init` while a shutdown is still deferred lets it finish first, so
    the second daemon reads its node afresh instead of inheriting a session that is about to be shut down."""
    fake = BlockingWait(monkeypatch)
    async with daemon(Settings(simulate=two_gpu_node, kubelet_socket=kubelet.socket)):
        await eventually(fake.entered.is_set, "the health loop waiting for NVML events")
    real_init = pynvml.nvmlInit

    def init() -> None:
        fake.order.append("nvmlInit")
        real_init()

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    async with trio.open_nursery() as nursery:
        # Released while the second daemon starts: its init must wait for the first session's shutdown.
        nursery.start_soon(trio.to_thread.run_sync, fake.released.set)
        async with daemon(Settings(simulate=two_gpu_node, kubelet_socket=kubelet.socket)):
            pass
    # Without the hand-over the second init would have found NVML "initialized" and called nothing, and the first
    # session's deferred shutdown would then have shut NVML down under the second daemon.
    first_shutdown = fake.order.index("nvmlShutdown")
    assert fake.order[first_shutdown - 2:first_shutdown + 2] == [
        "wait returned", "nvmlEventSetFree", "nvmlShutdown", "nvmlInit"], fake.order
