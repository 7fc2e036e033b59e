"""The metrics and probe endpoint: `/metrics`, `/healthz`, `/readyz`, served by trio itself.

Why a small server on `trio.serve_tcp` and not an ASGI server: the endpoint answers three fixed GET paths with no
request body, for Prometheus and the kubelet's probes. One request per connection (`Connection: close`) is all
they need, and with that the whole protocol is a request line and headers read under a size and time limit. A
full server (hypercorn and its h11/h2/wsproto stack) would add a dependency tree and a configuration surface to
the daemon for nothing these clients use. The exposition format itself comes from prometheus-client.

Limits, so a misbehaving client cannot hurt the daemon: at most `MAX_CONNECTIONS` connections at a time (more are
closed at once), `MAX_HEAD_BYTES` of request line and headers, and `REQUEST_TIMEOUT_S` for the whole exchange.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial

import trio
from prometheus_client.exposition import choose_encoder

from nvdp.core.config.settings import parse_address
from nvdp.observe.metrics import Metrics

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
MAX_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 10.0

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
        return True, "ok"


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
    host, port = parse_address(address)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    handler = partial(_handle, metrics=metrics, state=state, limiter=limiter)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, port, host=host))
        bound = listeners[0].socket.getsockname()[1]
        log.info("serving /metrics, /healthz and /readyz on %s:%d", host or "*", bound)
        task_status.started(bound)


async def _handle(stream: trio.SocketStream, *, metrics: Metrics, state: ProbeState,
                  limiter: trio.CapacityLimiter) -> None:
    try:
        limiter.acquire_on_behalf_of_nowait(stream)
    except trio.WouldBlock:
        await stream.aclose()
        return
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            await _exchange(stream, metrics, state)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away; nothing to tell it
    except Exception:
        # An exception escaping a serve_tcp handler would end the daemon's nursery: a probe is not worth that.
        log.exception("error answering an HTTP request")
    finally:
        limiter.release_on_behalf_of(stream)
        await stream.aclose()


async def _exchange(stream: trio.SocketStream, metrics: Metrics, state: ProbeState) -> None:
    head = await _read_head(stream)
    if head is None:
        return  # closed before a whole request arrived
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
        try:
            # Content negotiation as prometheus-client's own servers do it: OpenMetrics when asked for, else text.
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            body = encoder(metrics.registry)
        except Exception:
            log.exception("cannot render /metrics")
            await _respond(stream, 500, "cannot render metrics\n", head_only=head_only)
            return
        await _respond(stream, 200, body, content_type=content_type, head_only=head_only)
        return
    ok, why = state.health() if path == "/healthz" else state.readiness()
    await _respond(stream, 200 if ok else 503, why.replace("\n", " ") + "\n", head_only=head_only)


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
