"""Resource budgets and hostile-input handling for the plugin gRPC servers (grpclib 0.4.9, pinned exactly).

Only the kubelet (root) can reach a plugin socket, but a bug in the kubelet, a sidecar or an operator's tool must not
take every GPU of the node away: every resource one client can make the daemon hold is bounded here, a request that
breaks the rules gets a gRPC status (not a traceback), and what is logged about it is rate-limited.

The budgets (docs/security.md, "Resource budgets", has the measured figures):

- connections per server: `MAX_CONNECTIONS`. A new connection over the limit sheds the oldest connection that is not
  serving a request (an idle one, or one whose streams never sent their request); if every connection is serving,
  the new one is closed at once. The kubelet's connection always holds ListAndWatch, so it is never the one shed.
- streams per connection: `MAX_CONCURRENT_STREAMS` (HTTP/2 SETTINGS, enforced by h2; a client that opens more is
  disconnected); a stream must deliver its request within `REQUEST_TIMEOUT_S` or it is answered DEADLINE_EXCEEDED
  and freed (a "half-open" stream holds memory until then).
- stream resets per connection: a bucket of `RESET_BURST`, refilled at `RESET_RATE` per second; a client that resets
  faster ("rapid reset") gets GOAWAY ENHANCE_YOUR_CALM and is disconnected. A reset stream's state is released at
  once (grpclib kept it for the connection's life when the reset beat the handler to its first step).
- message size: `MAX_MESSAGE_BYTES`; a larger length prefix is refused (RESOURCE_EXHAUSTED) before any of the body
  is buffered, and the stream is reset. Inbound flow-control windows are `WINDOW_BYTES`, so a connection never holds
  more unread request data than that.
- header list: `MAX_HEADER_LIST_SIZE` (HTTP/2 SETTINGS; h2 rejects larger header blocks).
- PING and SETTINGS frames per connection: a bucket of `CONTROL_BURST`, refilled at `CONTROL_RATE` per second;
  a flood gets GOAWAY ENHANCE_YOUR_CALM. Each connection is read `READ_CHUNK` bytes per loop callback, so one
  flooding connection cannot hold the loop for long.
- output to a client that does not read: when the transport's write buffer passes `WRITE_BUFFER_HIGH`, the
  connection stops reading until the client catches up, so PING/SETTINGS floods (whose acknowledgements would pile
  up unsent) cost at most one read's worth of replies.
- error text: a grpc-message is cut to `MAX_STATUS_MESSAGE_CHARS` (hpack's Huffman encoder is quadratic in a header's
  length: a 1 MiB message stalls the loop for minutes).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, cast

import grpclib.protocol
import grpclib.server
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.metadata import Deadline, decode_metadata
from grpclib.utils import Wrapper

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
MAX_CONCURRENT_STREAMS = 32
#: The largest request message accepted. The largest real request, a GetPreferredAllocation that lists every device
#: of the biggest node the benchmark models (2 688 devices), is ~150 KiB; this is also grpc-go's default limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
REQUEST_TIMEOUT_S = 10.0
RESET_BURST = 200
RESET_RATE = 20.0
#: PING and SETTINGS frames per connection: a bucket of this many, refilled at CONTROL_RATE per second.
CONTROL_BURST = 500
CONTROL_RATE = 50.0
#: Bytes read from a connection per loop callback (asyncio's default is 256 KiB): h2 parses ~15 000 PING frames in
#: 256 KiB, ~100 ms on which every other connection waits; 16 KiB (one maximum frame) keeps that to a few ms.
READ_CHUNK = 16 * 1024
MAX_HEADER_LIST_SIZE = 16 * 1024
WINDOW_BYTES = 1024 * 1024
WRITE_BUFFER_HIGH = 256 * 1024
MAX_STATUS_MESSAGE_CHARS = 2048


# --------------------------------------------------------------------------------------------- log rate limiting


class RepeatLimiter(logging.Filter):
    """Lets through at most `burst` records of one kind (logger, level, format string), then one per `interval_s`.

    The next record of a kind that had records suppressed says how many. Kinds are few (one per call site), and the
    table is bounded anyway. A filter on a logger: it sees only records logged to that logger itself.
    """

    def __init__(self, burst: int = 10, interval_s: float = 1.0, max_kinds: int = 256) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.max_kinds = max_kinds
        #: kind -> [tokens, last refill, suppressed]
        self._kinds: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()
        #: Every record suppressed, for tests and the curious.
        self.suppressed = 0

    def reset(self) -> None:
        self._kinds.clear()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        state = self._kinds.get(key)
        if state is None:
            state = self._kinds[key] = [float(self.burst), now, 0.0]
            if len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
        else:
            self._kinds.move_to_end(key)
            state[0] = min(float(self.burst), state[0] + (now - state[1]) / self.interval_s)
            state[1] = now
        if state[0] < 1.0:
            state[2] += 1
            self.suppressed += 1
            return False
        state[0] -= 1.0
        if state[2]:
            # Said once, on the record that gets through: "N like this one were not logged".
            record.msg = f"{record.msg} ({int(state[2])} similar messages suppressed)"
            state[2] = 0
        return True


#: Shared by every logger of the gRPC path (the plugin servers run on one thread).
REPEATS = RepeatLimiter()


def rate_limit(logger: logging.Logger) -> logging.Logger:
    if REPEATS not in logger.filters:
        logger.addFilter(REPEATS)
    return logger


def _frame_name(frame: object) -> str:
    return type(frame).__name__


# h2 formats every frame it receives for a trace log line before calling its logger (`repr(frame)` is an argument,
# so no logger or config setting skips it): a few per cent of a unary call's CPU, for text that grpclib's h2 (no
# logger configured) throws away. This name shadows the builtin inside h2.connection only, whose one use of `repr`
# that is; the upstream proposal (let the logger format the frame) is in docs/performance.md.
h2.connection.repr = _frame_name  # type: ignore[attr-defined]

rate_limit(log)
rate_limit(logging.getLogger("grpclib.server"))
rate_limit(logging.getLogger("grpclib.protocol"))


def clip(text: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters (noting the cut), so that a grpc-message stays small."""
    if len(text) <= limit:
        return text
    return text[: limit - 40] + f"... ({len(text)} characters)"


