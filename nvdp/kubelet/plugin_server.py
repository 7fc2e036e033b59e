"""One resource's `DevicePlugin` gRPC server (grpclib), as it runs on the asyncio thread.

Everything in this module runs on the asyncio loop of `nvdp.kubelet.aio`. Its inputs are immutable: the resource,
its Allocate options and the node inventory are fixed for the server's life (a changed resource gets a new server),
and health arrives as a new snapshot through `DeviceListMirror.publish()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpclib.const
import h2.connection
from grpclib.exceptions import GRPCError

from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.allocate import AllocateOptions, AllocationError, ContainerAllocation, allocate
from nvdp.core.plan.model import Resource
from nvdp.core.plan.preferred import PreferredAllocationError, preferred_allocation
from nvdp.kubelet.api import v1beta1 as api
from nvdp.kubelet.grpc_guard import EncodedMessage, GuardedServer, GuardedStream, PassThroughCodec, rate_limit

log = rate_limit(logging.getLogger(__name__))

# h2 remembers up to 65 536 closed streams per HTTP/2 connection, to tell late frames of a closed stream from protocol
# errors. The kubelet makes one short unary call per stream on a long-lived connection, so that memory grows by
# ~130 bytes per Allocate up to ~8 MiB per connection, and the soak test saw RSS step up at every kubelet restart.
# The kubelet's calls on one connection are sequential, so a late frame (a WINDOW_UPDATE or RST_STREAM right after
# our END_STREAM) concerns one of the last few streams: 128 is ample, and keeps a connection's h2 state to a few KiB
# (measured: RSS growth after 10 000 Allocates and 50 kubelet restarts 1.36 -> 1.01 MiB against 2 048). (A class
# attribute h2 documents for this.)
h2.connection.H2Connection.MAX_CLOSED_STREAMS = 128

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
OPTIONS = api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)
#: How long stopping a server waits for its connections to close after ending their streams.
CLOSE_GRACE_S = 1.0


def list_and_watch_response(resource: Resource, unhealthy: Mapping[str, str]) -> api.ListAndWatchResponse:
    """The complete device list, in the plan's (deterministic) order."""
    topology: dict[int, api.TopologyInfo] = {}
    devices = []
    for device in resource.devices:
        info = None
        if device.numa_node is not None:
            info = topology.get(device.numa_node)
            if info is None:
                info = topology[device.numa_node] = api.TopologyInfo(nodes=[api.NumaNode(id=device.numa_node)])
        health = UNHEALTHY if device.id in unhealthy else HEALTHY
        devices.append(api.Device(id=device.id, health=health, topology=info))
    return api.ListAndWatchResponse(devices=devices)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def device_entry(device_id: str, health: str, numa_node: int | None) -> bytes:
    """One `devices` entry of a ListAndWatchResponse, encoded by hand (field 1 of the response, length-delimited).

    Encoding the generated message for every update costs ~60 ms at 2 700 devices; a device's entry only changes with
    its health, so each server encodes each device once per health state and joins the bytes. A test checks the
    result is byte-identical to what the generated code produces.
    """
    body = _length_delimited(0x0A, device_id.encode()) + _length_delimited(0x12, health.encode())
    if numa_node is not None:
        # NUMANode{ID} (proto3 omits a zero ID) inside TopologyInfo.nodes inside Device.topology (field 3).
        node = b"\x08" + _varint(numa_node) if numa_node else b""
        body += _length_delimited(0x1A, _length_delimited(0x0A, node))
    return _length_delimited(0x0A, body)


class _Codec(PassThroughCodec):
    def decode(self, data: bytes, message_type: Any) -> Any:
        # A request that is not valid protobuf (a device ID that is not UTF-8, a field of the wrong wire type) is
        # the client's error: say so, instead of an "Internal Server Error" and a logged traceback.
        try:
            message = super().decode(data, message_type)
        except Exception as exc:
            raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT,
                            f"cannot decode {message_type.__name__}: {exc}") from None
        if not _well_typed(message):
            # betterproto2 decodes a field of the wrong wire type into a value of the wrong Python type (an int in
            # a list of device IDs): refuse it here, not with a TypeError deep in a handler.
            raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT,
                            f"cannot decode {message_type.__name__}: a field has the wrong wire type")
        return message


def _strings(values: Any) -> bool:
    return all(type(v) is str for v in values)


def _well_typed(message: Any) -> bool:
    """The request fields the handlers read have the types the schema says. O(number of IDs)."""
    if isinstance(message, api.AllocateRequest):
        return all(type(c) is api.ContainerAllocateRequest and _strings(c.devices_ids)
                   for c in message.container_requests)
    if isinstance(message, api.PreferredAllocationRequest):
        return all(type(c) is api.ContainerPreferredAllocationRequest and _strings(c.available_deviceIDs)
                   and _strings(c.must_include_deviceIDs) and type(c.allocation_size) is int
                   for c in message.container_requests)
    if isinstance(message, api.PreStartContainerRequest):
        return _strings(message.devices_ids)
    return True


