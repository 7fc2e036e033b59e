"""nvdp.observe.status: `nvdp status` against a served Metrics, and a clear failure when nothing answers."""

from __future__ import annotations

import socket

import pytest
import trio
from prometheus_client import generate_latest

from nvdp.observe.http import ProbeState, serve_http
from nvdp.observe.metrics import Metrics
from nvdp.observe.status import Probe, Samples, base_url, render, status_main
from tests.observe_fixtures import GPU0, GPU1, inventory, plan


async def run_status(address: str) -> int:
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(status_main, address)


async def test_status_prints_what_the_daemon_serves(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = Metrics()
    metrics.plan_applied(plan(replicas=2, mps=True), inventory(), "default", 3, 0.1)
    metrics.registered("nvidia.com/gpu")
    metrics.allocate_observed("nvidia.com/gpu", 0.001)
    metrics.health_changed(plan(replicas=2, mps=True), {f"{GPU1}::0": "XID 48 (double-bit ECC error)"})
    metrics.xid(GPU1, 48)
    metrics.xid(GPU0, 13, critical=False)
    metrics.mps_daemon(GPU1, True, 0.0042)
    metrics.reload_failed("broken", "bad")
    state = ProbeState()
    state.set_pending({"nvidia.com/gpu.shared"})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, "127.0.0.1:0", metrics, state)
        assert await run_status(f"127.0.0.1:{port}") == 0
        nursery.cancel_scope.cancel()
    out = capsys.readouterr().out
    assert "health:  ok" in out
    assert "ready:   no (not registered with the kubelet: nvidia.com/gpu.shared)" in out
    assert "config:  default, generation 3" in out and "0 applied, 1 failed (the last reload was REJECTED)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("nvidia.com/")}
    assert rows["nvidia.com/gpu"][1:4] == ["1", "0", "1"]  # healthy, unhealthy, registrations
    assert rows["nvidia.com/gpu.shared"][1:4] == ["1", "1", "0"]
    assert rows["nvidia.com/gpu"][-2:] == ["1", "0"]  # allocate calls, errors
    gpu_rows = {line.split()[1]: line for line in out.splitlines() if line.startswith(("0 ", "1 "))}
    assert "gpu=1" in gpu_rows[GPU0] and "gpu.shared=2" in gpu_rows[GPU1] and gpu_rows[GPU1].rstrip().endswith("1 (1)")
    assert gpu_rows[GPU0].rstrip().endswith("1 (0)")  # every XID counts; in parentheses the critical ones
    assert f"{GPU1}  {GPU1}  XID 48 (double-bit ECC error)" in out
    assert "4.2 ms" in out


def test_an_mps_daemon_with_no_probe_yet_says_so() -> None:
    metrics = Metrics()
    metrics.plan_applied(plan(replicas=2, mps=True), inventory(), "default", 1, 0.1)
    metrics.mps_daemon(GPU1, True, None)
    samples = Samples.parse(generate_latest(metrics.registry).decode())
    text = render(samples, Probe(True, ""), Probe(True, ""))
    row = next(line for line in text.splitlines() if line.startswith(GPU1))
    assert "up, not probed yet" in row


async def test_unreachable_is_exit_1_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert await run_status(f"127.0.0.1:{port}") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nvdp status: cannot reach nvdp at http://127.0.0.1:{port}")


def test_bad_address_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert status_main("nonsense") == 1
    assert "invalid address" in capsys.readouterr().err


def test_base_url() -> None:
    assert base_url(":9400") == "http://127.0.0.1:9400"
    assert base_url("[::1]:9400") == "http://[::1]:9400"


def test_dra_claims_and_slices_show_in_a_table_of_their_own() -> None:
    metrics = Metrics()
    metrics.plan_applied(plan(replicas=1), inventory(), "default", 1, 0.1)
    metrics.slices_published("gpu.nvidia.com", 3, 1, 2)
    metrics.slice_write("gpu.nvidia.com", "update", ok=False)
    metrics.dra_call("prepare", 0.01, claims=3, failed=1)
    metrics.dra_call("unprepare", 0.01, claims=2, failed=0)
    samples = Samples.parse(generate_latest(metrics.registry).decode())
    text = render(samples, Probe(True, ""), Probe(True, ""))
    assert "DRA DRIVER" in text
    row = next(line for line in text.splitlines() if line.startswith("gpu.nvidia.com"))
    assert row.split()[1:] == ["2", "3", "1", "2", "1", "2", "0"]
    # Without DRA, no table.
    plain = Metrics()
    plain.plan_applied(plan(replicas=1), inventory(), "default", 1, 0.1)
    assert "DRA DRIVER" not in render(Samples.parse(generate_latest(plain.registry).decode()), Probe(True, ""),
                                      Probe(True, ""))
