"""nvdp.observe.http: a real trio server on 127.0.0.1:0, spoken to with a raw socket client. No thread is involved:
the tests run on trio's MockClock (autojump), so request timeouts cost no real time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from nvdp.observe import http
from nvdp.observe.http import ProbeState, parse_address, serve_http
from nvdp.observe.metrics import Metrics
from nvdp.observe.status import Samples
from tests.harness import LIMIT_S
from tests.observe_fixtures import GPU0, inventory, plan


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes, split status, headers and body."""
    with trio.fail_after(LIMIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def get(port: int, path: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    return await request(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics()
    metrics.plan_applied(plan(), inventory(), "default", 1, 0.1)
    return metrics


@pytest.fixture
async def served(metrics: Metrics) -> AsyncIterator[tuple[int, ProbeState]]:
    state = ProbeState()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, "127.0.0.1:0", metrics, state)
        yield port, state
        nursery.cancel_scope.cancel()


async def test_readyz_is_503_until_registration_then_200(
    served: tuple[int, ProbeState], autojump_clock: trio.testing.MockClock
) -> None:
    port, state = served
    status, headers, body = await get(port, "/readyz")
    assert status == 503
    assert body.decode().count("\n") == 1 and "registered" in body.decode()
    state.set_pending({"nvidia.com/gpu"})
    status, _, body = await get(port, "/readyz")
    assert (status, body) == (503, b"not registered with the kubelet: nvidia.com/gpu\n")
    state.set_pending(())
    status, headers, body = await get(port, "/readyz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"


async def test_healthz_follows_alive_and_nvml(
    served: tuple[int, ProbeState], autojump_clock: trio.testing.MockClock
) -> None:
    port, state = served
    assert (await get(port, "/healthz"))[0] == 200  # liveness does not wait for registration
    state.nvml_ok = False
    status, _, body = await get(port, "/healthz")
    assert (status, body) == (503, b"NVML does not answer\n")
    state.set_pending(())
    assert (await get(port, "/readyz"))[0] == 503  # not ready while unhealthy either
    state.nvml_ok, state.alive = True, False
    assert (await get(port, "/healthz"))[0] == 503


async def test_metrics_parse_and_change_after_an_allocate_and_an_xid(
    served: tuple[int, ProbeState], metrics: Metrics, autojump_clock: trio.testing.MockClock
) -> None:
    port, _ = served
    status, headers, body = await get(port, "/metrics?x=1")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) == len(body)
    before = Samples.parse(body.decode())
    assert before.value("nvdp_allocate_duration_seconds_count", resource="nvidia.com/gpu") == 0
    metrics.allocate_observed("nvidia.com/gpu", 0.001)
    metrics.xid(GPU0, 79)
    after = Samples.parse((await get(port, "/metrics"))[2].decode())
    assert after.value("nvdp_allocate_duration_seconds_count", resource="nvidia.com/gpu") == 1
    assert after.value("nvdp_xid_events_total", uuid=GPU0, xid="79") == 1


async def test_openmetrics_when_asked_for(
    served: tuple[int, ProbeState], autojump_clock: trio.testing.MockClock
) -> None:
    port, _ = served
    status, headers, body = await get(port, "/metrics", "Accept: application/openmetrics-text;version=1.0.0\r\n")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_head_unknown_paths_methods_and_garbage(
    served: tuple[int, ProbeState], autojump_clock: trio.testing.MockClock
) -> None:
    port, _ = served
    status, headers, body = await request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert (await get(port, "/nope"))[0] == 404
    status, headers, _ = await request(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await request(port, b"hello\r\n\r\n"))[0] == 400
    big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (http.MAX_HEAD_BYTES + 10) + b"\r\n\r\n"
    assert (await request(port, big))[0] == 431
    # The server survives all of that.
    assert (await get(port, "/healthz"))[0] == 200


async def test_a_silent_client_is_cut_off(
    served: tuple[int, ProbeState], monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    port, _ = served
    monkeypatch.setattr(http, "REQUEST_TIMEOUT_S", 0.2)
    with trio.fail_after(LIMIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # never finishes its headers
            assert await stream.receive_some(1024) == b""  # closed by the server after the timeout


async def test_over_the_limit_the_oldest_connection_is_shed_not_the_new_one(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 1)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, "127.0.0.1:0", metrics, ProbeState())
        with trio.fail_after(LIMIT_S):
            async with await trio.open_tcp_stream("127.0.0.1", port) as hog:
                assert (await get(port, "/healthz"))[0] == 200  # the newcomer is answered...
                assert await hog.receive_some(1024) == b""  # ...and the idle hog was closed to make room
        nursery.cancel_scope.cancel()


async def test_an_empty_address_disables_the_endpoint(metrics: Metrics, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(serve_http, "", metrics, ProbeState()) is None


@pytest.mark.parametrize(("text", "expected"), [
    (":9400", (None, 9400)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:9400", ("::1", 9400)),
    ("node.example:80", ("node.example", 80)),
])
def test_parse_address(text: str, expected: tuple[str | None, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9400", "host:", ":http", "::1:9400", ":70000"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        parse_address(text)
