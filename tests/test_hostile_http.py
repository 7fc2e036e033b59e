"""Issue 14 items 2, 11 and 12 (the metrics port): probes stay answerable whatever other clients do, deadlines
cannot be extended by trickling bytes, the oldest idle connection is shed (counted and logged, rate-limited), an
exhausted descriptor table backs off instead of spinning, and a bad OpenMetrics version is not a 500."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import pytest
import trio

from nvdp.observe import http
from nvdp.observe.http import ProbeState, serve_http
from nvdp.observe.metrics import Metrics
from tests.observe_fixtures import inventory, plan, scrape
from tests.test_observe_http import get

LIMIT_S = 10.0
SHED = "nvdp_http_connections_shed_total"


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics()
    metrics.plan_applied(plan(), inventory(), "default", 1, 0.1)
    return metrics


@pytest.fixture
async def port(metrics: Metrics) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_http, "127.0.0.1:0", metrics, ProbeState())
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["idle", "slowloris"])
async def test_healthz_answers_while_twice_the_connection_limit_is_held(
    port: int, metrics: Metrics, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Twice MAX_CONNECTIONS idle (or one-byte-at-a-time) clients, as the issue's 32 idle connections re-opened
    every 10 s: every /healthz still gets its 200, the oldest are shed, counted, and logged once."""
    held = 2 * http.MAX_CONNECTIONS
    hogs: list[trio.SocketStream] = []
    try:
        with trio.fail_after(LIMIT_S):
            for _ in range(held):
                hog = await trio.open_tcp_stream("127.0.0.1", port)
                hogs.append(hog)
                if kind == "slowloris":
                    await hog.send_all(b"G")
            for _ in range(5):
                status, _, body = await get(port, "/healthz")
                assert (status, body) == (200, b"ok\n")
            # Positive witness that the attack reached the server: it shed the oldest to admit the newest (the
            # hogs were accepted, in order, before the probes were).
            assert scrape(metrics).total(SHED, reason="limit") >= held - http.MAX_CONNECTIONS
    finally:
        for hog in hogs:
            await trio.aclose_forcefully(hog)
    lines = [r for r in caplog.records if r.name == "nvdp.observe.http" and "closed" in r.getMessage()]
    assert len(lines) == 1, "shedding is logged once per SHED_LOG_INTERVAL_S, with counts"
    assert "(limit 1)" in lines[0].getMessage()  # the first shed is reported at once, the rest in the next line


