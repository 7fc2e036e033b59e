"""The metrics and probe endpoint: `/metrics`, `/healthz`, `/readyz`, served by trio itself.

Why a small server on trio's sockets and not an ASGI server: the endpoint answers three fixed GET paths with no
request body, for Prometheus and the kubelet's probes. One request per connection (`Connection: close`) is all
they need, and with that the whole protocol is a request line and headers read under a size and time limit. A
full server (hypercorn and its h11/h2/wsproto stack) would add a dependency tree and a configuration surface to
the daemon for nothing these clients use. The exposition format itself comes from prometheus-client.

The port has no authentication, so anyone who can reach it can open connections. What keeps the probes answerable
whatever other clients do (each bound is tested in tests/test_hostile_http.py):

- **no refusal at the door**: every connection is accepted; when `MAX_CONNECTIONS` are open, the *oldest* one still
  sending its request head (else the oldest of all) is closed to make room. Idle and trickling clients are what
  gets shed, and a probe, which sends its request at once and is answered in microseconds, is never the oldest;
- **deadlines that trickling bytes cannot extend**: `HEAD_TIMEOUT_S` from accept to the end of the request head,
  `REQUEST_TIMEOUT_S` from accept to the last byte of the answer. Both are fixed at accept time;
- **separate admission for probes**: `/metrics` renders take one of `MAX_RENDERS` slots (waiting within the
  deadline); `/healthz` and `/readyz` take none and never wait for a scrape;
- **running out of file descriptors**: a failed `accept()` (EMFILE, ENFILE, ENOBUFS, ENOMEM) waits for a client
  to be queued, then gives up one reserved descriptor so that client (a probe, most likely) can be accepted, else
  sheds the oldest connection of ours still reading its head, else backs off (doubling up to
  `ACCEPT_BACKOFF_MAX_S`) instead of spinning; the reserve is taken again when a connection closes;
- shedding is counted in `nvdp_http_connections_shed_total{reason}` (`limit`, `deadline`, `fd_exhausted`) and
  logged at most once per `SHED_LOG_INTERVAL_S` with the counts since the last line; accept errors likewise.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import trio

from nvdp.core.config.settings import parse_address
from nvdp.observe.metrics import Metrics

log = logging.getLogger(__name__)

#: Connections open at once on the port; one more sheds the oldest (see the module docstring).
MAX_CONNECTIONS = 64
#: `/metrics` renders at a time. Probes never wait for one.
MAX_RENDERS = 4
MAX_HEAD_BYTES = 8192
#: From accept to the whole request head: a probe or a scraper sends it at once.
HEAD_TIMEOUT_S = 2.0
#: From accept to the last byte of the answer.
REQUEST_TIMEOUT_S = 10.0
#: Longest wait between two accept() tries while the process is out of descriptors.
ACCEPT_BACKOFF_MAX_S = 1.0
#: At most one log line about shed connections (and one about failed accepts) per this many seconds.
SHED_LOG_INTERVAL_S = 10.0

#: accept() failing for lack of resources rather than because of the listener.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: A `version` parameter prometheus-client can parse; it raises TypeError on anything else (issue 14, item 12).
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(slots=True)
class ProbeState:
    """What the probes report; the daemon sets the fields, the HTTP server only reads them (both on trio).

    - `/healthz` is OK while `alive` (the daemon's nursery runs) and `nvml_ok` (NVML answered its last check);
    - `/readyz` is OK when, in addition, `registered` (every resource of the active plan is registered) and no
      supervised child is down (waiting to be restarted after a failure; it names them);
    - `reason` says why not, in one line, when the daemon knows better than the generic message.

    A child that is down never fails `/healthz`: the supervisor restarts it, and a liveness failure would restart
    the whole pod (every MPS client with it) for what one child's restart mends.
    """

    alive: bool = True
    nvml_ok: bool = True
    registered: bool = False
    reason: str = ""
    #: What `/readyz` answers when ready, instead of "ok" (a node without GPUs: why it serves nothing).
    note: str = ""
    #: Supervised child -> why it is down (only those down now).
    down: dict[str, str] = field(default_factory=dict)
    #: Supervised child -> restarts since start (for Events and `nvdp status`).
    restarts: dict[str, int] = field(default_factory=dict)

    def set_pending(self, pending: Collection[str]) -> None:
        """Readiness from the resources that are not registered yet (empty: ready)."""
        self.registered = not pending
        self.reason = "" if not pending else "not registered with the kubelet: " + ", ".join(sorted(pending))

    def child_down(self, child: str, reason: str) -> None:
        self.down[child] = reason
        self.restarts[child] = self.restarts.get(child, 0) + 1

    def child_up(self, child: str) -> None:
        self.down.pop(child, None)

    def restarts_of(self, child: str) -> int:
        return self.restarts.get(child, 0)

    def health(self) -> tuple[bool, str]:
        if not self.alive:
            return False, self.reason or "the daemon is not running"
        if not self.nvml_ok:
            return False, self.reason or "NVML does not answer"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        ok, why = self.health()
        if not ok:
            return ok, why
        if self.down:
            # Bounded: a reason is one exception's text, cut short; children are a node's resources and GPUs.
            parts = [f"{child} ({reason[:200]})" for child, reason in sorted(self.down.items())]
            return False, "restarting after a failure: " + "; ".join(parts)
        if not self.registered:
            return False, self.reason or "not every resource is registered with the kubelet"
        return True, self.note or "ok"


def choose_encoder(accept: str) -> tuple[Callable[[Any], bytes], str]:
    """prometheus-client's content negotiation. Its module (which imports `http.server`, `urllib` and `email`) is
    imported when the endpoint starts, never by a daemon that serves no metrics (start-up time)."""
    from prometheus_client.exposition import choose_encoder as choose

    return choose(accept)


async def serve_http(
    address: str,
    metrics: Metrics,
    state: ProbeState,
    *,
    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. `task_status.started()` gets the bound port (None when `address` is empty: disabled)."""
    if not address.strip():
        task_status.started(None)
        return
    # The encoder module, loaded now rather than in the first scrape's answer (it takes ~15 ms on a small machine).
    import prometheus_client.exposition  # noqa: F401
    host, port = parse_address(address)
    server = _Server(metrics, state)
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(server.accept_loop, listener, nursery)
            bound = listeners[0].socket.getsockname()[1]
            log.info("serving /metrics, /healthz and /readyz on %s:%d", host or "*", bound)
            task_status.started(bound)
    finally:
        server.close()
        for listener in listeners:
            await trio.aclose_forcefully(listener)


@dataclass(eq=False, slots=True)
class _Connection:
    scope: trio.CancelScope
    #: Still receiving its request head (the first to be shed).
    reading: bool = True
    #: Why it was shed, if it was.
    shed: str = ""
    #: Set once its socket is closed.
    closed: trio.Event = field(default_factory=trio.Event)


class _Server:
    """Connection admission, deadlines, shedding and the accept loop; see the module docstring."""

    def __init__(self, metrics: Metrics, state: ProbeState) -> None:
        self.metrics = metrics
        self.state = state
        #: Open connections, oldest first (dicts keep insertion order).
        self.connections: dict[_Connection, None] = {}
        self.renders = trio.CapacityLimiter(MAX_RENDERS)
        self.reserve: int | None = None
        self._take_reserve()
        self._shed: Counter[str] = Counter()
        self._accept_errors: Counter[str] = Counter()
        self._last_shed_log = -float("inf")
        self._last_accept_log = -float("inf")

    def close(self) -> None:
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None

    # -- descriptors --------------------------------------------------------------------------------------------

    def _take_reserve(self) -> None:
        if self.reserve is None:
            # Out of descriptors now: taken again when a connection closes.
            with contextlib.suppress(OSError):
                self.reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _give_up_reserve(self) -> bool:
        if self.reserve is None:
            return False
        os.close(self.reserve)
        self.reserve = None
        return True

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        delay = 0.0
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Linux looks for a free descriptor before it looks at the queue: wait for a client to be there.
                await trio.lowlevel.wait_readable(listener.socket)
                self._accept_failed(exc)
                if self._give_up_reserve():
                    continue  # the next accept() gets the reserved descriptor (a probe, most likely)
                victim = self.shed_oldest("fd_exhausted", reading_only=True)
                if victim is not None:
                    with trio.move_on_after(ACCEPT_BACKOFF_MAX_S):
                        await victim.closed.wait()  # its socket is the descriptor the next accept() gets
                    continue
                delay = min(max(delay * 2, 0.01), ACCEPT_BACKOFF_MAX_S)
                await trio.sleep(delay)
                continue
            delay = 0.0
            nursery.start_soon(self.handle, stream)

    # -- shedding -----------------------------------------------------------------------------------------------

    def shed_oldest(self, reason: str, *, reading_only: bool = False) -> _Connection | None:
        """Close the oldest connection still reading its head, else (unless `reading_only`) the oldest of all;
        None if there is none to close."""
        victim = next((c for c in self.connections if c.reading and not c.shed), None)
        if victim is None and not reading_only:
            victim = next((c for c in self.connections if not c.shed), None)
        if victim is None:
            return None
        victim.shed = reason
        victim.scope.cancel()
        self._count_shed(reason)
        return victim

    def _count_shed(self, reason: str) -> None:
        self.metrics.http_shed(reason)
        self._shed[reason] += 1
        now = trio.current_time()
        if now - self._last_shed_log >= SHED_LOG_INTERVAL_S:
            self._last_shed_log = now
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self._shed.items()))
            log.warning("metrics port: closed %d client connection(s) since the last report (%s); limits: %d "
                        "connections, %g s for the request head", self._shed.total(), counts, MAX_CONNECTIONS,
                        HEAD_TIMEOUT_S)
            self._shed.clear()

    def _accept_failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._accept_errors[name] += 1
        now = trio.current_time()
        if now - self._last_accept_log >= SHED_LOG_INTERVAL_S:
            self._last_accept_log = now
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self._accept_errors.items()))
            log.error("metrics port: accept() failed %d time(s) since the last report (%s): %s; shedding the oldest "
                      "connection or backing off", self._accept_errors.total(), counts, os.strerror(exc.errno or 0))
            self._accept_errors.clear()

    # -- one connection -----------------------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = _Connection(trio.CancelScope(deadline=trio.current_time() + REQUEST_TIMEOUT_S))
        self.connections[conn] = None
        if len(self.connections) > MAX_CONNECTIONS:
            self.shed_oldest("limit")
        try:
            with conn.scope:
                with trio.move_on_after(HEAD_TIMEOUT_S) as head_scope:
                    head = await _read_head(stream)
                if head_scope.cancelled_caught:
                    self._count_shed("deadline")
                    return
                conn.reading = False
                if head is not None:
                    await self.answer(stream, head)
            if conn.scope.cancelled_caught and not conn.shed:
                self._count_shed("deadline")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing to tell it
        except Exception:
            # An exception escaping a handler would end the daemon's nursery: a probe is not worth that.
            log.exception("error answering an HTTP request")
        finally:
            del self.connections[conn]
            await trio.aclose_forcefully(stream)
            conn.closed.set()
            self._take_reserve()

    async def answer(self, stream: trio.SocketStream, head: bytes) -> None:
        if len(head) > MAX_HEAD_BYTES:
            await _respond(stream, 431, "request head too large\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(stream, 400, "bad request line\n")
            return
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/healthz", "/readyz"):
            await _respond(stream, 404, "not found: try /metrics, /healthz or /readyz\n", head_only=method == "HEAD")
            return
        if method not in ("GET", "HEAD"):
            await _respond(stream, 405, "only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
            return
        head_only = method == "HEAD"
        if path == "/metrics":
            async with self.renders:
                try:
                    # Content negotiation as prometheus-client's own servers do it: OpenMetrics when asked for (with
                    # a version it can parse), else text.
                    encoder, content_type = choose_encoder(_usable_accept(headers.get("accept", "")))
                    try:
                        body = encoder(self.metrics.registry)
                    except Exception as exc:
                        # Whatever else in Accept trips the encoder: the client gets the default text format.
                        log.warning("cannot render /metrics as %s (%s); answering in the text format",
                                    content_type, type(exc).__name__)
                        encoder, content_type = choose_encoder("")
                        body = encoder(self.metrics.registry)
                except Exception:
                    log.exception("cannot render /metrics")
                    await _respond(stream, 500, "cannot render metrics\n", head_only=head_only)
                    return
            await _respond(stream, 200, body, content_type=content_type, head_only=head_only)
            return
        ok, why = self.state.health() if path == "/healthz" else self.state.readiness()
        await _respond(stream, 200 if ok else 503, why.replace("\n", " ") + "\n", head_only=head_only)


def _usable_accept(accept: str) -> str:
    """The Accept header without media ranges whose `version` prometheus-client cannot parse (it compares version
    parts as numbers): a scraper that asks for `version=x` gets the text format, as for any type it did not ask
    for, not a 500."""
    kept = []
    for item in accept.split(","):
        _, *params = (p.strip() for p in item.split(";"))
        versions = [p.partition("=")[2].strip() for p in params if p.partition("=")[0].strip().lower() == "version"]
        if any(not _VERSION.match(v) for v in versions):
            continue
        kept.append(item)
    return ",".join(kept)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers, without the blank line; None when the client closed first. A result longer
    than `MAX_HEAD_BYTES` means the head was too large (reading stops there)."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if 0 <= end <= MAX_HEAD_BYTES:
            return bytes(buffer[:end])
        if len(buffer) > MAX_HEAD_BYTES:
            return bytes(buffer)
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buffer += chunk


async def _respond(
    stream: trio.SocketStream,
    status: int,
    body: bytes | str,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    data = body.encode() if isinstance(body, str) else body
    headers = [("Content-Type", content_type), ("Content-Length", str(len(data))), ("Connection", "close"),
               ("Cache-Control", "no-store"), *(extra or [])]
    head = f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    await stream.send_all(head.encode("latin-1") + b"\r\n" + (b"" if head_only else data))