# -------------------------------------------------------------------------------------------------- the streams


class GuardedStream(grpclib.server.Stream[Any, Any]):
    """A server stream whose request is bounded in size and time, and whose errors stay small and quiet."""

    #: Whether this stream counts in its connection's `serving` (its request arrived).
    _counted = False

    async def recv_message(self) -> Any:
        data = await self.recv_bytes()
        if data is None:
            return None
        message = self._codec.decode(data, self._recv_type)
        self.count_received()
        return message

    async def recv_bytes(self) -> bytes | None:
        """The next request message, not decoded (None at the end of a client stream). The caller decodes it, or
        knows it already, and then calls `count_received()`."""
        stream = self._stream
        try:
            if stream.buffer._eof:
                # The client has ended its side: the whole request is buffered already (the usual case, the kubelet
                # sends headers and message at once), nothing to wait for.
                return await self._read()
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await self._read()
        except AssertionError:
            # grpclib's buffer: the stream ended inside the length prefix or the message.
            raise GRPCError(Status.INVALID_ARGUMENT, "request message cut short") from None
        except TimeoutError:
            raise GRPCError(Status.DEADLINE_EXCEEDED,
                            f"request not received within {REQUEST_TIMEOUT_S:g} s") from None

    def decode(self, data: bytes) -> Any:
        return self._codec.decode(data, self._recv_type)

    def count_received(self) -> None:
        connection = cast(GuardedConnection, self._stream.connection)
        if not self._counted:
            connection.serving += 1
            self._counted = True
        self._messages_received += 1
        connection.messages_received += 1

    async def _read(self) -> bytes | None:
        stream = self._stream
        meta = await stream.recv_data(5)
        if not meta:
            if self._cardinality.client_streaming:
                return None
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        compressed, length = struct.unpack(">BI", meta)
        if compressed:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
        if length > MAX_MESSAGE_BYTES:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"request message of {length} bytes is larger than the limit of {MAX_MESSAGE_BYTES} bytes")
        return await stream.recv_data(length)

    async def send_unary(self, payload: bytes) -> None:
        """Answer a unary call with `payload` (an encoded message): headers, message and OK trailers.

        When the whole message fits the stream's send window and one DATA frame, and no grpclib event listener
        wants to see (or change) the metadata, the three HTTP/2 frames go out in ONE socket write with headers
        built once per process (`send_unary_now`); otherwise grpclib's own path sends them (three writes, waiting
        for the window as needed). Either way the client sees the same frames.
        """
        if (self._send_initial_metadata_done or _listens(self._dispatch) or self._codec.__content_subtype__ != "proto"
                or not send_unary_now(self._stream, payload)):
            await self.send_message(EncodedMessage(payload))
            return
        self._send_initial_metadata_done = self._send_message_done = self._send_trailing_metadata_done = True
        self._messages_sent += 1

    async def send_trailing_metadata(self, *, status: Status = Status.OK, status_message: str | None = None,
                                     status_details: Any = None, metadata: Any = None) -> None:
        if status_message is not None:
            status_message = clip(status_message)
        await super().send_trailing_metadata(status=status, status_message=status_message,
                                             status_details=status_details, metadata=metadata)


