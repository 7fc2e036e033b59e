"""Hostile clients of a plugin socket (issue 14, items 4, 5, 6, 10, 13, 14, 15): raw HTTP/2 over the Unix socket.

The server runs in-process on its own asyncio thread, as in the daemon; the attacks come from the test thread with
blocking sockets. Every test ends by showing that the server still answers an ordinary Allocate (from a fresh
connection), and the budgets it checks are those of `nvdp.kubelet.grpc_guard` (docs/security.md, "Resource
budgets").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpclib.protocol
import h2.errors
import h2.settings
import pytest

from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.allocate import MAX_ID_CHARS, AllocateOptions, describe_ids
from nvdp.core.plan.model import Device, Resource
from nvdp.kubelet import grpc_guard
from nvdp.kubelet.plugin_server import BoundServer, ServingContext, start_server, stop_server
from tests.hostile_h2 import (
    ALLOCATE,
    LIST_AND_WATCH,
    OPTIONS,
    Answer,
    H2Client,
    allocate_request,
    grpc_frame,
    request_headers,
)

T = TypeVar("T")
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
RESOURCE_EXHAUSTED, UNIMPLEMENTED = 8, 12
GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"


class Served:
    """One resource's plugin server on an asyncio loop in a thread, as the daemon runs it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-grpc-loop")
        self.thread.start()
        devices = tuple(Device(id=f"GPU-0000000{i}-aaaa-bbbb-cccc-000000000000",
                               physical_id=f"GPU-0000000{i}-aaaa-bbbb-cccc-000000000000", index=str(i),
                               gpu_uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-000000000000", gpu_index=i,
                               paths=(f"/dev/nvidia{i}",)) for i in range(2))
        context = ServingContext(Resource("nvidia.com/gpu", devices), AllocateOptions(), NodeInventory("1", 2, ()))
        self.bound: BoundServer = self.run(lambda: start_server(context, {}, path))

    def run(self, coro: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
        async def wrapped() -> T:
            return await coro()
        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()
        return self.run(call)

    def close(self) -> None:
        try:
            self.run(lambda: stop_server(self.bound))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def answers(self) -> None:
        """An ordinary client on a fresh connection gets an ordinary answer."""
        with H2Client(self.path) as client:
            answer = client.call(ALLOCATE, grpc_frame(allocate_request(GPU0)))
        assert answer.status == OK, answer


@pytest.fixture
def served(short_dir: Path) -> Iterator[Served]:
    grpc_guard.REPEATS.reset()
    server = Served(short_dir / "nvidia-gpu.sock")
    try:
        yield server
    finally:
        server.close()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info is not None]


# ---------------------------------------------------------------------------------------- 14: malformed framing


MALFORMED = [
    pytest.param(b"", (), INVALID_ARGUMENT, "no request message", id="no message"),
    pytest.param(grpc_frame(allocate_request(GPU0), compressed=True), (), UNIMPLEMENTED, "compressed",
                 id="compressed flag set"),
    pytest.param(grpc_frame(b"\x0a\x05", length=100), (), INVALID_ARGUMENT, "cut short", id="short body"),
    pytest.param(b"\x00\x00", (), INVALID_ARGUMENT, "cut short", id="short length prefix"),
    pytest.param(grpc_frame(b"\x0a\x03\x0a\x01\xff"), (), INVALID_ARGUMENT, "cannot decode", id="ID not UTF-8"),
    pytest.param(grpc_frame(b"\x0a\x02\x08\x01"), (), INVALID_ARGUMENT, "wrong wire type", id="ID a varint"),
    pytest.param(grpc_frame(b"\x08\x01"), (), INVALID_ARGUMENT, "wrong wire type", id="request a varint"),
    pytest.param(grpc_frame(allocate_request(GPU0)), (("grpc-timeout", "1n"),), DEADLINE_EXCEEDED, "deadline",
                 id="grpc-timeout 1n"),
    pytest.param(grpc_frame(allocate_request(GPU0)), (("grpc-timeout", "soon"),), INVALID_ARGUMENT, "grpc-timeout",
                 id="grpc-timeout not a number"),
]


