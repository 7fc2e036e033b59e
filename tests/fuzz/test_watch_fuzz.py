"""Kubernetes watch streams, fuzzed: the node-label watch (`watch_node_label` over `watch_object`, through the real
`ApiClient` and httpx) against a scripted API server that sends random event sequences with noise between the
real changes: bookmarks, events for other objects, garbage lines, events split across chunks, streams cut mid-line,
ERROR events (410 and others), HTTP errors on list and watch, and compactions that make a resumed watch too old.

The server itself is truthful (as a real one is): every change it makes to the Node is in its history, a resumed
watch replays the history after the requested resourceVersion, and a list returns the current state. The property:
once the script is over and the watch sits idle, the last value the watch yielded is the label's final value, and
it never yielded the same value twice in a row.

Time is trio's MockClock with autojump, so backoffs and stream timeouts cost nothing and a watch that never settles
fails on a (virtual) deadline rather than hanging.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nvdp.k8s.client import ApiClient, ApiConfig
from nvdp.k8s.node_labels import NODES_PATH, watch_node_label
from nvdp.k8s.watch import WatchOptions
from tests.fuzz._settings import fuzz_settings

# Long by design (hundreds of examples each): the slow lane, which CI runs (docs/reliability.md).
pytestmark = pytest.mark.slow

NODE = "n1"
LABEL = "nvidia.com/device-plugin.config"
FAST = WatchOptions(timeout_s=60.0, read_grace_s=5.0, backoff_initial_s=0.05, backoff_max_s=1.0, min_stream_s=0.5)
DELETE = "<delete>"
VALUES = (None, "", "a", "b", "config-2", "ü-config", DELETE)

# One item of a scripted watch stream: (kind, argument).
Item = tuple[str, Any]
#: Items after which the stream ends (the rest of the step is dropped, as a real connection would drop it).
ENDING = {"truncate", "error", "end"}


@dataclass
class ScriptedApi:
    """A Kubernetes API server for one Node, following a script of watch streams, then idle."""

    steps: list[list[Item] | int]
    list_faults: list[int]
    exists: bool
    labels: dict[str, str]
    rv: int = 100
    compacted: int = 0
    gone_as_status: bool = False
    #: (rv, type, object) of every change to the Node.
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    idle: trio.Event = field(default_factory=trio.Event)
    lists: int = 0
    watches: int = 0

    # -- the truth ---------------------------------------------------------------------------------------------

    def node(self) -> dict[str, Any]:
        return {"kind": "Node", "apiVersion": "v1",
                "metadata": {"name": NODE, "resourceVersion": str(self.rv), "labels": dict(self.labels)},
                "status": {"capacity": {"nvidia.com/gpu": "4"}}}

    def expected(self) -> str | None:
        return (self.labels.get(LABEL) or None) if self.exists else None

    def change(self, value: str | None) -> dict[str, Any]:
        """Apply a change to the Node; returns its watch event."""
        self.rv += 1
        if value == DELETE:
            kind = "DELETED" if self.exists else "ADDED"
            self.exists = not self.exists
        else:
            kind = "MODIFIED" if self.exists else "ADDED"
            self.exists = True
            self.labels = {"kubernetes.io/hostname": NODE}
            if value is not None:
                self.labels[LABEL] = value
        event = {"type": kind, "object": self.node()}
        self.history.append((self.rv, kind, event["object"]))
        return event

    # -- HTTP --------------------------------------------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == NODES_PATH
        assert request.url.params["fieldSelector"] == f"metadata.name={NODE}"
        if request.url.params.get("watch") != "true":
            self.lists += 1
            if self.list_faults:
                return _status(self.list_faults.pop(0))
            items = [self.node()] if self.exists else []
            return _json(200, {"kind": "NodeList", "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        self.watches += 1
        since = int(request.url.params["resourceVersion"])
        step = self.steps.pop(0) if self.steps else None
        if isinstance(step, int):
            return _status(step)
        if since < self.compacted:
            if self.gone_as_status:
                return _status(410)
            return httpx.Response(200, content=_lines([_error(410)]))
        replay = [{"type": kind, "object": obj} for rv, kind, obj in self.history if rv > since]
        return httpx.Response(200, content=self._stream(replay, step))

    async def _stream(self, replay: list[dict[str, Any]], step: list[Item] | None) -> AsyncIterator[bytes]:
        for event in replay:
            yield _line(event)
        if step is None:
            # The script is over: a healthy, quiet watch from here on.
            self.idle.set()
            await trio.sleep_forever()
        for kind, arg in step or ():
            await trio.sleep(0.01)
            if kind == "set":
                yield _line(self.change(arg))
            elif kind == "split":
                data = _line(self.change(arg))
                yield data[:arg_split(data)]
                await trio.sleep(0.01)
                yield data[arg_split(data):]
            elif kind == "other":
                # Another object's event: a real server filters these out by field selector; nvdp must cope anyway.
                self.rv += 1
                yield _line({"type": "MODIFIED", "object": {"kind": "Node", "metadata": {
                    "name": "n2", "resourceVersion": str(self.rv), "labels": {LABEL: "other"}}}})
            elif kind == "bookmark":
                yield _line({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                                            "metadata": {"resourceVersion": str(self.rv)}}})
            elif kind == "garbage":
                yield arg.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n"
            elif kind == "compact":
                self.compacted = self.rv
            elif kind == "truncate":
                # A change the watch does not get whole: the connection drops mid-line.
                data = _line(self.change(arg))
                yield data[: len(data) // 2]
                return
            elif kind == "error":
                yield _line(_error(arg))
                return
            elif kind == "end":
                return


def arg_split(data: bytes) -> int:
    return len(data) // 3


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


async def _lines(lines: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for event in lines:
        yield _line(event)


def _error(code: int) -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "message": "fuzz", "reason": "Expired" if code == 410 else "InternalError",
                                        "code": code}}


def _json(status: int, body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _status(code: int) -> httpx.Response:
    return _json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "fuzz", "code": code})


# --- strategies -------------------------------------------------------------------------------------------------

VALUE = st.sampled_from(VALUES)
ITEM = st.one_of(
    st.tuples(st.just("set"), VALUE), st.tuples(st.just("set"), VALUE), st.tuples(st.just("split"), VALUE),
    st.tuples(st.just("other"), st.none()), st.tuples(st.just("bookmark"), st.none()),
    st.tuples(st.just("garbage"), st.one_of(st.binary(max_size=30), st.sampled_from(
        [b"{", b"{}", b'{"type": "MODIFIED"}', b'{"type": "MODIFIED", "object": {"metadata": {"labels": 3}}}',
         b'{"type": "ADDED", "object": []}', b"null", b"\xff\xfe\x00"]))),
    st.tuples(st.just("compact"), st.none()),
    st.tuples(st.just("truncate"), VALUE), st.tuples(st.just("error"), st.sampled_from([410, 410, 500, 403])),
    st.tuples(st.just("end"), st.none()),
)
STEPS = st.lists(st.one_of(st.lists(ITEM, max_size=6), st.lists(ITEM, max_size=6),
                           st.sampled_from([410, 500, 503, 429, 403])), max_size=6)


async def _run(api: ScriptedApi) -> list[str | None]:
    config = ApiConfig(server="http://fake-apiserver", source="scripted API server")
    yielded: list[str | None] = []
    async with httpx.AsyncClient(base_url=config.server, transport=httpx.MockTransport(api.handle)) as http:
        client = ApiClient(http, config)
        # Virtual time: a watch that never settles fails here instead of hanging the test.
        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    async with watch_node_label(client, NODE, LABEL, FAST) as values:
                        async for value in values:
                            yielded.append(value)

                nursery.start_soon(follow)
                await api.idle.wait()
                # Let the watch take in the replayed history; with autojump this returns once everything is idle.
                await trio.sleep(5)
                nursery.cancel_scope.cancel()
    return yielded


@fuzz_settings(max_examples=250, deadline_ms=3000)
@given(STEPS, st.lists(st.sampled_from([500, 503, 429, 403]), max_size=2), st.booleans(), VALUE, st.booleans())
def test_label_converges_to_the_last_value(steps: list[list[Item] | int], list_faults: list[int], exists: bool,
                                           initial: str | None, gone_as_status: bool) -> None:
    scripted_steps, scripted_list_faults = len(steps), len(list_faults)
    api = ScriptedApi(steps=steps, list_faults=list_faults, exists=exists, labels={},
                      gone_as_status=gone_as_status)
    if initial not in (None, DELETE):
        api.labels = {LABEL: initial}
    yielded = trio.run(_run, api, clock=trio.testing.MockClock(autojump_threshold=0))
    assert yielded, "the watch yields the value at start"
    assert yielded[-1] == api.expected(), (yielded, api.expected())
    assert all(a != b for a, b in itertools.pairwise(yielded)), f"a value yielded twice: {yielded}"
    # Bounded effort: at most one list per scripted failure or restart, one watch per step or list, plus the end.
    assert api.lists <= 1 + scripted_list_faults + scripted_steps, (api.lists, steps)
    assert api.watches <= scripted_steps + api.lists + 1, (api.watches, steps)


def test_no_example_needs_infinite_time() -> None:
    # A sanity check of the harness itself: an empty script settles at the initial value.
    api = ScriptedApi(steps=[], list_faults=[], exists=True, labels={LABEL: "a"})
    assert trio.run(_run, api, clock=trio.testing.MockClock(autojump_threshold=0)) == ["a"]
    assert math.isfinite(FAST.timeout_s)
