"""An in-process fake Kubernetes API server: just enough of it to exercise nvdp's watches, and every way they break.

Raw ASGI on hypercorn's trio worker, real TLS with trustme certificates (trustme is imported only for TLS, so
the plain-http server `nvdp demo --dra` runs needs hypercorn alone). It serves Nodes (`/api/v1/nodes`) and
ConfigMaps (`/api/v1/namespaces/<ns>/configmaps`): list and watch with `fieldSelector=metadata.name=<name>`,
`resourceVersion`, `allowWatchBookmarks` and `timeoutSeconds`, and a history of changes from which a watch resumes.

Faults, all from the test's side:

- `expire()`: forget the history (etcd compaction); open watches get a 410 ERROR event, and a watch resumed from an
  older version gets 410 as an event or, with `gone_as = "status"`, as the HTTP status;
- `drop_watches(abrupt=...)`: end every open watch stream, cleanly or by resetting the connection mid-body;
- `stalled = True`: open watches go silent and ignore `timeoutSeconds` (a half-open connection);
- `fail_next(kind, status, count)`: answer the next lists or watches with an error status;
- `offline()`: stop listening and drop every connection, then come back on the same port;
- `wipe_resourceslices(node)`: the kubelet deleting a node's ResourceSlices (the resource.k8s.io/v1 block, near the
  end of the class, says what of that API is served);
- `token`: requests without `Authorization: Bearer <token>` get 401 (change it to simulate rotation); with
  `require_client_cert`, TLS itself checks the client certificate instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import http
import json
import math
import ssl
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio
import yaml
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from nvdp.k8s.client import ApiConfig

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

NODES = "/api/v1/nodes"


@dataclass
class Change:
    rv: int
    collection: str
    type: str
    obj: dict[str, Any]


@dataclass
class Request:
    kind: str  # "list" | "watch" | "other"
    path: str
    query: dict[str, str]
    status: int = 200


@dataclass(eq=False)
class _Watch:
    #: None | "expire" | "drop" | "reset"
    action: str | None = None


class _Abort(Exception):
    """Raised inside the app to make hypercorn reset a connection mid-response."""


class FakeApiServer:
    def __init__(self, workdir: Path, *, tls: bool = True, token: str | None = "token-1",
                 require_client_cert: bool = False, bookmark_interval_s: float | None = None) -> None:
        self.workdir = workdir
        self.tls = tls
        self.token = token
        self.require_client_cert = require_client_cert
        self.bookmark_interval_s = bookmark_interval_s
        self.gone_as = "event"
        self.stalled = False
        self.rv = 100
        self.compacted_rv = 0
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[Change] = []
        self.requests: list[Request] = []
        self.faults: dict[str, list[int]] = {"list": [], "watch": []}
        self.port = 0
        self._changed = trio.Event()
        self._watches: set[_Watch] = set()
        self._watch_opened = trio.Event()
        self._request_seen = trio.Event()
        self._ca: Any = None
        self._backend_port = 0
        self._proxy_scope: trio.CancelScope | None = None
        self._proxy_stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: (path, body) of every Event POSTed.
        self.posted_events: list[tuple[str, dict[str, Any]]] = []
        #: GFD labels (`_gfd_routes`): NodeFeature objects by (namespace, name), and Pods by (namespace, name).
        self.node_features: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        #: False: NFD's CRD is not installed; the nodefeatures paths answer 404.
        self.node_feature_api = True

    # -- the test's side --------------------------------------------------------------------------------------

    @property
    def ca(self) -> Any:
        """The trustme CA that signs the server's (and clients') certificates, made on first use."""
        if self._ca is None:
            import trustme

            self._ca = trustme.CA()
        return self._ca

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def api_config(self, *, token: str | None = None, token_file: Path | None = None) -> ApiConfig:
        return ApiConfig(server=self.url, source="fake API server",
                         ca_data=self.ca.cert_pem.bytes() if self.tls else None,
                         token=token, token_file=token_file)

    def client_cert(self) -> tuple[bytes, bytes]:
        issued = self.ca.issue_cert("nvdp-node")
        return issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes()

    def count(self, kind: str, path: str | None = None) -> int:
        return sum(1 for r in self.requests if r.kind == kind and (path is None or r.path == path))

    def set_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        self._put(NODES, name, {"apiVersion": "v1", "kind": "Node",
                                "metadata": {"name": name, "labels": dict(labels or {})},
                                "status": {"conditions": [{"type": "Ready", "status": "True"}]}})

    def patch_node_labels(self, name: str, changes: dict[str, str | None]) -> None:
        obj = copy.deepcopy(self.objects[(NODES, name)])
        labels = obj["metadata"].setdefault("labels", {})
        for key, value in changes.items():
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value
        self._put(NODES, name, obj)

    def delete_node(self, name: str) -> None:
        self._delete(NODES, name)

    def set_configmap(self, namespace: str, name: str, data: dict[str, str],
                      binary_data: dict[str, str] | None = None) -> None:
        obj: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": name, "namespace": namespace}, "data": dict(data)}
        if binary_data:
            obj["binaryData"] = dict(binary_data)
        self._put(f"/api/v1/namespaces/{namespace}/configmaps", name, obj)

    def delete_configmap(self, namespace: str, name: str) -> None:
        self._delete(f"/api/v1/namespaces/{namespace}/configmaps", name)

    def touch_node(self, name: str) -> None:
        """A change that does not touch labels (as the kubelet's status updates)."""
        obj = copy.deepcopy(self.objects[(NODES, name)])
        obj["status"]["heartbeat"] = self.rv + 1
        self._put(NODES, name, obj)

    def expire(self) -> None:
        """Compaction: every version so far is too old to resume from; open watches get a 410 ERROR event."""
        self.compacted_rv = self.rv + 1
        self.history.clear()
        self._act("expire")

    def drop_watches(self, *, abrupt: bool = False) -> None:
        self._act("reset" if abrupt else "drop")

    def fail_next(self, kind: str, status: int = 500, count: int = 1) -> None:
        self.faults.setdefault(kind, []).extend([status] * count)

    def wake(self) -> None:
        old, self._changed = self._changed, trio.Event()
        old.set()

    async def wait_requests(self, kind: str, count: int) -> None:
        """Until `count` requests of `kind` ("list", "watch") have arrived in all."""
        while self.count(kind) < count:
            await self._request_seen.wait()

    async def wait_watching(self, count: int = 1) -> None:
        """Until at least `count` watch streams are open."""
        while len(self._watches) < count:
            await self._watch_opened.wait()

    @contextlib.asynccontextmanager
    async def offline(self) -> AsyncIterator[None]:
        """The server is gone for the block's duration: every connection is cut and new ones are refused. Then it
        is back on the same port, with the same state."""
        assert self._nursery is not None and self._proxy_scope is not None
        self._proxy_scope.cancel()
        await self._proxy_stopped.wait()
        try:
            yield
        finally:
            await self._nursery.start(self._proxy)

    # -- internals ---------------------------------------------------------------------------------------------

    def _put(self, collection: str, name: str, obj: dict[str, Any]) -> None:
        kind = "MODIFIED" if (collection, name) in self.objects else "ADDED"
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[(collection, name)] = obj
        self.history.append(Change(self.rv, collection, kind, copy.deepcopy(obj)))
        self.wake()

    def _delete(self, collection: str, name: str) -> None:
        obj = self.objects.pop((collection, name))
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append(Change(self.rv, collection, "DELETED", obj))
        self.wake()

    def _act(self, action: str) -> None:
        for watch in self._watches:
            watch.action = action
        self.wake()

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """hypercorn on a private port. Clients reach it through `_proxy`, which the test can cut: hypercorn's own
        shutdown waits for open streams, so it is not the way to make a server vanish."""
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.graceful_timeout = 0.1
        config.accesslog = None
        config.errorlog = None
        if self.tls:
            cert = self.ca.issue_cert("127.0.0.1", "localhost")
            config.certfile = str(self.workdir / "server.crt")
            config.keyfile = str(self.workdir / "server.key")
            cert.cert_chain_pems[0].write_to_path(config.certfile)
            cert.private_key_pem.write_to_path(config.keyfile)
            if self.require_client_cert:
                config.ca_certs = str(self.workdir / "ca.crt")
                self.ca.cert_pem.write_to_path(config.ca_certs)
                config.verify_mode = ssl.CERT_REQUIRED
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, self._app, config))  # type: ignore[arg-type]
            self._backend_port = int(binds[0].rsplit(":", 1)[1])
            task_status.started()

    async def _proxy(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._proxy_stopped = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._proxy_scope = nursery.cancel_scope
                task_status.started()
                await trio.serve_listeners(self._pipe, listeners, handler_nursery=nursery)
        finally:
            self._proxy_stopped.set()

    async def _pipe(self, downstream: trio.SocketStream) -> None:
        async with downstream:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self._backend_port)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_copy, downstream, upstream, nursery.cancel_scope)
                nursery.start_soon(_copy, upstream, downstream, nursery.cancel_scope)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        query = dict(parse_qsl(scope["query_string"].decode()))
        watching = query.get("watch") in ("true", "1")
        request = Request("watch" if watching else "list", path, query)
        self.requests.append(request)
        self._request_seen.set()
        self._request_seen = trio.Event()
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode()
        if self.token is not None and authorization != f"Bearer {self.token}" and not (
                self.require_client_cert and not authorization):
            request.status = 401
            await _respond(send, 401, _status(401, "Unauthorized", "Unauthorized"))
            return
        if await self._dra_route(scope, receive, send, request, query):
            return
        if scope["method"] == "POST" and path.startswith("/api/v1/namespaces/") and path.endswith("/events"):
            # Events the daemon posts about its Node: kept for the test to read.
            event = await _read_json_body(receive)
            request.kind = "event"
            self.posted_events.append((path, event))
            await _respond(send, 201, event)
            return
        if await self._gfd_routes(scope, receive, send, request):
            return
        collection = path if path == NODES or (path.startswith("/api/v1/namespaces/")
                                               and path.endswith("/configmaps")) else None
        if collection is None or scope["method"] != "GET":
            request.kind = "other"
            request.status = 404
            await _respond(send, 404, _status(404, "NotFound", f"{path} not found"))
            return
        if self.faults[request.kind]:
            request.status = self.faults[request.kind].pop(0)
            reason = http.HTTPStatus(request.status).phrase.replace(" ", "")
            await _respond(send, request.status, _status(request.status, reason, "injected fault"))
            return
        selector = query.get("fieldSelector", "")
        name = selector.removeprefix("metadata.name=") if selector.startswith("metadata.name=") else None
        if watching:
            await self._watch(scope, receive, send, request, collection, name, query)
        else:
            items = [copy.deepcopy(o) for (c, n), o in sorted(self.objects.items())
                     if c == collection and (name is None or n == name)]
            await _respond(send, 200, {"kind": "List", "apiVersion": "v1",
                                       "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def _watch(self, scope: Scope, receive: Receive, send: Send, request: Request, collection: str,
                     name: str | None, query: dict[str, str],
                     match: Callable[[dict[str, Any]], bool] | None = None) -> None:
        since = int(query.get("resourceVersion") or 0)
        if since and since < self.compacted_rv:
            message = f"too old resource version: {since} ({self.compacted_rv})"
            if self.gone_as == "status":
                request.status = 410
                await _respond(send, 410, _status(410, "Expired", message))
            else:
                await _start(send, 200)
                await _chunk(send, {"type": "ERROR", "object": _status(410, "Expired", message)})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        deadline = trio.current_time() + timeout
        watch = _Watch()
        self._watches.add(watch)
        self._watch_opened.set()
        self._watch_opened = trio.Event()
        try:
            await _start(send, 200)
            cursor = since
            if not since:  # "any version": the current state as ADDED events
                for (c, n), obj in sorted(self.objects.items()):
                    if c == collection and (name is None or n == name) and (match is None or match(obj)):
                        await _chunk(send, {"type": "ADDED", "object": obj})
                cursor = self.rv
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnected, receive, nursery.cancel_scope)
                next_bookmark = trio.current_time() + (self.bookmark_interval_s or math.inf)
                while True:
                    changed = self._changed  # before looking, so that no change is missed
                    if watch.action == "expire":
                        await _chunk(send, {"type": "ERROR", "object": _status(410, "Expired", "compacted")})
                        break
                    if watch.action == "drop":
                        break
                    if watch.action == "reset":
                        raise _Abort("connection reset by the fake API server")
                    if not self.stalled:
                        # Up to the version now: a change made while an event is being sent is sent next round.
                        upto = self.rv
                        for change in [h for h in self.history if cursor < h.rv <= upto]:
                            if change.collection == collection and (name is None or
                                                                    change.obj["metadata"]["name"] == name) \
                                    and (match is None or match(change.obj)):
                                await _chunk(send, {"type": change.type, "object": change.obj})
                        cursor = upto
                        if bookmarks and trio.current_time() >= next_bookmark:
                            kind = _BOOKMARK_KINDS.get(collection, "Node" if collection == NODES else "ConfigMap")
                            await _chunk(send, {"type": "BOOKMARK", "object": {
                                "kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(upto)}}})
                            next_bookmark = trio.current_time() + (self.bookmark_interval_s or math.inf)
                        if trio.current_time() >= deadline:
                            break
                    with trio.move_on_at(math.inf if self.stalled else min(deadline, next_bookmark)):
                        await changed.wait()
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._watches.discard(watch)

    # == resource.k8s.io/v1 (DRA): ResourceSlices, ResourceClaims, DeviceClasses ==================================
    # ResourceSlices: list and watch with fieldSelector (metadata.name, spec.nodeName, spec.driver) and labelSelector
    # (`k=v`, `k`), create with generateName, get, update with resourceVersion (409 on a stale one), delete with
    # uid/resourceVersion preconditions; the server fills `timeAdded` of taints, as the real one does, and refuses
    # a slice over the API's device limits or a change of an immutable field (422). `slice_writer_node`: refuse
    # (403) writes of slices of any other node, as the chart's ValidatingAdmissionPolicy does. ResourceClaims:
    # namespaced get of what the test put in. DeviceClasses: list and get. Nodes: get by name (with a uid).

    slice_writer_node: str | None = None

    def dra_writes(self) -> list[Request]:
        """Every create, update and delete of a ResourceSlice, in order."""
        return [r for r in self.requests if r.kind in ("create", "update", "delete") and r.path.startswith(SLICES)]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until `condition()` holds, checked again after every change of any object."""
        while True:
            changed = self._changed  # before looking, so that no change is missed
            if condition():
                return
            await changed.wait()

    def resourceslices(self, node_name: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (c, _), o in sorted(self.objects.items())
                if c == SLICES and (node_name is None or o["spec"].get("nodeName") == node_name)]

    def put_resourceslice(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a slice as another writer would (kept as given, plus server fields)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        self._put(SLICES, meta["name"], obj)
        return self.objects[(SLICES, meta["name"])]

    def wipe_resourceslices(self, node_name: str) -> int:
        """What the kubelet does at its start and 30 s after a DRA plugin vanished: delete the node's slices."""
        names = [n for (c, n), o in list(self.objects.items())
                 if c == SLICES and o["spec"].get("nodeName") == node_name]
        for name in names:
            self._delete(SLICES, name)
        return len(names)

    def set_resourceclaim(self, claim: dict[str, Any]) -> None:
        meta = claim["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        self._put(f"{RESOURCE_API}/namespaces/{meta['namespace']}/resourceclaims", meta["name"], claim)

    def delete_resourceclaim(self, namespace: str, name: str) -> None:
        self._delete(f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims", name)

    def set_deviceclass(self, obj: dict[str, Any]) -> None:
        self._put(f"{RESOURCE_API}/deviceclasses", obj["metadata"]["name"], obj)

    async def _dra_route(self, scope: Scope, receive: Receive, send: Send, request: Request,
                         query: dict[str, str]) -> bool:
        """Serve the request if it is one of this block's; False to leave it to the rest of the server."""
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "GET" and path.startswith(NODES + "/") and path.count("/") == 4:
            node = self.objects.get((NODES, path.rsplit("/", 1)[1]))
            request.kind = "get"
            if node is None:
                request.status = 404
                await _respond(send, 404, _status(404, "NotFound", f"nodes {path.rsplit('/', 1)[1]!r} not found"))
            else:
                node = copy.deepcopy(node)
                node["metadata"].setdefault("uid", f"uid-{node['metadata']['name']}")
                await _respond(send, 200, node)
            return True
        if not path.startswith(RESOURCE_API + "/"):
            return False
        rest = path.removeprefix(RESOURCE_API + "/").split("/")
        if rest[0] == "resourceslices" and len(rest) <= 2:
            await self._slices(scope, receive, send, request, query, rest[1] if len(rest) == 2 else None)
        elif len(rest) == 4 and rest[0] == "namespaces" and rest[2] == "resourceclaims" and method == "GET":
            await self._get_one(send, request, f"{RESOURCE_API}/namespaces/{rest[1]}/resourceclaims", rest[3])
        elif rest[0] == "deviceclasses" and len(rest) <= 2 and method == "GET":
            if len(rest) == 2:
                await self._get_one(send, request, f"{RESOURCE_API}/deviceclasses", rest[1])
            else:
                items = [copy.deepcopy(o) for (c, _), o in sorted(self.objects.items())
                         if c == f"{RESOURCE_API}/deviceclasses"]
                await _respond(send, 200, {"kind": "DeviceClassList", "apiVersion": "resource.k8s.io/v1",
                                           "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        else:
            request.kind, request.status = "other", 404
            await _respond(send, 404, _status(404, "NotFound", f"{path} not found"))
        return True

    async def _get_one(self, send: Send, request: Request, collection: str, name: str) -> None:
        request.kind = "get"
        obj = self.objects.get((collection, name))
        if obj is None:
            request.status = 404
            await _respond(send, 404, _status(404, "NotFound", f"{name!r} not found"))
        else:
            await _respond(send, 200, copy.deepcopy(obj))

    async def _slices(self, scope: Scope, receive: Receive, send: Send, request: Request, query: dict[str, str],
                      name: str | None) -> None:
        method: str = scope["method"]
        if method == "GET" and name is None:
            try:
                match = _slice_matcher(query.get("fieldSelector", ""), query.get("labelSelector", ""))
            except ValueError as exc:
                request.status = 400
                await _respond(send, 400, _status(400, "BadRequest", str(exc)))
                return
            if self.faults[request.kind]:
                request.status = self.faults[request.kind].pop(0)
                await _respond(send, request.status, _status(request.status, "Injected", "injected fault"))
                return
            if request.kind == "watch":
                await self._watch(scope, receive, send, request, SLICES, None, query, match)
            else:
                items = [copy.deepcopy(o) for (c, _), o in sorted(self.objects.items()) if c == SLICES and match(o)]
                await _respond(send, 200, {"kind": "ResourceSliceList", "apiVersion": "resource.k8s.io/v1",
                                           "metadata": {"resourceVersion": str(self.rv)}, "items": items})
            return
        if method == "GET":
            await self._get_one(send, request, SLICES, name or "")
            return
        body = await _read_json_body(receive)
        request.kind = {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(method, "other")
        faults = self.faults.setdefault(request.kind, [])
        if faults:
            request.status = faults.pop(0)
            await _respond(send, request.status, _status(request.status, "Injected", "injected fault"))
            return
        status, answer = self._write_slice(request.kind, name, body)
        request.status = status
        await _respond(send, status, answer)

    def _write_slice(self, kind: str, name: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        current = self.objects.get((SLICES, name or ""))
        if kind == "delete":
            if current is None:
                return 404, _status(404, "NotFound", f"resourceslices {name!r} not found")
            pre = body.get("preconditions") or {}
            for key, field_name in (("uid", "uid"), ("resourceVersion", "resourceVersion")):
                if pre.get(key) and pre[key] != current["metadata"].get(field_name):
                    return 409, _status(409, "Conflict", f"Precondition failed: {key} in precondition: "
                                                         f"{pre[key]}, {key} in object meta: "
                                                         f"{current['metadata'].get(field_name)}")
            self._delete(SLICES, name or "")
            return 200, _status(200, "Success", "deleted") | {"status": "Success"}
        if kind not in ("create", "update"):
            return 405, _status(405, "MethodNotAllowed", "not allowed")
        meta = body.setdefault("metadata", {})
        spec = body.get("spec") or {}
        if self.slice_writer_node is not None and spec.get("nodeName") != self.slice_writer_node:
            return 403, _status(403, "Forbidden", "ValidatingAdmissionPolicy 'nvdp-resourceslices' denied request: "
                                                  "a node may write only its own ResourceSlices")
        problem = _slice_problem(spec)
        if kind == "create":
            if meta.get("name"):
                name = meta["name"]
                if (SLICES, name) in self.objects:
                    return 409, _status(409, "AlreadyExists", f"resourceslices {name!r} already exists")
            elif meta.get("generateName"):
                self._generated += 1
                name = f"{meta['generateName']}{self._generated:05d}"[:253]
            else:
                problem = problem or "metadata.name or metadata.generateName is required"
            if problem:
                return 422, _status(422, "Invalid", f"ResourceSlice is invalid: {problem}")
            meta["name"] = name
            meta["uid"] = str(uuid.uuid4())
            meta.pop("generateName", None)
        else:
            if current is None:
                return 404, _status(404, "NotFound", f"resourceslices {name!r} not found")
            if meta.get("resourceVersion") and meta["resourceVersion"] != current["metadata"]["resourceVersion"]:
                return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on resourceslices.resource.k8s.io '
                                                     f'"{name}": the object has been modified; please apply your '
                                                     "changes to the latest version and try again")
            for path in (("driver",), ("nodeName",), ("pool", "name")):
                old, new = current["spec"], spec
                for key in path:
                    old, new = (old or {}).get(key), (new or {}).get(key)
                if old != new:
                    problem = problem or f"spec.{'.'.join(path)}: field is immutable"
            if problem:
                return 422, _status(422, "Invalid", f"ResourceSlice is invalid: {problem}")
            meta["name"] = name
            meta["uid"] = current["metadata"]["uid"]
        for device in spec.get("devices") or ():
            for taint in device.get("taints") or ():
                taint.setdefault("timeAdded", "2026-12-01T00:00:00Z")
        self._put(SLICES, meta["name"], body)
        return (201 if kind == "create" else 200), copy.deepcopy(self.objects[(SLICES, meta["name"])])

    _generated = 0


    # -- GFD labels: NodeFeature CRUD, one Node's GET and merge-PATCH, one Pod's GET ---------------------------------
    # Request kinds: "get", "post", "put", "patch", "delete" (lists and watches keep theirs).

    async def _gfd_routes(self, scope: Scope, receive: Receive, send: Send, request: Request) -> bool:
        path: str = scope["path"]
        method: str = scope["method"]
        parts = path.strip("/").split("/")
        feature = (len(parts) in (6, 7) and parts[:3] == ["apis", "nfd.k8s-sigs.io", "v1alpha1"]
                   and parts[3] == "namespaces" and parts[5] == "nodefeatures")
        node = len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]
        pod = len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods"
        if not (feature or node or pod) or (node and method not in ("GET", "PATCH")) or (pod and method != "GET"):
            return False
        if feature and not self.node_feature_api:
            return False  # the generic 404 below, as for any path the server does not serve
        request.kind = method.lower()
        body = await _read_json_body(receive) if method in ("POST", "PUT", "PATCH") else {}

        async def answer(status: int, obj: dict[str, Any]) -> bool:
            request.status = status
            await _respond(send, status, obj)
            return True

        def missing(what: str) -> Awaitable[bool]:
            return answer(404, _status(404, "NotFound", f"{what} not found"))

        if pod:
            found = self.pods.get((parts[3], parts[5]))
            return await (answer(200, copy.deepcopy(found)) if found else missing(f'pods "{parts[5]}"'))
        if node:
            key = (NODES, parts[3])
            if key not in self.objects:
                return await missing(f'nodes "{parts[3]}"')
            if method == "PATCH":
                headers = dict(scope["headers"])
                if headers.get(b"content-type") != b"application/merge-patch+json":
                    return await answer(415, _status(415, "UnsupportedMediaType", "expected a merge patch"))
                obj = copy.deepcopy(self.objects[key])
                for field in ("labels", "annotations"):
                    target = obj["metadata"].setdefault(field, {})
                    for name, value in (body.get("metadata", {}).get(field) or {}).items():
                        if value is None:
                            target.pop(name, None)
                        else:
                            target[name] = value
                self._put(NODES, parts[3], obj)
            return await answer(200, copy.deepcopy(self.objects[key]))
        namespace = parts[4]
        if method == "POST" and len(parts) == 6:
            name = body["metadata"]["name"]
            if (namespace, name) in self.node_features:
                return await answer(409, _status(409, "AlreadyExists", f'nodefeatures "{name}" already exists'))
            self.rv += 1
            body["metadata"].update(namespace=namespace, resourceVersion=str(self.rv), uid=f"uid-{self.rv}")
            self.node_features[(namespace, name)] = body
            return await answer(201, copy.deepcopy(body))
        if len(parts) != 7:
            return False
        name = parts[6]
        current = self.node_features.get((namespace, name))
        if current is None:
            return await missing(f'nodefeatures "{name}"')
        if method == "GET":
            return await answer(200, copy.deepcopy(current))
        if method == "DELETE":
            del self.node_features[(namespace, name)]
            return await answer(200, copy.deepcopy(current))
        if method == "PUT":
            if body.get("metadata", {}).get("resourceVersion") not in (None, current["metadata"]["resourceVersion"]):
                return await answer(409, _status(409, "Conflict", "the object has been modified"))
            self.rv += 1
            body["metadata"].update(resourceVersion=str(self.rv), uid=current["metadata"]["uid"])
            self.node_features[(namespace, name)] = body
            return await answer(200, copy.deepcopy(body))
        return False


# == resource.k8s.io/v1 (DRA) helpers ==================================================================================

RESOURCE_API = "/apis/resource.k8s.io/v1"
SLICES = f"{RESOURCE_API}/resourceslices"
_BOOKMARK_KINDS = {SLICES: "ResourceSlice"}


def _slice_matcher(field_selector: str, label_selector: str) -> Callable[[dict[str, Any]], bool]:
    fields: dict[str, str] = {}
    for term in filter(None, field_selector.split(",")):
        key, sep, value = term.partition("=")
        if not sep or key not in ("metadata.name", "spec.nodeName", "spec.driver", "spec.pool.name"):
            raise ValueError(f'field label not supported: "{key}"')
        fields[key] = value
    labels: list[tuple[str, str | None]] = []
    for term in filter(None, label_selector.split(",")):
        key, sep, value = term.partition("=")
        labels.append((key, value if sep else None))

    def match(obj: dict[str, Any]) -> bool:
        spec = obj.get("spec") or {}
        have = {"metadata.name": obj["metadata"].get("name"), "spec.nodeName": spec.get("nodeName"),
                "spec.driver": spec.get("driver"), "spec.pool.name": (spec.get("pool") or {}).get("name")}
        if any(have[k] != v for k, v in fields.items()):
            return False
        own = obj["metadata"].get("labels") or {}
        return all((k in own) if v is None else own.get(k) == v for k, v in labels)

    return match


def _slice_problem(spec: dict[str, Any]) -> str:
    """The checks of resource.k8s.io/v1 validation a test can trip."""
    devices = spec.get("devices") or []
    limit = 64 if any(d.get("taints") for d in devices) else 128
    if len(devices) > limit:
        return f"spec.devices: Too many: {len(devices)}: must have at most {limit} items"
    pool = spec.get("pool") or {}
    if not pool.get("name") or int(pool.get("resourceSliceCount") or 0) <= 0:
        return "spec.pool: name and resourceSliceCount > 0 are required"
    if not spec.get("driver") or not spec.get("nodeName"):
        return "spec: driver and nodeName are required"
    names = [d.get("name") for d in devices]
    if len(set(names)) != len(names):
        return "spec.devices: duplicate device name"
    return ""


async def _read_json_body(receive: Receive) -> dict[str, Any]:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    return json.loads(body) if body.strip() else {}


async def _copy(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    scope.cancel()


async def _until_disconnected(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


async def _start(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})


async def _chunk(send: Send, event: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": json.dumps(event).encode() + b"\n", "more_body": True})


async def _respond(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


@contextlib.asynccontextmanager
async def open_fake_apiserver(**kwargs: Any) -> AsyncIterator[FakeApiServer]:
    """Run a fake API server for the block's duration (on 127.0.0.1, a free port)."""
    with tempfile.TemporaryDirectory(prefix="nvdp-api-") as tmp:
        fake = FakeApiServer(Path(tmp), **kwargs)
        async with trio.open_nursery() as nursery:
            fake._nursery = nursery
            await nursery.start(fake._serve)
            await nursery.start(fake._proxy)
            yield fake
            nursery.cancel_scope.cancel()


def write_kubeconfig(path: Path, fake: FakeApiServer, *, token: str | None = None, token_file: Path | None = None,
                     client_cert: tuple[bytes, bytes] | None = None, inline_ca: bool = True,
                     insecure: bool = False) -> Path:
    """A kubeconfig for the fake server, in the shapes a bare-metal host would have."""
    import base64

    cluster: dict[str, Any] = {"server": fake.url}
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    elif not fake.tls:
        pass  # plain http: no CA to trust
    elif inline_ca:
        cluster["certificate-authority-data"] = base64.b64encode(fake.ca.cert_pem.bytes()).decode()
    else:
        (path.parent / "ca.crt").write_bytes(fake.ca.cert_pem.bytes())
        cluster["certificate-authority"] = "ca.crt"  # relative: resolved against the kubeconfig's directory
    user: dict[str, Any] = {}
    if token:
        user["token"] = token
    if token_file:
        user["tokenFile"] = str(token_file)
    if client_cert:
        user["client-certificate-data"] = base64.b64encode(client_cert[0]).decode()
        user["client-key-data"] = base64.b64encode(client_cert[1]).decode()
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake-cluster", "cluster": cluster}],
        "users": [{"name": "node", "user": user}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake-cluster", "user": "node"}},
                     {"name": "other", "context": {"cluster": "missing", "user": "node"}}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


class Follower:
    """The items of a running watch, collected by a background task so the watch keeps reading while the test
    does other things."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive

    async def next(self, limit_s: float = 20.0) -> Any:  # generous: it only matters when the test fails
        with trio.fail_after(limit_s):
            return await self._receive.receive()

    def pending(self) -> list[Any]:
        items = []
        while True:
            try:
                items.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return items


@contextlib.asynccontextmanager
async def follow(
    source: contextlib.AbstractAsyncContextManager[trio.abc.ReceiveChannel[Any]],
) -> AsyncIterator[Follower]:
    """Run `source` (an `as_safe_channel` watch) in a task for the block's duration."""
    send, receive = trio.open_memory_channel[Any](math.inf)

    async def pump(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with source as items:
            task_status.started()
            async for item in items:
                send.send_nowait(item)

    async with trio.open_nursery() as nursery:
        await nursery.start(pump)
        yield Follower(receive)
        nursery.cancel_scope.cancel()