@pytest.mark.parametrize(("body", "headers", "status", "text"), MALFORMED)
def test_malformed_grpc_framing_gets_the_right_status_quietly(
    served: Served, caplog: pytest.LogCaptureFixture, body: bytes, headers: tuple[tuple[str, str], ...],
    status: int, text: str,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="nvdp"), H2Client(served.path) as client:
        for _ in range(3):  # a traceback per request was the complaint: several requests, one connection
            answer = client.call(ALLOCATE, body, *headers)
            assert answer.status == status, answer
            assert text in answer.message
        # The same connection still serves a well-formed call.
        assert client.call(ALLOCATE, grpc_frame(allocate_request(GPU0))).status == OK
    assert not errors_logged(caplog)


# ------------------------------------------------------------------------- 4 and 15: long and hostile device IDs


@pytest.mark.parametrize("length", [256 * 1024, pytest.param(2 * 1024 * 1024, marks=pytest.mark.slow)])
def test_a_long_unknown_device_id_gets_a_short_error_at_once(
    served: Served, caplog: pytest.LogCaptureFixture, length: int
) -> None:
    with H2Client(served.path, timeout=30) as client:
        started = time.monotonic()
        answer = client.call(ALLOCATE, grpc_frame(allocate_request("G" * length)), timeout=30)
        elapsed = time.monotonic() - started
    assert answer.status == INVALID_ARGUMENT, answer
    assert len(answer.message) <= grpc_guard.MAX_STATUS_MESSAGE_CHARS
    assert f"({length} characters)" in answer.message
    print(f"unknown ID of {length // 1024} KiB answered in {elapsed * 1000:.0f} ms")
    served.answers()


def test_thousands_of_long_unknown_ids_make_a_bounded_error(served: Served) -> None:
    ids = [f"{i:05d}" + "x" * 4000 for i in range(900)]  # ~3.5 MiB: under the message limit
    with H2Client(served.path, timeout=30) as client:
        answer = client.call(ALLOCATE, grpc_frame(allocate_request(*ids)), timeout=30)
    assert answer.status == INVALID_ARGUMENT, answer
    assert len(answer.message) <= grpc_guard.MAX_STATUS_MESSAGE_CHARS
    assert "and 890 more" in answer.message
    served.answers()


def test_describe_ids_is_bounded_and_linear() -> None:
    text = describe_ids(["a" * 10_000_000, *(f"x{i}" * 1000 for i in range(10_000))])
    assert len(text) < 11 * (4 * MAX_ID_CHARS + 30)
    assert text.startswith("a" * MAX_ID_CHARS + "... (10000000 characters), ")
    assert text.endswith("and 9991 more")


@pytest.mark.parametrize("device_id", ["GPU-0\nERROR forged line", "GPU-0\r\x1b[2J", "GPU-0\u2028x", 'a", "b'])
def test_a_device_id_cannot_forge_a_log_line_or_a_list(
    served: Served, caplog: pytest.LogCaptureFixture, device_id: str
) -> None:
    with caplog.at_level(logging.WARNING), H2Client(served.path) as client:
        answer = client.call(ALLOCATE, grpc_frame(allocate_request(device_id)))
    assert answer.status == INVALID_ARGUMENT
    (record,) = [r for r in caplog.records if "Allocate refused" in r.getMessage()]
    line = record.getMessage()
    assert line.isprintable() and line.isascii(), line
    assert '", "' not in line.split("unknown device: ", 1)[1][1:-1], line
    assert answer.message.isprintable()


# ------------------------------------------------------------------------------------------------ 5: rapid reset


def _live_h2_streams() -> int:
    gc.collect()
    return sum(isinstance(o, grpclib.protocol.Stream) for o in gc.get_objects())


