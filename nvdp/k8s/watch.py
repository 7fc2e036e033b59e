"""List-then-watch of one named object (or of the objects selectors pick), kept alive through everything the API
server and the network do to it.

`watch_object()` yields the object (or None while it does not exist) at start and whenever a watch event changes
it; `watch_collection()`, on which it is built, yields every object its field and label selectors match, by name.
The protocol, as client-go's reflector runs it:

- list with the selectors (`fieldSelector=metadata.name=<name>` for one object): the objects and the list's
  `resourceVersion`;
- watch from that version with `allowWatchBookmarks` (bookmarks move the version forward without an object, so a
  resumed watch is rarely too old) and `timeoutSeconds` (the server ends the stream; we open a new one);
- after a dropped stream, watch again from the last version seen; on 410 Gone, whether it comes as an ERROR event or
  as the HTTP status of the watch request, list again;
- every failure waits a capped exponential backoff with jitter before the next try, so a broken server is never
  hammered (a failing list followed by an instant 410 would otherwise spin);
- a watch that receives nothing for `timeoutSeconds` + a grace period has stalled (a half-open connection the kernel
  does not notice): httpx's per-read timeout ends it and we reconnect.

Each watch opened again, and each list again, is told to a `WatchObserver` (the metrics implement it; this package
does not import them).

Reading the stream happens in a child task. httpx's `aiter_lines()` is a stack of async generators: leaving it
early with `break` (or by raising from the loop body) leaves them unfinalised, which trio reports. The child task
always ends by reading to the end of the stream, by an error raised inside the read, or by cancellation, which
unwinds every generator in the stack.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import httpx
import msgspec
import trio

from nvdp.k8s.client import ApiClient, ApiError, ApiUnreachable, Status, api_error, redact

log = logging.getLogger(__name__)


class ObjectMeta(msgspec.Struct, kw_only=True, rename="camel"):
    name: str = ""
    namespace: str = ""
    resource_version: str = ""
    labels: dict[str, str] | None = None
    uid: str = ""


class KubeObject(msgspec.Struct, kw_only=True, rename="camel"):
    """The part every object shares. Subclasses add the few fields they read; msgspec skips the rest."""

    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)


T = TypeVar("T", bound=KubeObject)


class _ListMeta(msgspec.Struct, kw_only=True, rename="camel"):
    resource_version: str = ""


class ObjectList(msgspec.Struct, Generic[T], kw_only=True):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[T] | None = None


class _Event(msgspec.Struct):
    type: str
    #: Decoded once the type is known: an object, a bookmark's bare metadata, or a Status.
    object: msgspec.Raw


class WatchObserver(Protocol):
    """Told what the watches go through (`nvdp.observe.metrics.Metrics` counts it). Called on trio; never blocks.

    `watched` names the object, as `/api/v1/nodes/node-1`."""

    def watch_reconnected(self, watched: str) -> None:
        """A watch is opened again after the previous one on the same object ended or failed."""

    def watch_relisted(self, watched: str) -> None:
        """The object is listed again, because a watch could not resume (410 Gone, an undecodable event)."""


@dataclass(frozen=True, slots=True)
class WatchOptions:
    #: `timeoutSeconds` asked of the server (jittered up to +25 %, so a fleet of nodes does not reconnect in step).
    timeout_s: float = 240.0
    #: A stream silent for `timeout_s` + this long has stalled.
    read_grace_s: float = 30.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: A stream that ends sooner than this having delivered nothing counts as a failure (backoff), so a proxy that
    #: closes every watch at once cannot make us loop.
    min_stream_s: float = 1.0


class Backoff:
    """Capped exponential backoff with "equal jitter": each delay is uniform in [d/2, d], d doubling to the cap."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True, slots=True)
class _StreamFailed:
    error: Exception


def _describe(error: Exception) -> str:
    if isinstance(error, ApiError):
        hint = ""
        if error.status == 401:
            hint = " (the token is missing, expired or not accepted)"
        elif error.status == 403:
            hint = " (RBAC: nvdp's service account needs get, list and watch on this object)"
        return f"{error}{hint}"
    if isinstance(error, httpx.ReadTimeout):
        return "no data within the read deadline: the watch has stalled"
    # Transport errors quote what they choke on (h11: "Illegal header value b'Bearer ...'"): bounded, redacted.
    return f"{type(error).__name__}: {redact(str(error))}" if str(error) else type(error).__name__


@trio.as_safe_channel
async def watch_object(
    client: ApiClient,
    path: str,
    name: str,
    kind: type[T],
    options: WatchOptions | None = None,
    *,
    observer: WatchObserver | None = None,
) -> AsyncGenerator[T | None, None]:
    """Yield the object `name` in the collection at `path` (e.g. `/api/v1/nodes`) as it is now, then every time
    it changes; None while it does not exist. Runs until the caller leaves the `async with`. `observer` is told of
    every reconnect and relist.

    Use as ``async with watch_object(...) as states: async for state in states: ...``.
    """
    first = True
    last: T | None = None
    what = f"{path.rstrip('/')}/{name}"
    async with watch_collection(client, path, kind, options, field_selector=f"metadata.name={name}",
                                observer=observer, what=what) as states:
        async for state in states:
            current = state.get(name)
            if first or current != last:
                first, last = False, current
                yield current


