"""The DRA plugin's gRPC services on grpclib, as they run on the asyncio thread (`nvdp.kubelet.aio`).

Two sockets, each one grpclib server with the budgets of `nvdp.kubelet.grpc_guard` (connections, streams, message
size, resets, control frames):

* `<plugins dir>/<driver>/dra.sock`: DRAPlugin v1 and v1beta1 (the same handlers; v1beta1 has no share ID), and
  DRAResourceHealth v1 and v1alpha1 (the same stream);
* `<registry dir>/<driver>-reg.sock`: pluginregistration's `Registration` (GetInfo, NotifyRegistrationStatus).

The handlers only translate: claims go to `ClaimCalls` (which runs the preparer on trio), health comes from a
`HealthMirror` that trio publishes immutable snapshots to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpclib.const
from grpclib.exceptions import GRPCError

from nvdp.core.dra.plugin import (
    HEALTH_RESEND_S,
    MAX_CLAIMS_PER_CALL,
    PLUGIN_TYPE,
    SUPPORTED_VERSIONS,
    HealthSnapshot,
)
from nvdp.core.dra.types import ClaimRef, PrepareResult, UnprepareResult
from nvdp.dra.api import pluginregistration as reg
from nvdp.dra.api import v1 as health_v1
from nvdp.dra.api import v1alpha1 as health_v1alpha1
from nvdp.dra.api.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1
from nvdp.dra.api.k8s.io.kubelet.pkg.apis.dra import v1beta1 as dra_v1beta1
from nvdp.dra.calls import ClaimCalls
from nvdp.kubelet.grpc_guard import GuardedServer, PassThroughCodec, rate_limit
from nvdp.kubelet.plugin_server import remove_socket_if_ours

log = rate_limit(logging.getLogger(__name__))

#: How long stopping a server waits for its connections to close after ending their streams.
CLOSE_GRACE_S = 1.0


class _Codec(PassThroughCodec):
    def decode(self, data: bytes, message_type: Any) -> Any:
        # A request that is not valid protobuf is the client's error: a status, not a logged traceback.
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT,
                            f"cannot decode {message_type.__name__}: {exc}") from None


# -- DRAPlugin ---------------------------------------------------------------------------------------------------------


def _claim_refs(claims: Sequence[Any]) -> list[ClaimRef]:
    if len(claims) > MAX_CLAIMS_PER_CALL:
        # No kubelet sends this (a pod has at most 128 claims): refuse the call whole, it is not one bad claim.
        raise GRPCError(grpclib.const.Status.RESOURCE_EXHAUSTED,
                        f"{len(claims)} claims in one call; at most {MAX_CLAIMS_PER_CALL} are accepted")
    refs = []
    for claim in claims:
        if not all(type(v) is str for v in (claim.namespace, claim.uid, claim.name)):
            raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT, "a claim reference has a field of the wrong type")
        refs.append(ClaimRef(namespace=claim.namespace, uid=claim.uid, name=claim.name))
    return refs


class _DraPlugin:
    """The handlers of one DRAPlugin version; `api` is its generated module."""

    def __init__(self, api: Any, calls: ClaimCalls) -> None:
        self.api = api
        self.calls = calls

    def _device(self, device: Any) -> Any:
        fields: dict[str, Any] = dict(request_names=list(device.request_names), pool_name=device.pool_name,
                                      device_name=device.device_name, cdi_device_ids=list(device.cdi_device_ids))
        if self.api is dra_v1 and device.share_id:
            fields["share_id"] = device.share_id
        return self.api.Device(**fields)

    async def prepare(self, message: Any) -> Any:
        claims = _claim_refs(message.claims)
        answer: dict[str, PrepareResult] = await self.calls.call("prepare", claims) if claims else {}
        return self.api.NodePrepareResourcesResponse(claims={
            uid: self.api.NodePrepareResourceResponse(devices=[self._device(d) for d in result.devices],
                                                      error=result.error)
            for uid, result in answer.items()})

    async def unprepare(self, message: Any) -> Any:
        claims = _claim_refs(message.claims)
        answer: dict[str, UnprepareResult] = await self.calls.call("unprepare", claims) if claims else {}
        return self.api.NodeUnprepareResourcesResponse(claims={
            uid: self.api.NodeUnprepareResourceResponse(error=result.error) for uid, result in answer.items()})


class DraPluginV1(dra_v1.DraPluginBase):
    def __init__(self, calls: ClaimCalls) -> None:
        self._plugin = _DraPlugin(dra_v1, calls)

    async def node_prepare_resources(
        self, message: dra_v1.NodePrepareResourcesRequest
    ) -> dra_v1.NodePrepareResourcesResponse:
        response: dra_v1.NodePrepareResourcesResponse = await self._plugin.prepare(message)
        return response

    async def node_unprepare_resources(
        self, message: dra_v1.NodeUnprepareResourcesRequest
    ) -> dra_v1.NodeUnprepareResourcesResponse:
        response: dra_v1.NodeUnprepareResourcesResponse = await self._plugin.unprepare(message)
        return response


class DraPluginV1beta1(dra_v1beta1.DraPluginBase):
    def __init__(self, calls: ClaimCalls) -> None:
        self._plugin = _DraPlugin(dra_v1beta1, calls)

    async def node_prepare_resources(
        self, message: dra_v1beta1.NodePrepareResourcesRequest
    ) -> dra_v1beta1.NodePrepareResourcesResponse:
        response: dra_v1beta1.NodePrepareResourcesResponse = await self._plugin.prepare(message)
        return response

    async def node_unprepare_resources(
        self, message: dra_v1beta1.NodeUnprepareResourcesRequest
    ) -> dra_v1beta1.NodeUnprepareResourcesResponse:
        response: dra_v1beta1.NodeUnprepareResourcesResponse = await self._plugin.unprepare(message)
        return response


# -- DRAResourceHealth -------------------------------------------------------------------------------------------------


class HealthMirror:
    """The latest health snapshot, on the asyncio side. trio publishes with `AsyncioThread.call_soon(mirror.publish,
    snapshot)`; each stream sends the full list whenever the snapshot changes and at least every `resend_s` (the
    kubelet reports a device Unknown when it has heard nothing of it for 30 s). `close()` ends every stream."""

    def __init__(self, snapshot: HealthSnapshot, resend_s: float = HEALTH_RESEND_S) -> None:
        self.snapshot = snapshot
        self.resend_s = resend_s
        self.version = 1
        self.closed = False
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        unhealthy = sum(1 for d in self.snapshot.devices if d.health != 1)
        return (f"<HealthMirror pool={self.snapshot.pool} v{self.version} devices={len(self.snapshot.devices)} "
                f"not-healthy={unhealthy} closed={self.closed}>")

    def publish(self, snapshot: HealthSnapshot) -> None:
        if snapshot == self.snapshot:
            return
        self.snapshot = snapshot
        self.version += 1
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def updates(self) -> AsyncIterator[HealthSnapshot]:
        """The snapshot now, then on every change and every `resend_s`, until closed."""
        while not self.closed:
            # Taken before sending: a change while the message is on its way wakes the wait below at once.
            changed, sent = self._changed, self.version
            yield self.snapshot
            if self.version != sent or self.closed:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resend_s):
                    await changed.wait()


def health_message(api: Any, snapshot: HealthSnapshot, now: int) -> Any:
    """`NodeWatchResourcesResponse` of health API `api` (v1 and v1alpha1 have the same messages)."""
    return api.NodeWatchResourcesResponse(devices=[
        api.DeviceHealth(device=api.DeviceIdentifier(pool_name=snapshot.pool, device_name=d.device_name),
                         health=api.HealthStatus(int(d.health)), last_updated_time=now, message=d.message)
        for d in snapshot.devices])


class HealthV1(health_v1.DraResourceHealthBase):
    def __init__(self, mirror: HealthMirror) -> None:
        self.mirror = mirror

    async def node_watch_resources(
        self, message: health_v1.NodeWatchResourcesRequest
    ) -> AsyncIterator[health_v1.NodeWatchResourcesResponse]:
        async for snapshot in self.mirror.updates():
            yield health_message(health_v1, snapshot, int(time.time()))


class HealthV1alpha1(health_v1alpha1.DraResourceHealthBase):
    def __init__(self, mirror: HealthMirror) -> None:
        self.mirror = mirror

    async def node_watch_resources(
        self, message: health_v1alpha1.NodeWatchResourcesRequest
    ) -> AsyncIterator[health_v1alpha1.NodeWatchResourcesResponse]:
        async for snapshot in self.mirror.updates():
            yield health_message(health_v1alpha1, snapshot, int(time.time()))


# -- Registration ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PluginIdentity:
    driver: str
    #: The absolute path of dra.sock, as the kubelet dials it.
    endpoint: str
    versions: tuple[str, ...] = SUPPORTED_VERSIONS


class RegistrationService(reg.RegistrationBase):
    """Answers the kubelet's plugin watcher; `on_status(registered, error)` runs on the loop (it must not block)."""

    def __init__(self, identity: PluginIdentity, on_status: Callable[[bool, str], None]) -> None:
        self.identity = identity
        self.on_status = on_status

    async def get_info(self, message: reg.InfoRequest) -> reg.PluginInfo:
        identity = self.identity
        return reg.PluginInfo(type=PLUGIN_TYPE, name=identity.driver, endpoint=identity.endpoint,
                              supported_versions=list(identity.versions))

    async def notify_registration_status(self, message: reg.RegistrationStatus) -> reg.RegistrationStatusResponse:
        self.on_status(bool(message.plugin_registered), str(message.error)[:1024])
        return reg.RegistrationStatusResponse()