def _listens(dispatch: Any) -> bool:
    """Whether a grpclib event listener is registered on a server (none is, in nvdp): one would want to see or
    change the metadata, which the one-write paths do not build."""
    return any(dispatch._listeners.values())


def send_unary_now(stream: grpclib.protocol.Stream, payload: bytes, before: Callable[[], None] | None = None) -> bool:
    """Send a unary response (headers, `payload` as the one message, OK trailers) in one socket write, if it can be
    sent at once: the message fits the stream's send window and one frame, and the connection is writable. False
    (nothing sent) otherwise. `before` runs once sending is decided, before the write (a client that sees the
    answer can rely on what `before` did)."""
    h2_conn = stream._h2_connection
    stream_id = cast(int, stream.id)
    data = _MESSAGE_PREFIX.pack(0, len(payload)) + payload
    connection = stream.connection
    if (not connection.write_ready.is_set() or stream_id not in h2_conn.streams
            or len(data) > min(h2_conn.local_flow_control_window(stream_id), h2_conn.max_outbound_frame_size)):
        return False
    if before is not None:
        before()
    h2_conn.send_headers(stream_id, _RESPONSE_HEADERS)
    h2_conn.send_data(stream_id, data)
    h2_conn.send_headers(stream_id, _OK_TRAILERS, end_stream=True)
    stream._transport.write(h2_conn.data_to_send())
    stream.data_sent += len(data)
    connection.data_sent += len(data)
    connection.data_send_process()
    connection.messages_sent += 1
    connection.last_message_sent = time.monotonic()
    return True


_MESSAGE_PREFIX = struct.Struct(">BI")
#: A unary response's headers and trailers never change (nvdp's codec is protobuf, it sends no metadata): built once.
#: h2 still HPACK-encodes them per response; after the first response they are indexed (a few bytes each).
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc+proto"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)


class EncodedMessage:
    """A message already serialized: `PassThroughCodec` sends its bytes as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class PassThroughCodec(ProtoCodec):
    """grpclib's protobuf codec, except that an `EncodedMessage` is sent as it is (`GuardedStream.send_unary`
    relies on it; a guarded server's codec must be one of these)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, EncodedMessage):
            return message.data
        return super().encode(message, message_type)


