"""NVML failing: at init, a GPU falling off the bus, the event wait erroring, a query answering an unexpected code.

The first two go through the fake library (YAML `initError` and `lost`, the events-file `lost` line). The fake has no
hook for a failing `nvmlEventSetWait` or for an arbitrary error code from one call, so those two are injected one
level up, at `nvdp.nvml.adapter`'s `EventSet` (the one module that calls pynvml): the daemon's handling above it is
what is under test, and the missing fake hooks are reported in docs/faults.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from nvdp.core.config.settings import Settings
from nvdp.daemon import StartupError, run_daemon
from nvdp.nvml import adapter
from nvdp.nvml.adapter import NvmlError
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, GPU1, LogWatch, answers, daemon, until, visible
from tests.helpers import gpu, write_node

NVML_ERROR_UNKNOWN = 999
BOTH_HEALTHY = {GPU0: "Healthy", GPU1: "Healthy"}


def settings(node: Path, kubelet: KubeletEmulator, **overrides: object) -> Settings:
    return Settings(simulate=node, kubelet_socket=kubelet.socket, metrics_address="", **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("fail_on_init_error", [True, False])
async def test_init_fails(tmp_path: Path, kubelet: KubeletEmulator, logs: LogWatch, fail_on_init_error: bool) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)], initError=9)  # DRIVER_NOT_LOADED
    s = settings(node, kubelet, fail_on_init_error=fail_on_init_error)
    if fail_on_init_error:
        with pytest.raises(StartupError, match="failed to initialize NVML"):
            with trio.fail_after(10):
                await run_daemon(s, handle_signals=False)
    else:
        async with daemon(s) as servers:
            # Serves nothing and waits (as upstream), without crashing or registering anything: started with no
            # servers, and it said why.
            assert servers is None
            assert logs.matching("failOnInitError is false, so nvdp serves no devices and waits")
            assert not kubelet.registrations
    assert sorted(p.name for p in kubelet.plugin_dir.iterdir()) == ["kubelet.sock"]


async def test_a_gpu_lost_from_the_start(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1, lost=True)])
    async with daemon(settings(node, kubelet)):
        # The lost GPU is never advertised as Healthy; the other one serves.
        await until(kubelet, lambda k: visible(k).get(GPU0) == "Healthy" and visible(k).get(GPU1) != "Healthy")
        await answers(kubelet, "nvidia.com/gpu", GPU0)


async def test_a_gpu_lost_at_run_time(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    events = tmp_path / "events"
    events.write_text("")
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)], eventsFile=str(events))
    async with daemon(settings(node, kubelet, health_quiet_period=0.2)):
        await until(kubelet, lambda k: visible(k) == BOTH_HEALTHY)
        with events.open("a") as f:
            f.write(f"lost {GPU1}\n")
        await until(kubelet, lambda k: visible(k) == {GPU0: "Healthy", GPU1: "Unhealthy"})
        # Permanent: it stays Unhealthy well past the quiet period. The witness that a quiet period has passed and
        # recovery probes ran: an XID on GPU 0, written after GPU 1 was lost, has come and gone (GPU 0 Unhealthy,
        # then Healthy again). Every state the kubelet saw meanwhile is recorded: GPU 1 was never Healthy.
        seen: list[dict[str, str]] = []

        def recovered(k: KubeletEmulator) -> bool:
            seen.append(visible(k))
            return any(state.get(GPU0) == "Unhealthy" for state in seen) and visible(k).get(GPU0) == "Healthy"

        with events.open("a") as f:
            f.write(f"xid {GPU0} 48\n")
        await until(kubelet, recovered, what="GPU 0 Unhealthy after its XID, then recovered after the quiet period")
        assert all(state.get(GPU1) == "Unhealthy" for state in seen), seen
        assert visible(kubelet) == {GPU0: "Healthy", GPU1: "Unhealthy"}
        await answers(kubelet, "nvidia.com/gpu", GPU0)


async def test_event_wait_errors_then_recovers(
    two_gpu_node: Path, kubelet: KubeletEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"left": 0}
    real_wait = adapter.EventSet.wait

    def wait(self: adapter.EventSet, timeout_ms: int) -> object:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise NvmlError(NVML_ERROR_UNKNOWN, "injected: unknown error", "nvmlEventSetWait_v2")
        return real_wait(self, timeout_ms)

    monkeypatch.setattr(adapter.EventSet, "wait", wait)
    async with daemon(settings(two_gpu_node, kubelet, health_quiet_period=0.3)):
        await until(kubelet, lambda k: visible(k) == BOTH_HEALTHY)
        failures["left"] = 3
        # A node-wide fault: every device Unhealthy, then Healthy once the wait works for a quiet period.
        await until(kubelet, lambda k: visible(k) == {GPU0: "Unhealthy", GPU1: "Unhealthy"})
        await until(kubelet, lambda k: visible(k) == BOTH_HEALTHY)
        assert failures["left"] == 0
        await answers(kubelet, "nvidia.com/gpu", GPU1)


async def test_an_unexpected_error_code_marks_only_that_gpu(
    two_gpu_node: Path, kubelet: KubeletEmulator, monkeypatch: pytest.MonkeyPatch, logs: LogWatch
) -> None:
    real_register = adapter.EventSet.register

    def register(self: adapter.EventSet, gpu_uuid: str, *args: object) -> None:
        if gpu_uuid == GPU1:
            raise NvmlError(NVML_ERROR_UNKNOWN, "injected: unknown error", "nvmlDeviceRegisterEvents")
        real_register(self, gpu_uuid, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(adapter.EventSet, "register", register)
    async with daemon(settings(two_gpu_node, kubelet, health_quiet_period=0.2)):
        await until(kubelet, lambda k: visible(k) == {GPU0: "Healthy", GPU1: "Unhealthy"})
        # Its recovery probe registers it again, fails again (twice: the witness), and it stays Unhealthy; GPU 0
        # is untouched: the kubelet got no ListAndWatch update meanwhile.
        endpoint = kubelet.endpoint("nvidia.com/gpu")
        assert endpoint is not None
        updates = endpoint.updates
        await logs.wait(rf"registering {GPU1} for health events failed again", count=2)
        assert kubelet.endpoint("nvidia.com/gpu") is endpoint and endpoint.updates == updates
        assert visible(kubelet) == {GPU0: "Healthy", GPU1: "Unhealthy"}
        await answers(kubelet, "nvidia.com/gpu", GPU0)
