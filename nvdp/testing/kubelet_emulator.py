"""A kubelet device manager, as far as a device plugin can tell: for the demo, the tests and the benchmark.

It speaks gRPC through grpcio (gRPC's C core, like the kubelet's grpc-go in spirit: an implementation independent of
the grpclib servers under test) and does what the kubelet does (reference: upstream-nvidia-device-plugin.md §1.4):

* serves `Registration` on `kubelet.sock`; inside `Register` it checks the version and resource name, dials the
  plugin's socket back (10 s) and calls `GetDevicePluginOptions` before answering;
* then holds `ListAndWatch` in a thread, treating each message as the complete device set, and marks every device
  Unhealthy when the stream ends, as the kubelet does;
* calls `Allocate` with one container request, and `GetPreferredAllocation`;
* `restart()`: stops, wipes the directory's sockets and files (not `kubelet_internal_checkpoint` and not
  directories) and creates `kubelet.sock` again.

It is synchronous and thread-based (grpcio's API); call it from trio through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import betterproto2
import grpc

from nvdp.kubelet.api import v1beta1 as api

SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT_S = 10.0
CHECKPOINT = "kubelet_internal_checkpoint"
_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/"
                             r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _method(channel: grpc.Channel, name: str, response: type[betterproto2.Message]) -> Callable[..., object]:
    return channel.unary_unary(f"/v1beta1.DevicePlugin/{name}", request_serializer=bytes,
                               response_deserializer=response.parse)


def is_extended_resource_name(name: str) -> bool:
    """Domain-prefixed, not in the kubernetes.io namespace, a valid qualified name (the kubelet's check)."""
    match = _QUALIFIED_NAME.match(name)
    if not match:
        return False
    domain = match.group(1)
    return not (domain == "kubernetes.io" or domain.endswith(".kubernetes.io")) and len(name.split("/")[1]) <= 63


@dataclass(eq=False)
class Endpoint:
    """One registered plugin, as the kubelet keeps it."""

    resource: str
    endpoint: str
    options: api.DevicePluginOptions
    channel: grpc.Channel
    #: Device ID -> "Healthy" | "Unhealthy", replaced whole by every ListAndWatch message.
    devices: dict[str, str] = field(default_factory=dict)
    #: NUMA nodes advertised per device ID.
    topology: dict[str, tuple[int, ...]] = field(default_factory=dict)
    updates: int = 0
    stream_ended: bool = False
    call: object | None = None
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class Registration:
    resource: str
    endpoint: str
    options: api.DevicePluginOptions
    at: float


class KubeletEmulator:
    def __init__(self, plugin_dir: Path) -> None:
        self.plugin_dir = Path(plugin_dir)
        self.socket = self.plugin_dir / "kubelet.sock"
        self.registrations: list[Registration] = []
        #: Streams that ended while their endpoint was still current (a plugin broke a ListAndWatch).
        self.broken_streams: dict[str, int] = {}
        self.restarts = 0
        #: Incremented by every start: a Register that began before a restart is refused after it.
        self.incarnation = 0
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Condition()
        self._server: grpc.Server | None = None
        self.started_at = 0.0

    def __enter__(self) -> KubeletEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        with self._lock:
            summary = {r: f"{sum(h == 'Healthy' for h in e.devices.values())}/{len(e.devices)}"
                       for r, e in self._endpoints.items()}
        return f"<KubeletEmulator {self.socket} healthy/total={summary} registrations={len(self.registrations)}>"

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self.incarnation += 1
        self.plugin_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kubelet-emulator"))
        handler = grpc.unary_unary_rpc_method_handler(
            self._register, request_deserializer=api.RegisterRequest.parse, response_serializer=bytes)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("v1beta1.Registration", {"Register": handler}),))
        server.add_insecure_port(f"unix:{self.socket}")
        server.start()
        self._server = server
        #: When kubelet.sock started answering: re-registration latency is measured from here.
        self.started_at = time.monotonic()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        with self._lock:
            endpoints = list(self._endpoints.values())
            self._endpoints.clear()
        for endpoint in endpoints:
            self._close(endpoint)
        self.socket.unlink(missing_ok=True)

    def restart(self) -> None:
        """What a kubelet restart looks like to plugins: sockets wiped, then kubelet.sock created again."""
        self.stop()
        for entry in self.plugin_dir.iterdir():
            if entry.name != CHECKPOINT and not entry.is_dir():
                entry.unlink(missing_ok=True)
        self.restarts += 1
        self.start()

    # -- Registration service --------------------------------------------------------------------------------------

    def _register(self, request: api.RegisterRequest, context: grpc.ServicerContext) -> api.Empty:
        if request.version not in SUPPORTED_VERSIONS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"requested API version {request.version!r} is not supported by kubelet. "
                          f"Supported version is {SUPPORTED_VERSIONS[0]!r}")
        if not is_extended_resource_name(request.resource_name):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the ResourceName {request.resource_name!r} is invalid")
        incarnation = self.incarnation
        # A connection of its own, as grpc-go's ClientConn has: grpcio otherwise shares one between channels to the
        # same path, and a new registration could ride on a connection to the server it replaces.
        channel = grpc.insecure_channel(f"unix:{self.plugin_dir / request.endpoint}",
                                        options=[("grpc.default_authority", "localhost"),
                                                 ("grpc.use_local_subchannel_pool", 1)])
        try:
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT_S)
            options = _method(channel, "GetDevicePluginOptions", api.DevicePluginOptions)(
                api.Empty(), timeout=DIAL_TIMEOUT_S)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            channel.close()
            context.abort(grpc.StatusCode.UNKNOWN, f"failed to dial device plugin: {exc}")
        endpoint = Endpoint(request.resource_name, request.endpoint, options, channel)  # type: ignore[arg-type]
        with self._lock:
            if self.incarnation != incarnation:
                # A real kubelet's restart ends its process, and with it this call; here the call outlived it.
                channel.close()
                context.abort(grpc.StatusCode.UNAVAILABLE, "the kubelet restarted during this registration")
            previous = self._endpoints.get(request.resource_name)
            self._endpoints[request.resource_name] = endpoint
            self.registrations.append(Registration(request.resource_name, request.endpoint, options,  # type: ignore[arg-type]
                                                   time.monotonic()))
            self._lock.notify_all()
        if previous is not None:
            self._close(previous)
        endpoint.thread = threading.Thread(target=self._list_and_watch, args=(endpoint,),
                                           name=f"kubelet-lw-{request.resource_name}", daemon=True)
        endpoint.thread.start()
        return api.Empty()

    def _list_and_watch(self, endpoint: Endpoint) -> None:
        try:
            stream = endpoint.channel.unary_stream("/v1beta1.DevicePlugin/ListAndWatch", request_serializer=bytes,
                                                   response_deserializer=api.ListAndWatchResponse.parse)
            call = stream(api.Empty())
            endpoint.call = call
            for response in call:
                with self._lock:
                    endpoint.devices = {d.id: d.health for d in response.devices}
                    endpoint.topology = {
                        d.id: tuple(n.id for n in d.topology.nodes) if d.topology else () for d in response.devices}
                    endpoint.updates += 1
                    self._lock.notify_all()
        except (grpc.RpcError, ValueError):
            # ValueError: the channel was closed (the registration was replaced, or the emulator stopped) before
            # the stream opened; for the kubelet that is a stream that ended.
            pass
        with self._lock:
            endpoint.stream_ended = True
            # The kubelet keeps capacity but makes nothing allocatable once a plugin's stream ends.
            endpoint.devices = dict.fromkeys(endpoint.devices, "Unhealthy")
            if self._endpoints.get(endpoint.resource) is endpoint:
                self.broken_streams[endpoint.resource] = self.broken_streams.get(endpoint.resource, 0) + 1
            self._lock.notify_all()

    def _close(self, endpoint: Endpoint) -> None:
        if endpoint.call is not None:
            endpoint.call.cancel()  # type: ignore[attr-defined]
        endpoint.channel.close()
        if endpoint.thread is not None:
            endpoint.thread.join(5)

    # -- what the kubelet knows ------------------------------------------------------------------------------------

    def resources(self) -> list[str]:
        with self._lock:
            return sorted(self._endpoints)

    def devices(self, resource: str) -> dict[str, str]:
        with self._lock:
            endpoint = self._endpoints.get(resource)
            return dict(endpoint.devices) if endpoint else {}

    def endpoint(self, resource: str) -> Endpoint | None:
        with self._lock:
            return self._endpoints.get(resource)

    def wait_for(self, predicate: Callable[[KubeletEmulator], bool], timeout: float = 5.0) -> bool:
        """Wait until `predicate(self)` holds (re-checked on every change), or the timeout passes."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                # The predicate takes the (re-entrant) lock itself through the accessors.
                if predicate(self):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)

    def wait_for_devices(self, resource: str, expected: dict[str, str], timeout: float = 5.0) -> bool:
        return self.wait_for(lambda k: k.devices(resource) == expected, timeout)

    # -- calls into the plugin -------------------------------------------------------------------------------------

    def _channel(self, resource: str) -> grpc.Channel:
        endpoint = self.endpoint(resource)
        if endpoint is None:
            raise LookupError(f"{resource} is not registered")
        return endpoint.channel

    def allocate(self, resource: str, device_ids: Sequence[str], timeout: float = 5.0) -> api.AllocateResponse:
        request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=list(device_ids))])
        return _method(self._channel(resource), "Allocate", api.AllocateResponse)(  # type: ignore[return-value]
            request, timeout=timeout)

    def preferred_allocation(
        self, resource: str, available: Sequence[str], must_include: Sequence[str], size: int, timeout: float = 5.0
    ) -> list[str]:
        request = api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
            available_deviceIDs=list(available), must_include_deviceIDs=list(must_include), allocation_size=size)])
        response = _method(self._channel(resource), "GetPreferredAllocation", api.PreferredAllocationResponse)(
            request, timeout=timeout)
        return list(response.container_responses[0].device_i_ds)  # type: ignore[attr-defined]

    def pre_start_container(self, resource: str, device_ids: Sequence[str]) -> api.PreStartContainerResponse:
        return _method(self._channel(resource), "PreStartContainer", api.PreStartContainerResponse)(  # type: ignore[return-value]
            api.PreStartContainerRequest(devices_ids=list(device_ids)), timeout=5.0)