async def _abort(stream: grpclib.protocol.Stream, h2_status: int, status: Status, message: str) -> None:
    headers = [(":status", str(h2_status)), ("grpc-status", str(status.value)), ("grpc-message", message)]
    await stream.send_headers(headers, end_stream=True)
    if stream.closable:
        stream.reset_nowait()


class HandlerWrapper(Wrapper):
    """grpclib's `Wrapper` for one handler task, which it knows from the start.

    grpclib's stream protocol calls `cancel()` when the stream ends early (reset, connection lost), and the deadline
    below calls it when the call's deadline passes: the task is cancelled, and leaving the `with` raises `error`
    in place of the CancelledError (grpclib's semantics). grpclib's own Wrapper looks the current task up on every
    enter and exit and keeps a set of them: ~2 % of a unary call's CPU for one task that is known.
    """

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self._task = task
        self._inside = False

    def __enter__(self) -> None:
        if self._error is not None:
            raise self._error
        self._inside = True

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self._inside = False
        if self._error is not None:
            self.cancel_failed = exc_type is not asyncio.CancelledError
            raise self._error

    def cancel(self, error: Exception) -> None:
        self._error = error
        if self._inside and self._task is not None:
            self._task.cancel()
        self.cancelled = True


class _Deadline:
    """A call's deadline, armed only once its handler waits for something.

    A unary call whose request is already buffered (an Allocate not answered at once, say) runs its handler in one
    step, start to end, without waiting: no timer can fire inside it, yet grpclib's DeadlineWrapper schedules one (a
    heap entry of asyncio's Python `TimerHandle`s) and cancels it for every call. Here a callback checks after the
    handler's first step whether it is still running, and only then schedules the timer for what is left of the
    deadline; the outcome is the same.
    """

    __slots__ = ("deadline", "task", "timer", "wrapper")

    def __init__(self, deadline: Deadline, wrapper: HandlerWrapper, task: asyncio.Task[Any]) -> None:
        self.deadline = deadline
        self.wrapper = wrapper
        self.task = task
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self.task.done():
            return
        self.timer = self.task.get_loop().call_later(self.deadline.time_remaining(), self.expire)

    def expire(self) -> None:
        self.wrapper.cancel(TimeoutError("Deadline exceeded"))

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