async def test_the_oldest_connection_is_the_one_shed(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    with trio.fail_after(LIMIT_S):
        async with await trio.open_tcp_stream("127.0.0.1", port) as oldest:
            await oldest.send_all(b"GET /healthz HTTP/1.1\r\n")  # a head that never ends
            async with (await trio.open_tcp_stream("127.0.0.1", port), await trio.open_tcp_stream("127.0.0.1", port)):
                assert await oldest.receive_some(1024) == b""  # closed to admit the third
                assert (await get(port, "/readyz"))[0] == 503  # answered (not registered yet)


async def test_trickling_bytes_do_not_extend_the_head_deadline(
    port: int, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte every 20 ms would take 2 s for a 100-byte head; the deadline (0.3 s here) is fixed at accept."""
    monkeypatch.setattr(http, "HEAD_TIMEOUT_S", 0.3)
    head = b"GET /healthz HTTP/1.1\r\nUser-Agent: " + b"x" * 60 + b"\r\n\r\n"
    sent = 0
    with trio.fail_after(LIMIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            for byte in head:
                await stream.send_all(bytes([byte]))
                sent += 1
                await trio.sleep(0.02)
                # The server closed the connection: the peer's FIN shows up as an empty read.
                with trio.move_on_after(0):
                    if await stream.receive_some(1) == b"":
                        raise trio.BrokenResourceError
        await stream.aclose()
    assert sent < len(head), "the server must cut the client off before its head is complete"
    assert scrape(metrics).total(SHED, reason="deadline") == 1


@pytest.mark.parametrize("accept", [
    "application/openmetrics-text; version=x",
    "application/openmetrics-text; version=",
    "application/openmetrics-text;version=1.0",
    "application/openmetrics-text; version=x, text/plain;q=0.5",
    "text/plain; version=x",
    "text/plain; VERSION=0.0",
])
async def test_unusable_openmetrics_version_gets_text_not_a_500(
    port: int, accept: str, caplog: pytest.LogCaptureFixture
) -> None:
    status, headers, body = await get(port, "/metrics", f"Accept: {accept}\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"nvdp_build_info" in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_encoder_failure_falls_back_to_text(port: int, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Whatever else a future prometheus-client chokes on in Accept: the text format, a warning, no traceback."""
    real = http.choose_encoder

    def fragile(accept: str):  # type: ignore[no-untyped-def]
        encoder, content_type = real(accept)
        if accept:
            def broken(registry):  # type: ignore[no-untyped-def]
                raise TypeError("'>=' not supported")
            return broken, content_type
        return encoder, content_type

    monkeypatch.setattr(http, "choose_encoder", fragile)
    status, headers, body = await get(port, "/metrics", "Accept: application/openmetrics-text; version=1.0.0\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain") and b"nvdp_build_info" in body
    assert not [r for r in caplog.records if r.exc_info]
    assert [r for r in caplog.records if "answering in the text format" in r.getMessage()]


async def test_openmetrics_with_a_good_version_still_served(port: int) -> None:
    status, headers, body = await get(port, "/metrics", "Accept: application/openmetrics-text; version=1.0.0\r\n")
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# -- out of file descriptors: a child process with a small RLIMIT_NOFILE ------------------------------------------

_EMFILE_CHILD = textwrap.dedent('''
    import logging, os, resource, sys, time
    import trio
    from nvdp.observe.http import ProbeState, serve_http
    from nvdp.observe.logs import setup_logging
    from nvdp.observe.metrics import Metrics

    setup_logging("info", "text")

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, "127.0.0.1:0", Metrics(), ProbeState())
            # Fill the descriptor table, keeping one for the client's socket.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            hogs = []
            try:
                while True:
                    hogs.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            os.close(hogs.pop())
            with trio.fail_after(5):
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.send_all(b"GET /healthz HTTP/1.1\\r\\n\\r\\n")
                data = b""
                while chunk := await client.receive_some(4096):
                    data += chunk
            print("ANSWER", data.split(b"\\r\\n")[0].decode(), flush=True)
            await client.aclose()
            # Clients keep coming while the table stays full: each is accepted on the reserve or by shedding the
            # oldest idle one, or waits; the loop must neither spin nor flood the log.
            started = time.process_time()
            idle = []
            with trio.move_on_after(1.0):
                for _ in range(3):
                    os.close(hogs.pop())
                    idle.append(await trio.open_tcp_stream("127.0.0.1", port))
                await trio.sleep(2)
            print("CPU", round(time.process_time() - started, 3), flush=True)
            with trio.fail_after(5):
                for stream in idle:
                    await stream.aclose()
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.send_all(b"GET /healthz HTTP/1.1\\r\\n\\r\\n")
                data = b""
                while chunk := await client.receive_some(4096):
                    data += chunk
            print("AGAIN", data.split(b"\\r\\n")[0].decode(), flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main)
''')


@pytest.mark.slow
def test_out_of_descriptors_healthz_answers_and_accept_backs_off() -> None:
    """The issue: EMFILE killed /healthz and logged ~9 500 lines a second. Here the table is full, yet /healthz is
    answered (the reserved descriptor), and a further connection nobody can accept costs neither a hot loop nor
    a flood of lines."""
    done = subprocess.run([sys.executable, "-c", _EMFILE_CHILD], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert "ANSWER HTTP/1.1 200 OK" in out, done.stdout + done.stderr[-3000:]
    assert "AGAIN HTTP/1.1 200 OK" in out, done.stdout + done.stderr[-3000:]
    log_lines = done.stderr.splitlines()
    assert len(log_lines) < 20, "\n".join(log_lines[:40])