class DeviceListEncoder:
    """Encodes a resource's device list for any health snapshot, reusing each device's encoded entry."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self._healthy = [device_entry(d.id, HEALTHY, d.numa_node) for d in resource.devices]
        self._unhealthy: dict[int, bytes] = {}

    def encode(self, unhealthy: Mapping[str, str]) -> bytes:
        if not unhealthy:
            return b"".join(self._healthy)
        parts = self._healthy.copy()
        for i, device in enumerate(self.resource.devices):
            if device.id in unhealthy:
                entry = self._unhealthy.get(i)
                if entry is None:
                    entry = self._unhealthy[i] = device_entry(device.id, UNHEALTHY, device.numa_node)
                parts[i] = entry
        return b"".join(parts)


class DeviceListMirror:
    """The latest device list of one resource, on the asyncio side.

    trio publishes health snapshots with `AsyncioThread.call_soon(mirror.publish, ...)`; every `ListAndWatch`
    stream waits here for a newer version than the one it last sent. `close()` ends every stream normally.
    """

    def __init__(self, resource: Resource, unhealthy: Mapping[str, str]) -> None:
        self.resource = resource
        self._encoder = DeviceListEncoder(resource)
        self._unhealthy: Mapping[str, str] = {i: r for i, r in unhealthy.items() if resource.device(i) is not None}
        self._message = EncodedMessage(self._encoder.encode(self._unhealthy))
        self._version = 1
        self._closed = False
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return (f"<DeviceListMirror {self.resource.name} v{self._version} devices={len(self.resource.devices)} "
                f"unhealthy={len(self._unhealthy)} closed={self._closed}>")

    def publish(self, unhealthy: Mapping[str, str]) -> None:
        relevant = {i: r for i, r in unhealthy.items() if self.resource.device(i) is not None}
        if relevant == self._unhealthy:
            return
        self._unhealthy = relevant
        self._message = EncodedMessage(self._encoder.encode(relevant))
        self._version += 1
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def updates(self) -> AsyncIterator[EncodedMessage]:
        sent = 0
        while not self._closed:
            if self._version != sent:
                sent = self._version
                yield self._message
                continue
            await self._changed.wait()


@dataclass(frozen=True, slots=True)
class ServingContext:
    """What a resource's handlers need besides the device list; immutable for the server's life."""

    resource: Resource
    options: AllocateOptions
    inventory: NodeInventory
    allocation_policy: str = "distributed"


def container_response(allocation: ContainerAllocation) -> api.ContainerAllocateResponse:
    """The part of a container's response that is the same for every call with the same devices: everything but
    the `cdi-annotations` annotation, whose key is new for each response (`cdi_annotation`)."""
    return api.ContainerAllocateResponse(
        envs=dict(allocation.envs),
        mounts=[api.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
                for m in allocation.mounts],
        devices=[api.DeviceSpec(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions)
                 for d in allocation.device_specs],
        annotations=dict(allocation.annotations),
        cdi_devices=[api.CdiDevice(name=name) for name in allocation.cdi_devices],
    )


#: What the `cdi-annotations` key is made of after the prefix (upstream's plugin name), then a fresh uuid4.
CDI_ANNOTATION_PLUGIN = "nvidia-device-plugin"


def cdi_annotation(prefix: str, value: str) -> bytes:
    """One `annotations` map entry (field 4 of ContainerAllocateResponse) `<prefix>nvidia-device-plugin_<uuid4>` =
    `value`, encoded. Protobuf merges repeated map entries, so appending these bytes to an encoded response adds the
    annotation without re-encoding the rest."""
    key = f"{prefix}{CDI_ANNOTATION_PLUGIN}_{uuid.uuid4()}"
    return _length_delimited(0x22, _length_delimited(0x0A, key.encode()) + _length_delimited(0x12, value.encode()))


@dataclass(frozen=True, slots=True)
class EncodedContainer:
    """A container's response encoded once (`body`), and the CDI annotation each response adds to it."""

    body: bytes
    cdi_prefix: str = ""
    #: Comma-joined CDI device names; empty: no annotation.
    cdi_value: str = ""

    @classmethod
    def of(cls, allocation: ContainerAllocation) -> EncodedContainer:
        return cls(bytes(container_response(allocation)), allocation.cdi_annotation_prefix,
                   ",".join(allocation.cdi_annotation_names))

    def response_entry(self) -> bytes:
        """This container as one `container_responses` entry (field 1) of an AllocateResponse."""
        body = self.body
        if self.cdi_value:
            body += cdi_annotation(self.cdi_prefix, self.cdi_value)
        return _length_delimited(0x0A, body)


