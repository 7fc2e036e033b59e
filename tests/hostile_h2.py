"""A raw HTTP/2 client over a Unix socket, for the hostile-input tests: it sends what a well-behaved gRPC client
never would (resets, malformed framing, floods) and reads exactly what the server answers.

Blocking sockets with timeouts; run it from a test thread (or `trio.to_thread`) while the server runs elsewhere.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions

ALLOCATE = "/v1beta1.DevicePlugin/Allocate"
OPTIONS = "/v1beta1.DevicePlugin/GetDevicePluginOptions"
LIST_AND_WATCH = "/v1beta1.DevicePlugin/ListAndWatch"


def grpc_frame(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; `length` overrides the prefix (a lie about the body's size)."""
    return struct.pack(">?I", compressed, len(payload) if length is None else length) + payload


def allocate_request(*device_ids: str) -> bytes:
    """An AllocateRequest with one container asking for `device_ids`, encoded by hand (no generated code needed)."""
    def ld(tag: int, data: bytes) -> bytes:
        size, varint = len(data), bytearray()
        while size > 0x7F:
            varint.append((size & 0x7F) | 0x80)
            size >>= 7
        varint.append(size)
        return bytes((tag,)) + bytes(varint) + data

    container = b"".join(ld(0x0A, i.encode()) for i in device_ids)
    return ld(0x0A, container)


def request_headers(path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers"), *extra]


@dataclass
class Answer:
    """What came back on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None
    ended: bool = False

    @property
    def status(self) -> int | None:
        """grpc-status, from the trailers or a trailers-only response."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)

    @property
    def message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))


class H2Client:
    def __init__(self, path: Path | str, *, timeout: float = 5.0, connect: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.answers: dict[int, Answer] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = False
        if connect:
            self.h2.initiate_connection()
            try:
                self.flush()
            except OSError:
                self.sock.close()
                raise

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def open(self, path: str, *extra: tuple[str, str], end_stream: bool = False) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, request_headers(path, *extra), end_stream=end_stream)
        self.answers[stream_id] = Answer()
        self.flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end_stream: bool = True) -> None:
        """Send `data` on the stream, in frames the peer's window and frame size allow (waiting for updates)."""
        view = memoryview(data)
        while True:
            window = self.h2.local_flow_control_window(stream_id)
            chunk = min(window, self.h2.max_outbound_frame_size, len(view))
            last = chunk == len(view)
            if chunk or last:
                self.h2.send_data(stream_id, bytes(view[:chunk]), end_stream=end_stream and last)
                self.flush()
                view = view[chunk:]
            if last:
                return
            if not window:
                self.read_once()

    def call(self, path: str, body: bytes, *extra: tuple[str, str], timeout: float = 5.0) -> Answer:
        """One complete unary call: headers, body, end of stream; wait for the end of the answer."""
        stream_id = self.open(path, *extra)
        self.send(stream_id, body)
        return self.wait(stream_id, timeout)

    def reset(self, stream_id: int, code: int = 8) -> None:
        self.h2.reset_stream(stream_id, error_code=code)
        self.flush()

    def wait(self, stream_id: int, timeout: float = 5.0) -> Answer:
        answer = self.answers[stream_id]
        self.read_until(lambda: answer.ended or answer.reset is not None, timeout)
        return answer

    def read_until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not answer in time")
            if self.closed:
                raise ConnectionError("the server closed the connection")
            self.read_once(max(0.01, deadline - time.monotonic()))

    def read_once(self, timeout: float = 5.0) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError:
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return
        self._process(events)
        try:
            self.flush()
        except OSError:
            self.closed = True

    def _process(self, events: Iterable[h2.events.Event]) -> None:
        for event in events:
            stream_id = getattr(event, "stream_id", 0)
            answer = self.answers.get(stream_id)
            if isinstance(event, h2.events.ResponseReceived) and answer is not None:
                answer.headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
                answer.trailers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived) and answer is not None:
                answer.data += event.data or b""
                self.h2.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
            elif isinstance(event, h2.events.StreamEnded) and answer is not None:
                answer.ended = True
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer.reset = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