# -- binding and stopping ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class BoundSocket:
    server: GuardedServer
    socket_path: Path
    #: (st_dev, st_ino) of the socket we bound: we unlink the path only while it is still ours.
    inode: tuple[int, int]
    #: The health mirror of dra.sock (None for the registration socket); closed when the server stops.
    mirror: HealthMirror | None = None

    def is_ours(self) -> bool:
        try:
            st = os.stat(self.socket_path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.inode


async def bind(handlers: list[Any], socket_path: Path, name: str, mirror: HealthMirror | None = None) -> BoundSocket:
    """Serve `handlers` on `socket_path` (on the loop); a stale file there is replaced. OSError when the directory
    is missing or not writable."""
    server = GuardedServer(handlers, codec=_Codec(), name=name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    # Bound under a hidden name, made 0600 (the kubelet runs as root and is the only client), then renamed into
    # place: the kubelet's watcher (which skips dot files) sees the socket appear once, finished, and never a mode
    # change after its creation.
    hidden = socket_path.with_name(f".{socket_path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(hidden)
    await server.start(path=str(hidden))
    try:
        os.chmod(hidden, 0o600)
        os.replace(hidden, socket_path)
    except OSError:
        await server.shut_down(CLOSE_GRACE_S)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(hidden)
        raise
    st = os.stat(socket_path)
    return BoundSocket(server, socket_path, (st.st_dev, st.st_ino), mirror)


async def bind_plugin(socket_path: Path, calls: ClaimCalls, snapshot: HealthSnapshot,
                      resend_s: float = HEALTH_RESEND_S) -> BoundSocket:
    mirror = HealthMirror(snapshot, resend_s)
    handlers = [DraPluginV1(calls), DraPluginV1beta1(calls), HealthV1(mirror), HealthV1alpha1(mirror)]
    return await bind(handlers, socket_path, f"DRA {socket_path.parent.name}", mirror)


async def bind_registration(socket_path: Path, identity: PluginIdentity,
                            on_status: Callable[[bool, str], None]) -> BoundSocket:
    return await bind([RegistrationService(identity, on_status)], socket_path, f"registration {identity.driver}")


async def stop(bound: BoundSocket) -> None:
    """End every stream, close connections, stop listening and remove the socket if it is still ours."""
    if bound.mirror is not None:
        bound.mirror.close()
    await bound.server.shut_down(CLOSE_GRACE_S)
    remove_socket_if_ours(bound.socket_path, bound.inode)