class Answer:
    """A whole response, encoded but for the per-response CDI annotations. (AllocateResponse and
    PreferredAllocationResponse both are their containers' responses in field 1.)"""

    __slots__ = ("containers", "encoded", "size")

    def __init__(self, containers: tuple[EncodedContainer, ...]) -> None:
        self.containers = containers
        #: The complete response, when no container adds an annotation per response.
        self.encoded = (None if any(c.cdi_value for c in containers)
                        else b"".join(c.response_entry() for c in containers))
        self.size = sum(len(c.body) for c in containers)

    def encode(self) -> bytes:
        if self.encoded is not None:
            return self.encoded
        return b"".join(c.response_entry() for c in self.containers)


#: Responses each server keeps, per method (Allocate, GetPreferredAllocation).
CACHE_ENTRIES = 64
#: A request larger than this (encoded) is answered without the cache: it bounds a key's size.
CACHE_KEY_BYTES = 4096
#: A response larger than this (encoded) is not kept.
CACHE_ENTRY_BYTES = 8 * 1024


class ResponseCache:
    """Encoded responses of one server by request bytes, at most `entries` (the oldest goes first).

    A server's inputs are fixed for its life (a changed resource, option or inventory starts a new server), so a
    response never goes stale: the cache ends with its server, i.e. with the plan generation it was built for.
    """

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._items: dict[bytes, Answer] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> Answer | None:
        return self._items.get(key)

    def put(self, key: bytes, value: Answer) -> None:
        if value.size > CACHE_ENTRY_BYTES:
            return
        items = self._items
        if len(items) >= self.entries:
            del items[next(iter(items))]
        items[key] = value


class CallObserver(Protocol):
    """Where a server reports each call's latency (nvdp.observe.metrics.Metrics; thread-safe)."""

    def allocate_observed(self, resource: str, seconds: float, ok: bool = True) -> None: ...
    def preferred_observed(self, resource: str, seconds: float, ok: bool = True) -> None: ...


class _NoObserver:
    def allocate_observed(self, resource: str, seconds: float, ok: bool = True) -> None:
        pass

    def preferred_observed(self, resource: str, seconds: float, ok: bool = True) -> None:
        pass


class _Timed:
    """Reports a call's duration and whether it succeeded (no exception) to `report`."""

    __slots__ = ("report", "resource", "started")

    def __init__(self, report: Callable[[str, float, bool], None], resource: str) -> None:
        self.report = report
        self.resource = resource

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.report(self.resource, time.perf_counter() - self.started, exc_type is None)


class _CachedUnary:
    """One of the service's cached unary methods, as grpclib's handler for it (`grpc_guard.ImmediateUnary`)."""

    __slots__ = ("answer", "cache", "report", "resource", "service")

    def __init__(self, service: DevicePluginService, cache: ResponseCache, answer: Callable[[Any], Answer],
                 report: Callable[[str, float, bool], None]) -> None:
        self.service = service
        self.cache = cache
        self.answer = answer
        self.report = report
        self.resource = service.context.resource.name

    async def __call__(self, stream: GuardedStream) -> None:
        await self.service._serve(stream, self.cache, self.answer, self.report)

    def immediate(self, request: bytes) -> bytes | None:
        kept = self.cache.get(request)
        return None if kept is None else kept.encode()

    def observed(self, seconds: float) -> None:
        self.report(self.resource, seconds, True)