async def request_handler(
    mapping: dict[str, Any],
    _stream: grpclib.protocol.Stream,
    headers: list[tuple[str, str]],
    codec: Any,
    status_details_codec: Any,
    dispatch: Any,
    release_stream: Any,
    owner: GuardedHandler | None = None,
) -> None:
    """grpclib's `request_handler`, with bounded requests and quiet answers to malformed ones.

    Everything a client can get wrong is answered with a status and logged at debug level at most; only an error
    of nvdp's own (an exception from a handler that is not a GRPCError) is logged, with its traceback, rate-limited.
    `owner` (the handler that started this task) forgets it when it ends.
    """
    stream: GuardedStream | None = None
    try:
        headers_map = dict(headers)
        method = headers_map.get(":method")
        if method != "POST":
            await _abort(_stream, 405, Status.UNIMPLEMENTED, "only POST is supported")
            return
        content_type = headers_map.get("content-type", "")
        base, _, sub_type = content_type.partition("+")
        if base != "application/grpc" or (sub_type or "proto") != codec.__content_subtype__:
            await _abort(_stream, 415, Status.UNKNOWN, "unacceptable content-type")
            return
        if headers_map.get("te") != "trailers":
            await _abort(_stream, 400, Status.UNKNOWN, 'required "te: trailers" header is missing')
            return
        method_name = headers_map.get(":path", "")
        handler = mapping.get(method_name)
        if handler is None:
            await _abort(_stream, 200, Status.UNIMPLEMENTED, "method not found")
            return
        try:
            # (The kubelet sets no deadline on Allocate: most calls have no grpc-timeout to look for.)
            deadline = Deadline.from_headers(headers) if "grpc-timeout" in headers_map else None
            metadata = decode_metadata(headers)
        except (ValueError, TypeError, KeyError):
            await _abort(_stream, 200, Status.INVALID_ARGUMENT, "malformed grpc-timeout or metadata header")
            return
        if deadline is not None and not deadline.time_remaining():
            await _abort(_stream, 200, Status.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
            return

        stream = GuardedStream(
            _stream, method_name, handler.cardinality, handler.request_type, handler.reply_type,
            codec=codec, status_details_codec=status_details_codec, dispatch=dispatch, deadline=deadline,
            user_agent=headers_map.get("user-agent"),
        )
        async with stream:
            task = owner._tasks.get(_stream) if owner is not None else None
            if task is None:
                task = asyncio.current_task()
            wrapper = _stream.wrapper = HandlerWrapper(task)
            timer = None
            if deadline is not None and task is not None:
                timer = _Deadline(deadline, wrapper, task)
                task.get_loop().call_soon(timer.arm)
            try:
                with wrapper:
                    stream.metadata, method_func = await dispatch.recv_request(
                        metadata, handler.func, method_name=method_name, deadline=deadline,
                        content_type=content_type, user_agent=stream.user_agent, peer=stream.peer)
                    await method_func(stream)
            except GRPCError:
                raise
            except TimeoutError:
                log.debug("deadline exceeded: %s", method_name)
                raise GRPCError(Status.DEADLINE_EXCEEDED) from None
            except StreamTerminatedError as exc:
                log.debug("%s: %s", method_name, exc)
                raise
            except Exception:
                log.exception("error in %s", method_name)
                raise
            finally:
                if timer is not None:
                    timer.disarm()
    except (StreamTerminatedError, h2.exceptions.StreamClosedError) as exc:
        log.debug("stream ended early: %s", exc)
    except ProtocolError:
        log.exception("gRPC protocol error (a handler of nvdp's broke the protocol)")
    except Exception:
        log.exception("gRPC server error")
    finally:
        if stream is not None and stream._counted:
            cast(GuardedConnection, _stream.connection).serving -= 1
        if owner is not None:
            # Forgotten as soon as done: grpclib swept finished tasks only every 10th request, so a burst of streams
            # reset or finished in between stayed referenced (with their buffers) until then. (A task cancelled
            # before its first step never gets here: `GuardedHandler.cancel` forgets it.)
            owner._tasks.pop(_stream, None)
        release_stream()


class ImmediateUnary(Protocol):
    """A unary method that can answer some requests at once, without a task (`GuardedHandler`): the server's
    handler for the method is an object with these, besides being the usual `async (stream) -> None` handler."""

    async def __call__(self, stream: GuardedStream) -> None: ...

    def immediate(self, request: bytes) -> bytes | None:
        """The encoded response to `request` (the message's bytes) if known without waiting for anything, else
        None (the call then goes the usual way)."""

    def observed(self, seconds: float) -> None:
        """Report an answered call and how long `immediate` took."""


#: Request headers that carry no metadata (grpclib's `decode_metadata` skips them, with any ":..." and "grpc-...").
_NOT_METADATA = frozenset(("te", "content-type", "user-agent"))
_PROTO_CONTENT_TYPES = frozenset(("application/grpc", "application/grpc+proto"))


class GuardedHandler(grpclib.server.Handler):
    """grpclib's handler (one per connection): a task per request running `request_handler`, except for requests
    answered at once.

    A request is started at the end of the read it arrived in (`start_accepted`), not when its headers are parsed:
    the kubelet sends headers and message together, so by then the message is buffered too, and a unary call whose
    method knows the answer at once (`ImmediateUnary`, e.g. a response kept in a cache) is answered on the spot,
    without a task, an event-loop step or grpclib's server stream: a sixth to a fifth of such a call's CPU. Anything
    unusual (a header that needs checking, metadata, a deadline already passed, an incomplete or compressed message,
    a response that cannot be sent at once, an event listener) goes to `request_handler` as before.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: Requests accepted in the current read, in order: stream -> (headers, release_stream).
        self._accepted: dict[grpclib.protocol.Stream, tuple[Any, Any]] = {}
        self._proto = self.codec.__content_subtype__ == "proto"

    def accept(self, stream: grpclib.protocol.Stream, headers: Any, release_stream: Any) -> None:
        self._accepted[stream] = (headers, release_stream)

    def start_accepted(self) -> None:
        """Start (or answer) the requests accepted since the last call: once every event of a read is processed."""
        if not self._accepted:
            return
        accepted, self._accepted = self._accepted, {}
        if self.closing:
            return
        for stream, (headers, release_stream) in accepted.items():
            try:
                answered = self._answer_now(stream, headers, release_stream)
            except Exception:
                # Nothing was sent (sending is guarded inside): the usual path answers, or reports the error.
                log.debug("no immediate answer", exc_info=True)
                answered = False
            if not answered:
                self._tasks[stream] = self.loop.create_task(request_handler(
                    self.mapping, stream, headers, self.codec, self.status_details_codec, self.dispatch,
                    release_stream, self))

    def _answer_now(self, stream: grpclib.protocol.Stream, headers: Any, release_stream: Any) -> bool:
        headers_map = dict(headers)
        if (not self._proto or len(headers_map) != len(headers) or headers_map.get(":method") != "POST"
                or headers_map.get("te") != "trailers" or headers_map.get("content-type") not in _PROTO_CONTENT_TYPES):
            return False
        handler = self.mapping.get(headers_map.get(":path", ""))
        unary = handler.func if handler is not None else None
        method = getattr(unary, "immediate", None)
        if method is None or _listens(self.dispatch):
            return False
        for key in headers_map:
            if not (key in _NOT_METADATA or key.startswith((":", "grpc-"))):
                return False
        if "grpc-timeout" in headers_map:
            try:
                deadline = Deadline.from_headers(headers)
            except ValueError:
                return False
            if deadline is None or not deadline.time_remaining():
                return False
        buffer = stream.buffer
        if not buffer._eof or buffer._acked:
            return False
        data = b"".join([chunk.data for chunk in buffer._unacked._queue])  # type: ignore[attr-defined]
        if len(data) < 5:
            return False
        compressed, length = _MESSAGE_PREFIX.unpack_from(data)
        if compressed or length != len(data) - 5:
            return False
        started = time.perf_counter()
        payload = method(data[5:])
        if payload is None:
            return False
        seconds = time.perf_counter() - started
        try:
            if not send_unary_now(stream, payload, partial(cast(ImmediateUnary, unary).observed, seconds)):
                return False
        except Exception:
            # h2 refused a frame (the stream cannot be answered any more): the call ends here.
            log.debug("immediate answer not sent", exc_info=True)
            if stream.closable:
                stream.reset_nowait()
            release_stream()
            return True
        stream.connection.messages_received += 1
        # Acknowledges the request's bytes (as reading them would have) and forgets the stream.
        release_stream()
        return True

    def cancel(self, stream: grpclib.protocol.Stream) -> None:
        if self._accepted.pop(stream, None) is not None:
            return  # reset in the read it arrived in: never started (the processor releases the stream)
        task = self._tasks.pop(stream, None)
        if task is not None:
            task.cancel()
            self._cancelled.add(task)
            task.add_done_callback(self._cancelled.discard)

    def close(self) -> None:
        self._accepted.clear()
        super().close()


# --------------------------------------------------------------------------------------------- the connections


class GuardedConnection(grpclib.protocol.Connection):
    #: Streams whose request arrived and whose handler still runs: a connection with none is the one to shed.
    serving = 0


class GuardedProcessor(grpclib.protocol.EventsProcessor):
    def __init__(self, handler: Any, connection: GuardedConnection, protocol: GuardedProtocol) -> None:
        super().__init__(handler, connection)
        self.protocol = protocol
        self._reset_tokens = float(RESET_BURST)
        self._reset_at = time.monotonic()
        self._control_tokens = float(CONTROL_BURST)
        self._control_at = self._reset_at
        self._activity = (0, 0)

    def _control_frame(self) -> None:
        now = time.monotonic()
        self._control_tokens = min(float(CONTROL_BURST),
                                   self._control_tokens + (now - self._control_at) * CONTROL_RATE)
        self._control_at = now
        self._control_tokens -= 1.0
        if self._control_tokens < 0:
            self.protocol.shed("sends PING or SETTINGS frames faster than %g per second", CONTROL_RATE,
                               code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def process_ping_received(self, event: h2.events.PingReceived) -> None:
        # A ping after traffic is free (grpc-go and grpcio clients send one per round trip of data, to size their
        # windows); only pings with nothing else between them are charged, as grpc-go's servers do.
        connection = self.connection
        activity = (connection.streams_started, connection.data_sent)
        if activity != self._activity:
            self._activity = activity
            return
        self._control_frame()

    def process_remote_settings_changed(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._control_frame()
        super().process_remote_settings_changed(event)

    def register(self, stream: grpclib.protocol.Stream) -> Any:
        streams, connection = self.streams, self.connection

        def release_stream() -> None:
            # Idempotent: a reset releases the stream at once, and its handler (if it ever ran) releases it again.
            released = streams.pop(cast(int, stream.id), None)
            if released is None:
                return
            connection.stream_close_waiter.set()
            if not connection.is_closing():
                connection.ack(cast(int, stream.id), released.buffer.unacked_size())

        assert stream.id is not None
        streams[stream.id] = stream
        stream.release = release_stream  # type: ignore[attr-defined]
        return release_stream

    def process_stream_reset(self, event: h2.events.StreamReset) -> None:
        now = time.monotonic()
        self._reset_tokens = min(float(RESET_BURST), self._reset_tokens + (now - self._reset_at) * RESET_RATE)
        self._reset_at = now
        self._reset_tokens -= 1.0
        stream = self.streams.get(event.stream_id)
        super().process_stream_reset(event)
        if stream is not None:
            # A handler cancelled before its first step never runs its `finally`: without this the stream (and
            # its buffers) stayed in `streams` for the connection's life, ~7.5 KiB per reset.
            stream.release()  # type: ignore[attr-defined]
        if self._reset_tokens < 0:
            self.protocol.shed("resets streams faster than %g per second", RESET_RATE,
                               code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


class GuardedProtocol(grpclib.protocol.H2Protocol):
    def __init__(self, handler: Any, config: Any, h2_config: Any, server: GuardedServer) -> None:
        super().__init__(handler, config, h2_config)
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.shedding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.server.transports.add(transport)
        h2_conn = h2.connection.H2Connection(config=self.h2_config)
        h2_conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW_BYTES,
        })
        h2_conn.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        h2_conn.initiate_connection()
        h2_conn.increment_flow_control_window(WINDOW_BYTES - 65535)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        if hasattr(transport, "max_size"):  # asyncio's selector transports: bytes per recv()
            transport.max_size = READ_CHUNK
        self.connection = GuardedConnection(h2_conn, transport, config=self.config)
        self.connection.flush()
        self.connection.initialize()
        self.processor = GuardedProcessor(self.handler, self.connection, self)
        if self.server.stopping:
            # Accepted by the loop before the listener closed, but connection_made() ran only now: a stopped
            # server serves nobody. abort(), not close(): close() waits until the SETTINGS frame just queued is
            # written, and a client that is not reading (or a loop about to stop) would keep the socket open until
            # the garbage collector found it (docs/faults.md, finding 1).
            transport.abort()
            return
        self.server.admit(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is not None:
            self.server.transports.discard(self.transport)
        self.server.protocols.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.shedding:
            return
        try:
            super().data_received(data)
        finally:
            cast(GuardedHandler, self.handler).start_accepted()

    def pause_writing(self) -> None:
        # The client does not read what we send (PING and SETTINGS acknowledgements included): stop reading from
        # it until it does, so that what it makes us answer cannot pile up.
        super().pause_writing()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def serving(self) -> int:
        return cast(GuardedConnection, self.connection).serving

    def shed(self, reason: str, *args: Any, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Say GOAWAY (when the client still reads) and close the connection."""
        if self.shedding:
            return
        self.shedding = True
        self.server.shed += 1
        log.warning("plugin server %s: closing a connection that " + reason, self.server.name, *args)
        h2_conn = self.connection._connection
        try:
            h2_conn.close_connection(error_code=code)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(h2_conn.data_to_send())
        except Exception as exc:  # the connection may already be broken; closing it is all that matters
            log.debug("GOAWAY not sent: %s", exc)
        if self.transport is not None:
            self.transport.close()


class GuardedServer(grpclib.server.Server):
    """A grpclib server with the budgets above, that can also close its client connections.

    `Server.close()` stops listening and cancels handlers but leaves HTTP/2 connections open, so a kubelet's
    `ListAndWatch` would never see its stream end: `transports` lets `stop_server()` close them.
    """

    def __init__(self, handlers: list[Any], *, codec: PassThroughCodec | None = None, name: str = "") -> None:
        super().__init__(handlers, codec=codec or PassThroughCodec())
        self.name = name
        self.transports: set[asyncio.BaseTransport] = set()
        #: Live connections, oldest first.
        self.protocols: OrderedDict[GuardedProtocol, None] = OrderedDict()
        #: Set by shut_down(): a connection whose connection_made() runs after that is closed at once.
        self.stopping = False
        #: Connections closed by a budget (shed for a newer one, refused, or over the reset rate).
        self.shed = 0

    async def shut_down(self, grace_s: float) -> None:
        """Stop listening and close every connection (their streams end with them), waiting up to `grace_s` until
        each has released its socket; a connection still open then (its peer stopped reading, so close() waits to
        flush) is aborted. Runs on the server's loop."""
        self.stopping = True
        # Let stream handlers (ListAndWatch, the DRA health stream) send their trailers before connections are cut.
        await asyncio.sleep(0)
        self.close()
        for transport in list(self.transports):
            transport.close()
        try:
            async with asyncio.timeout(grace_s):
                # A closed transport releases its socket in a later loop callback (connection_lost): wait for every
                # one, or a loop stopped right after this (daemon shutdown) would leave sockets to the collector.
                while self.transports:  # noqa: ASYNC110 (grpclib offers no event for this)
                    await asyncio.sleep(0.005)
                await self.wait_closed()
        except TimeoutError:
            log.warning("gRPC server %s did not close within %.1f s: aborting %d connection(s)", self.name or "?",
                        grace_s, len(self.transports))
            for transport in list(self.transports):
                cast(asyncio.Transport, transport).abort()
            await asyncio.sleep(0)

    def _protocol_factory(self) -> Any:
        self.__gc_step__()
        handler = GuardedHandler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        return GuardedProtocol(handler, self._config, self._h2_config, self)

    def admit(self, protocol: GuardedProtocol) -> None:
        if len(self.protocols) >= MAX_CONNECTIONS:
            victim = next((p for p in self.protocols if p.serving == 0 and not p.shedding), None)
            if victim is None:
                self.protocols[protocol] = None
                protocol.shed("arrived while all %d connections were serving requests", MAX_CONNECTIONS)
                return
            self.protocols.pop(victim, None)
            victim.shed("was idle while %d connections were open", MAX_CONNECTIONS)
        self.protocols[protocol] = None