def test_reset_streams_are_released_at_once(served: Served) -> None:
    before = _live_h2_streams()
    with H2Client(served.path) as client:
        for _ in range(150):  # within the reset budget
            stream_id = client.open(ALLOCATE)
            client.reset(stream_id)
        # A complete call after the resets: every reset has been processed by then.
        assert client.call(ALLOCATE, grpc_frame(allocate_request(GPU0))).status == OK
        held = served.on_loop(lambda: _live_h2_streams() - before)
    # The connection is still open: before the fix, every stream reset before its handler ran stayed (~7.5 KiB
    # each) for the connection's life and, through the server's handler list, after it.
    assert held <= 2, f"{held} HTTP/2 streams held after 150 resets"


def test_rapid_reset_beyond_the_budget_closes_the_connection(served: Served) -> None:
    with H2Client(served.path) as client:
        for _ in range(grpc_guard.RESET_BURST + 100):
            try:
                stream_id = client.open(ALLOCATE)
                client.reset(stream_id)
            except OSError:  # the server hung up: the point (its GOAWAY is still to be read)
                break
        with contextlib.suppress(ConnectionError):
            client.read_until(lambda: client.terminated is not None, 5)
    assert client.terminated is not None and client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    served.answers()


# --------------------------------------------------------------------------------------- 6: maximum message size


def test_a_request_over_the_size_limit_is_refused_before_its_body(served: Served) -> None:
    sent = 0
    with H2Client(served.path, timeout=10) as client:
        stream_id = client.open(ALLOCATE)
        client.h2.send_data(stream_id, grpc_frame(b"", length=4 * 1024**3 - 1))
        client.flush()
        answer = client.answers[stream_id]
        chunk = b"\0" * 16384
        deadline = time.monotonic() + 10
        # Stream (up to 64 MiB of) the body for as long as the server's flow control lets us, until it answers.
        while answer.status is None and answer.reset is None and sent < 64 * 1024**2:
            assert time.monotonic() < deadline, f"no answer after {sent} bytes of body"
            if client.h2.local_flow_control_window(stream_id) >= len(chunk):
                client.h2.send_data(stream_id, chunk)
                client.flush()
                sent += len(chunk)
            client.read_once(0.001 if sent % (256 * 1024) == 0 else 0.0001)
        client.read_until(lambda: answer.status is not None or answer.reset is not None, 5)
    assert answer.status == RESOURCE_EXHAUSTED, answer
    assert str(grpc_guard.MAX_MESSAGE_BYTES) in answer.message
    # Refused on the length prefix: never more of the body than one flow-control window was taken in.
    assert sent <= grpc_guard.WINDOW_BYTES, sent
    print(f"refused after {sent} bytes of body")
    served.answers()


@pytest.mark.slow
def test_a_request_at_the_size_limit_is_served(served: Served) -> None:
    # One container, one real ID, padded with an unknown field (number 15, bytes) up to exactly the limit.
    body = allocate_request(GPU0)
    pad = grpc_guard.MAX_MESSAGE_BYTES - len(body) - 5  # tag (1 byte) + length (4 bytes)
    body += b"\x7a" + bytes([(pad & 0x7F) | 0x80, ((pad >> 7) & 0x7F) | 0x80, ((pad >> 14) & 0x7F) | 0x80,
                             pad >> 21]) + b"\0" * pad
    assert len(body) == grpc_guard.MAX_MESSAGE_BYTES
    with H2Client(served.path, timeout=30) as client:
        assert client.call(ALLOCATE, grpc_frame(body), timeout=30).status == OK


# ---------------------------------------------------------------------------- 10: PING/SETTINGS flood, no reads