class DevicePluginService(api.DevicePluginBase):
    def __init__(self, context: ServingContext, mirror: DeviceListMirror, observer: CallObserver) -> None:
        self.context = context
        self.mirror = mirror
        self.observer = observer
        self.allocate_cache = ResponseCache()
        self.preferred_cache = ResponseCache()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        # Allocate and GetPreferredAllocation answer with bytes encoded once per device set, sent in one write, and
        # a repeated request is answered without a task (`grpc_guard.ImmediateUnary`).
        mapping = super().__mapping__()
        for path, cache, answer, report, request, reply in (
            ("/v1beta1.DevicePlugin/Allocate", self.allocate_cache, self.allocate_answer,
             self.observer.allocate_observed, api.AllocateRequest, api.AllocateResponse),
            ("/v1beta1.DevicePlugin/GetPreferredAllocation", self.preferred_cache, self.preferred_answer,
             self.observer.preferred_observed, api.PreferredAllocationRequest, api.PreferredAllocationResponse),
        ):
            method = _CachedUnary(self, cache, answer, report)
            mapping[path] = grpclib.const.Handler(method, grpclib.const.Cardinality.UNARY_UNARY, request, reply)
        return mapping

    async def get_device_plugin_options(self, message: api.Empty) -> api.DevicePluginOptions:
        return OPTIONS

    async def list_and_watch(self, message: api.Empty) -> AsyncIterator[api.ListAndWatchResponse]:
        log.debug("ListAndWatch opened for %s", self.context.resource.name)
        async for response in self.mirror.updates():
            # Already serialized (see DeviceListEncoder); the server's codec passes the bytes through.
            yield response  # type: ignore[misc]

    async def _serve(self, stream: GuardedStream, cache: ResponseCache, answer: Callable[[Any], Answer],
                     report: Callable[[str, float, bool], None]) -> None:
        """Answer the unary call on `stream`: from `cache` when this server answered the same request bytes before
        (without decoding them again), else computed and kept. Refusals are never kept. Each call's handling (not
        its transport) is reported, whether it was kept or not."""
        data = await stream.recv_bytes()
        if data is None:
            raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT, "no request message")
        kept = cache.get(data)
        # Undecodable requests are the client's error (INVALID_ARGUMENT), and were never reported as calls.
        message = stream.decode(data) if kept is None else None
        stream.count_received()
        with _Timed(report, self.context.resource.name):
            if kept is None:
                kept = answer(message)
                if len(data) <= CACHE_KEY_BYTES:
                    cache.put(data, kept)
            payload = kept.encode()
        await stream.send_unary(payload)

    def allocate_answer(self, message: api.AllocateRequest) -> Answer:
        """The AllocateResponse for `message`; raises GRPCError(INVALID_ARGUMENT) for a refused request."""
        context = self.context
        containers = []
        for request in message.container_requests:
            try:
                allocation = allocate(context.resource, request.devices_ids, context.options)
            except AllocationError as exc:
                log.warning("Allocate refused for %s: %s", context.resource.name, exc)
                raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT, str(exc)) from None
            containers.append(EncodedContainer.of(allocation))
        return Answer(tuple(containers))

    def preferred_answer(self, message: api.PreferredAllocationRequest) -> Answer:
        """The PreferredAllocationResponse for `message`; raises GRPCError(INVALID_ARGUMENT)."""
        context = self.context
        containers = []
        for request in message.container_requests:
            try:
                ids = preferred_allocation(context.resource, context.inventory, request.available_deviceIDs,
                                           request.must_include_deviceIDs, request.allocation_size,
                                           context.allocation_policy)
            except PreferredAllocationError as exc:
                raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT, str(exc)) from None
            # ContainerPreferredAllocationResponse: device_i_ds is its field 1.
            containers.append(EncodedContainer(b"".join(_length_delimited(0x0A, i.encode()) for i in ids)))
        return Answer(tuple(containers))

    async def pre_start_container(self, message: api.PreStartContainerRequest) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()


class _TrackingServer(GuardedServer):
    """The plugin server: grpclib with nvdp's codec and the budgets of `nvdp.kubelet.grpc_guard`.

    `transports` (every open connection) lets `stop_server()` close them: `Server.close()` leaves HTTP/2
    connections open, so a kubelet's `ListAndWatch` would never see its stream end.
    """

    def __init__(self, handlers: list[Any], name: str = "") -> None:
        super().__init__(handlers, codec=_Codec(), name=name)


@dataclass(slots=True)
class BoundServer:
    server: _TrackingServer
    mirror: DeviceListMirror
    socket_path: Path
    #: (st_dev, st_ino) of the socket we bound: we unlink the path only while it is still ours.
    inode: tuple[int, int]


async def start_server(
    context: ServingContext, unhealthy: Mapping[str, str], socket_path: Path, observer: CallObserver | None = None
) -> BoundServer:
    """Bind the resource's socket and start serving (on the asyncio loop). A stale file at the path is replaced."""
    mirror = DeviceListMirror(context.resource, unhealthy)
    server = _TrackingServer([DevicePluginService(context, mirror, observer or _NoObserver())], context.resource.name)
    # A stale socket (ours from a crashed run, or a leftover) would make bind fail.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    await server.start(path=str(socket_path))
    # The kubelet runs as root and is the only client; nobody else needs the socket.
    os.chmod(socket_path, 0o600)
    st = os.stat(socket_path)
    return BoundServer(server, mirror, socket_path, (st.st_dev, st.st_ino))


async def stop_server(bound: BoundServer) -> None:
    """End every stream, close connections, stop listening and remove the socket if it is still ours."""
    bound.mirror.close()
    await bound.server.shut_down(CLOSE_GRACE_S)
    remove_socket_if_ours(bound.socket_path, bound.inode)


def remove_socket_if_ours(path: Path, inode: tuple[int, int]) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    # The kubelet may have wiped the directory and a new server may own the path by now.
    if (st.st_dev, st.st_ino) == inode:
        path.unlink(missing_ok=True)