@trio.as_safe_channel
async def watch_collection(
    client: ApiClient,
    path: str,
    kind: type[T],
    options: WatchOptions | None = None,
    *,
    field_selector: str = "",
    label_selector: str = "",
    observer: WatchObserver | None = None,
    what: str = "",
) -> AsyncGenerator[dict[str, T], None]:
    """Yield the objects of the collection at `path` that match the selectors, by name, as they are now, then
    every time one is added, changed or deleted. Runs until the caller leaves the `async with`; `observer` is told
    of every reconnect and relist (naming the watch `what`, by default the path and selectors).

    Each yielded dict is a new one: the caller may keep it.
    """
    options = options or WatchOptions()
    backoff = Backoff(options.backoff_initial_s, options.backoff_max_s)
    selectors = {k: v for k, v in (("fieldSelector", field_selector), ("labelSelector", label_selector)) if v}
    if not what:
        what = path.rstrip("/") + "".join(f"?{k}={v}" for k, v in selectors.items())
    state: dict[str, T] = {}
    have_yielded = False
    version: str | None = None  # None: list first
    just_listed = False
    watched_before = False

    while True:
        if version is None:
            try:
                body = await client.get_json(path, selectors)
                listing: ObjectList[T] = msgspec.json.decode(body, type=ObjectList[kind])  # type: ignore[valid-type]
            except (ApiUnreachable, ApiError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                delay = backoff.next_delay()
                log.warning("cannot list %s: %s; retrying in %.1f s", what, _describe(exc), delay)
                await trio.sleep(delay)
                continue
            version = listing.metadata.resource_version
            listed = {item.metadata.name: item for item in listing.items or ()}
            log.debug("listed %s at resourceVersion %s (%d found)", what, version, len(listed))
            just_listed = True
            if not have_yielded or listed != state:
                state, have_yielded = listed, True
                yield dict(state)

        timeout = options.timeout_s * random.uniform(1.0, 1.25)
        params = {
            **selectors,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(max(1, int(timeout))),
        }
        if watched_before and observer is not None:
            observer.watch_reconnected(what)
        watched_before = True
        started = trio.current_time()
        progressed = gone = False
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            # Unbounded, so the reader never waits anywhere but inside httpx's read (see the module docstring);
            # the watched objects' events are small and few.
            send, receive = trio.open_memory_channel[bytes | _StreamFailed](math.inf)
            nursery.start_soon(_read_stream, client, path, params, timeout + options.read_grace_s, send)
            with receive:
                async for item in receive:
                    if isinstance(item, _StreamFailed):
                        failure = item.error
                        break
                    try:
                        event = msgspec.json.decode(item, type=_Event)
                        if event.type == "ERROR":
                            status = msgspec.json.decode(event.object, type=Status)
                            if status.code == 410:
                                gone = True
                            else:
                                failure = ApiError(status.code, redact(status.reason)[:80], redact(status.message))
                            break
                        if event.type == "BOOKMARK":
                            version = msgspec.json.decode(event.object, type=KubeObject).metadata.resource_version
                            progressed = True
                            continue
                        obj = msgspec.json.decode(event.object, type=kind)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        # Not something a retry from the same version would fix: start over from a list.
                        log.warning("undecodable watch event for %s: %s; listing again", what, redact(str(exc)))
                        version = None
                        if observer is not None:
                            observer.watch_relisted(what)
                        break
                    version = obj.metadata.resource_version or version
                    progressed = True
                    name = obj.metadata.name
                    if event.type == "DELETED":
                        if name in state:
                            del state[name]
                            yield dict(state)
                    elif state.get(name) != obj:
                        state[name] = obj
                        yield dict(state)
                # Ends the reader if it is still reading: cancellation unwinds httpx's generators, a break would
                # not. Before the channel closes, so the reader is never woken by a closed channel instead.
                nursery.cancel_scope.cancel()

        if isinstance(failure, ApiError) and failure.status == 410:
            gone, failure = True, None
        lasted = trio.current_time() - started
        if progressed or (failure is None and not gone and lasted >= options.min_stream_s):
            backoff.reset()
        if gone:
            log.info("watch of %s expired (410 Gone at resourceVersion %s): listing again", what, version)
            version = None
            if observer is not None:
                observer.watch_relisted(what)
            if just_listed and not progressed:
                # Listed, then immediately told the version is too old: do not spin between the two.
                await trio.sleep(backoff.next_delay())
        elif version is None:
            await trio.sleep(backoff.next_delay())
        elif failure is not None:
            delay = backoff.next_delay()
            log.warning("watch of %s failed: %s; reconnecting in %.1f s", what, _describe(failure), delay)
            await trio.sleep(delay)
        elif not progressed and lasted < options.min_stream_s:
            delay = backoff.next_delay()
            log.warning("watch of %s ended after %.1f s with nothing received; reconnecting in %.1f s",
                        what, lasted, delay)
            await trio.sleep(delay)
        else:
            log.debug("watch of %s ended after %.0f s; resuming from resourceVersion %s", what, lasted, version)
        just_listed = False


async def _read_stream(
    client: ApiClient,
    path: str,
    params: dict[str, str],
    read_timeout: float,
    send: trio.MemorySendChannel[bytes | _StreamFailed],
) -> None:
    """Forward each line of one watch stream, then end; errors are sent as `_StreamFailed`, not raised, so the
    watch loop decides what they mean.

    The loop body never awaits (an await there is where a cancellation would land, outside httpx's generators) and
    never raises: lines arriving after the watch loop stopped listening are dropped until the cancellation comes.
    """

    def forward(item: bytes | _StreamFailed) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            send.send_nowait(item)

    with send:
        try:
            async with client.stream(path, params, read_timeout) as response:
                if response.status_code != 200:
                    body = await response.aread()
                    forward(_StreamFailed(api_error(response.status_code, response.reason_phrase, body)))
                    return
                async for line in response.aiter_lines():
                    if line.strip():
                        forward(line.encode())
        except httpx.HTTPError as exc:
            forward(_StreamFailed(exc))