@pytest.mark.parametrize("frame", [
    pytest.param(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678", id="PING"),
    pytest.param(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", id="SETTINGS"),
])
# Without the budget the flood runs its full course (a second each): the slow lane.
@pytest.mark.parametrize("budget", [pytest.param(True, id="shed"),
                                    pytest.param(False, id="no-budget", marks=pytest.mark.slow)])
def test_a_control_frame_flood_from_a_client_that_never_reads_is_bounded(
    served: Served, frame: bytes, budget: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not budget:  # without the frame budget, the server must still stop reading from a client that never reads
        monkeypatch.setattr(grpc_guard, "CONTROL_BURST", 10**9)
    flood = frame * (1024 * 1024 // len(frame))  # 1 MiB of frames
    sent, shed = 0, False
    with H2Client(served.path) as client:
        client.sock.settimeout(1.0)
        try:
            while sent < 64 * 1024**2:
                client.sock.sendall(flood)
                sent += len(flood)
        except TimeoutError:
            pass  # the server stopped reading: the point
        except (BrokenPipeError, ConnectionResetError):
            shed = True  # the server hung up on the flood (ENHANCE_YOUR_CALM): the point too
        buffered = served.on_loop(lambda: max((t.get_write_buffer_size()  # type: ignore[attr-defined]
                                               for t in served.bound.server.transports), default=0))
        # Positive witness: the server answers a fresh client while this one is stalled.
        served.answers()
    assert sent < 64 * 1024**2, "the server read 64 MiB of control frames without their replies being read"
    assert shed == budget
    assert buffered <= grpc_guard.WRITE_BUFFER_HIGH + 512 * 1024, buffered
    print(f"flood {'shed' if shed else 'stalled'} after {sent // 1024} MiB sent; server write buffer "
          f"{buffered // 1024} KiB")


def test_pings_between_requests_are_free(served: Served) -> None:
    """grpc-go and grpcio send a PING per round trip of data (to size their windows): never charged."""
    with H2Client(served.path) as client:
        for _ in range(grpc_guard.CONTROL_BURST + 50):
            assert client.call(ALLOCATE, grpc_frame(allocate_request(GPU0))).status == OK
            client.h2.ping(b"bdp-ping")
            client.flush()
        assert client.call(ALLOCATE, grpc_frame(allocate_request(GPU0))).status == OK
        assert client.terminated is None
    assert served.on_loop(lambda: served.bound.server.shed) == 0


# -------------------------------------------------------------------------- 13: connections, half-open streams


def test_connections_over_the_limit_shed_the_oldest_idle_one(served: Served) -> None:
    idle = [H2Client(served.path) for _ in range(grpc_guard.MAX_CONNECTIONS + 8)]
    try:
        # The handshake of the last one done: every connection before it was admitted (or shed) by then.
        idle[-1].read_until(lambda: idle[-1].h2.remote_settings.max_concurrent_streams
                            == grpc_guard.MAX_CONCURRENT_STREAMS, 5)
        for client in idle[:8]:
            client.read_until(lambda c=client: c.closed, 5)  # type: ignore[misc]
        open_now = served.on_loop(lambda: len(served.bound.server.transports))
        assert open_now <= grpc_guard.MAX_CONNECTIONS
        served.answers()
    finally:
        for client in idle:
            client.close()


def test_a_connection_over_the_limit_is_refused_while_every_other_one_serves(served: Served) -> None:
    watching = [H2Client(served.path) for _ in range(grpc_guard.MAX_CONNECTIONS)]
    try:
        for client in watching:
            stream_id = client.open(LIST_AND_WATCH)
            client.send(stream_id, grpc_frame(b""))
            client.read_until(lambda c=client, s=stream_id: bool(c.answers[s].data), 5)  # type: ignore[misc]
        try:
            with H2Client(served.path) as late:
                late.read_until(lambda: late.closed, 5)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before our preface went out
        assert served.on_loop(lambda: served.bound.server.shed) == 1
        assert not any(client.closed for client in watching)
    finally:
        for client in watching:
            client.close()
    served.answers()


def test_a_stream_that_never_sends_its_request_is_answered_and_freed(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_guard, "REQUEST_TIMEOUT_S", 0.5)
    with H2Client(served.path) as client:
        half_open = [client.open(ALLOCATE) for _ in range(grpc_guard.MAX_CONCURRENT_STREAMS - 1)]
        partial_body = client.open(OPTIONS)
        client.h2.send_data(partial_body, b"\x00\x00")
        client.flush()
        for stream_id in [*half_open, partial_body]:
            answer = client.wait(stream_id, 5)
            assert answer.status == DEADLINE_EXCEEDED, answer
        # The server resets each stream after its trailers (the client never finished its side); the reset may come
        # in a later write than the trailers, and only then does the client's h2 count the stream as closed.
        client.read_until(lambda: client.h2.open_outbound_streams == 0, 5)
        # Every slot is free again: as many streams as the limit allows, this time complete calls.
        ids = [client.open(ALLOCATE) for _ in range(grpc_guard.MAX_CONCURRENT_STREAMS)]
        for stream_id in ids:
            client.send(stream_id, grpc_frame(allocate_request(GPU0)))
        assert all(client.wait(s).status == OK for s in ids)


def test_streams_per_connection_are_limited(served: Served) -> None:
    with H2Client(served.path) as client:
        client.read_until(lambda: client.h2.remote_settings.max_concurrent_streams
                          == grpc_guard.MAX_CONCURRENT_STREAMS, 5)
        # Lie to our own h2 about the limit, to open one stream more than the server allows.
        client.h2.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].appendleft(1000)
        for _ in range(grpc_guard.MAX_CONCURRENT_STREAMS + 1):
            client.open(ALLOCATE)
        client.read_until(lambda: client.closed or client.terminated is not None, 5)
    served.answers()


def test_a_header_list_over_the_limit_closes_the_connection(served: Served) -> None:
    with H2Client(served.path) as client:
        client.read_until(lambda: client.h2.remote_settings.max_header_list_size == grpc_guard.MAX_HEADER_LIST_SIZE, 5)
        client.h2.remote_settings._settings[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].appendleft(1 << 30)
        client.open(ALLOCATE, ("x-padding", "p" * grpc_guard.MAX_HEADER_LIST_SIZE))
        client.read_until(lambda: client.closed or client.terminated is not None, 5)
    served.answers()


# ------------------------------------------------------------------------------------------- log rate limiting


def test_repeated_refusals_are_logged_at_a_bounded_rate(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), H2Client(served.path) as client:
        for i in range(200):
            assert client.call(ALLOCATE, grpc_frame(allocate_request(f"nope-{i}"))).status == INVALID_ARGUMENT
    refused = [r for r in caplog.records if "Allocate refused" in r.getMessage()]
    assert len(refused) < 200
    assert grpc_guard.REPEATS.suppressed >= 200 - len(refused) > 0


def test_the_repeat_limiter_says_how_many_it_suppressed() -> None:
    limiter = grpc_guard.RepeatLimiter(burst=2, interval_s=3600)
    records = [logging.LogRecord("x", logging.WARNING, "f", 1, "refused %s", (i,), None) for i in range(5)]
    assert [limiter.filter(r) for r in records] == [True, True, False, False, False]
    limiter._kinds[("x", logging.WARNING, "refused %s")][0] = 1.0  # the next token
    late = logging.LogRecord("x", logging.WARNING, "f", 1, "refused %s", (9,), None)
    assert limiter.filter(late)
    assert late.getMessage() == "refused 9 (3 similar messages suppressed)"


def test_settings_of_a_plugin_server(served: Served) -> None:
    with H2Client(served.path) as client:
        client.read_until(lambda: client.h2.remote_settings.max_concurrent_streams
                          == grpc_guard.MAX_CONCURRENT_STREAMS, 5)
        settings = client.h2.remote_settings
        assert settings.max_header_list_size == grpc_guard.MAX_HEADER_LIST_SIZE
        assert settings.initial_window_size == grpc_guard.WINDOW_BYTES


# ---------------------------------------------------------------------------------------------- call deadlines


def test_a_deadline_ends_a_call_that_waits_and_costs_no_timer_to_one_that_does_not(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    armed: list[bool] = []
    arm = grpc_guard._Deadline.arm

    def recording_arm(self: grpc_guard._Deadline) -> None:
        arm(self)
        armed.append(self.timer is not None)

    monkeypatch.setattr(grpc_guard._Deadline, "arm", recording_arm)
    with H2Client(served.path) as client:
        # Answered in the handler's first step: the deadline is checked, no timer is scheduled. Headers and message
        # go in one write, so that the server reads them together (in two writes, a loaded machine may let the
        # handler start before the message is there, and then it rightly waits with a timer).
        stream_id = client.h2.get_next_available_stream_id()
        client.h2.send_headers(stream_id, request_headers(ALLOCATE, ("grpc-timeout", "5S")))
        client.h2.send_data(stream_id, grpc_frame(allocate_request(GPU0)), end_stream=True)
        client.answers[stream_id] = Answer()
        client.flush()
        assert client.wait(stream_id, 5).status == OK
        assert served.on_loop(lambda: list(armed)) == [False]
        # The request never arrives: the handler waits for it, so the deadline ends the call (the request timeout,
        # 10 s, is longer than this test waits).
        waiting = client.open(ALLOCATE, ("grpc-timeout", "200m"))
        answer = client.wait(waiting, 5)
        assert answer.status == DEADLINE_EXCEEDED, answer
        assert served.on_loop(lambda: list(armed)) == [False, True]
    served.answers()


# ------------------------------------------------------------------------------------ headers of a kept request

_STANDARD = [(":method", "POST"), (":scheme", "http"), (":path", ALLOCATE), (":authority", "localhost"),
             ("content-type", "application/grpc"), ("te", "trailers")]


def _replaced(name: str, value: str | None, new_name: str | None = None) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in _STANDARD if k != name]
    if value is not None:
        headers.append((new_name or name, value))
    return headers


BAD_HEADERS = [
    pytest.param(_replaced(":method", "GET"), UNIMPLEMENTED, id="GET"),
    pytest.param(_replaced("content-type", "application/json"), UNKNOWN, id="not gRPC"),
    pytest.param(_replaced("content-type", "application/grpc+json"), UNKNOWN, id="not protobuf"),
    pytest.param(_replaced("content-type", "application/grpc", "Content-Type"), UNKNOWN, id="upper-case name"),
    pytest.param(_replaced("te", None), UNKNOWN, id="no te"),
    pytest.param(_replaced(":path", "/v1beta1.DevicePlugin/Nope"), UNIMPLEMENTED, id="unknown method"),
    pytest.param([*_STANDARD, ("grpc-timeout", "soon")], INVALID_ARGUMENT, id="grpc-timeout not a number"),
    pytest.param([*_STANDARD, ("grpc-timeout", "1n")], DEADLINE_EXCEEDED, id="grpc-timeout 1n"),
]


@pytest.mark.parametrize(("headers", "status"), BAD_HEADERS)
def test_a_kept_request_with_bad_headers_gets_the_same_status_as_any_other(
    served: Served, headers: list[tuple[str, str]], status: int
) -> None:
    """h2 does not validate request headers (grpclib's configuration); `request_handler` checks what gRPC needs,
    and a request answered at once from the cache (`GuardedHandler`) must pass the same checks."""
    body = grpc_frame(allocate_request(GPU0))
    with H2Client(served.path) as client:
        # So that the client's h2 sends these headers as they are (it would refuse or fix some).
        client.h2.config.validate_outbound_headers = False
        client.h2.config.normalize_outbound_headers = False
        kept = client.call(ALLOCATE, body)
        assert kept.status == OK
        for _ in range(2):
            stream_id = client.h2.get_next_available_stream_id()
            client.h2.send_headers(stream_id, headers)
            client.h2.send_data(stream_id, body, end_stream=True)
            client.answers[stream_id] = Answer()
            client.flush()
            answer = client.wait(stream_id)
            assert answer.status == status, answer
            assert answer.data == b""
        assert client.call(ALLOCATE, body).data == kept.data
    served.answers()


def test_h2_passes_headers_through_and_nvdp_checks_them(served: Served) -> None:
    """docs/security.md, "Request headers": h2's own header validation is off (grpclib's configuration)."""
    config = served.bound.server._h2_config
    assert not (config.validate_inbound_headers or config.normalize_inbound_headers
                or config.validate_outbound_headers or config.normalize_outbound_headers
                or config.split_outbound_cookies)
