"""The kubelet's DRA side, as far as a DRA driver can tell: for the tests and the demo.

Like `kubelet_emulator`, it speaks gRPC through grpcio, independent of the grpclib servers under test, and does
what the kubelet does (reference: dra-and-cdi.md §2):

* watches the plugin registry directory (polling; socket names starting with `.` are ignored) and, for each new
  `*-reg.sock`, calls `GetInfo`, checks the answer (type `DRAPlugin`, an absolute endpoint, a DRAPlugin version it
  knows: the **first** of the plugin's list among its own) and calls `NotifyRegistrationStatus` with its verdict;
* on acceptance, follows the health stream (v1 if the plugin advertises it and the emulator knows it, else
  v1alpha1), keeping the last full list per device, and clears the driver's entries when the stream ends;
* `prepare()` / `unprepare()` call the chosen DRAPlugin version with a deadline of 45 s, as the kubelet does;
* drops a plugin whose registration socket disappears.

It is synchronous and thread-based (grpcio's API); call it from trio through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import betterproto2
import grpc

from nvdp.dra.api import pluginregistration as reg
from nvdp.dra.api import v1 as health_v1
from nvdp.dra.api import v1alpha1 as health_v1alpha1
from nvdp.dra.api.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1
from nvdp.dra.api.k8s.io.kubelet.pkg.apis.dra import v1beta1 as dra_v1beta1

#: What a current kubelet (1.37) knows, in its order of preference for health.
KUBELET_VERSIONS = ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth")
CALL_TIMEOUT_S = 45.0
DIAL_TIMEOUT_S = 10.0
POLL_S = 0.02
_DRA_APIS: dict[str, Any] = {"v1.DRAPlugin": dra_v1, "v1beta1.DRAPlugin": dra_v1beta1}
_HEALTH_APIS: dict[str, Any] = {"v1.DRAResourceHealth": health_v1, "v1alpha1.DRAResourceHealth": health_v1alpha1}


def _unary(channel: grpc.Channel, path: str, response: type[betterproto2.Message]) -> Any:
    return channel.unary_unary(path, request_serializer=bytes, response_deserializer=response.parse)


@dataclass(frozen=True)
class DeviceHealthSeen:
    health: str
    message: str
    last_updated_time: int
    received_at: float


@dataclass(frozen=True)
class ClaimAnswer:
    """One claim's entry in a Prepare answer, in plain values."""

    error: str
    #: (request names, pool, device, CDI IDs, share ID or None) per device.
    devices: tuple[tuple[tuple[str, ...], str, str, tuple[str, ...], str | None], ...] = ()


@dataclass(eq=False)
class DraPlugin:
    """One registered DRA driver, as the kubelet keeps it."""

    driver: str
    registration_socket: Path
    inode: tuple[int, int, int]
    endpoint: str
    versions: tuple[str, ...]
    dra_version: str
    health_version: str | None
    channel: grpc.Channel
    #: (pool, device) -> last health seen; replaced whole by every message.
    devices: dict[tuple[str, str], DeviceHealthSeen] = field(default_factory=dict)
    health_messages: int = 0
    #: receive time of each health message (monotonic).
    health_times: list[float] = field(default_factory=list)
    stream_ended: bool = False
    stream_error: str = ""
    call: Any = None
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class Registration:
    driver: str
    socket: str
    accepted: bool
    error: str
    versions: tuple[str, ...]
    endpoint: str
    at: float


class DraKubeletEmulator:
    def __init__(self, registry_dir: Path, *, versions: Sequence[str] = KUBELET_VERSIONS) -> None:
        self.registry_dir = Path(registry_dir)
        self.versions = tuple(versions)
        self.registrations: list[Registration] = []
        self.plugins: dict[str, DraPlugin] = {}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Registration sockets already handled (path -> inode), accepted or not.
        self._seen: dict[str, tuple[int, int, int]] = {}

    def __enter__(self) -> DraKubeletEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        with self._lock:
            summary = {d: f"{p.dra_version}, {len(p.devices)} devices" for d, p in self.plugins.items()}
        return f"<DraKubeletEmulator {self.registry_dir} plugins={summary} registrations={len(self.registrations)}>"

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.registry_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="dra-emulator-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            plugins = list(self.plugins.values())
            self.plugins.clear()
            self._seen.clear()
        for plugin in plugins:
            self._drop(plugin)

    # -- the registry directory ------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            present: dict[str, tuple[int, int, int]] = {}
            try:
                with os.scandir(self.registry_dir) as entries:
                    for entry in entries:
                        if entry.name.startswith(".") or not entry.name.endswith("-reg.sock"):
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        # With the change time: a socket re-created at once may get the same inode back.
                        present[entry.path] = (st.st_dev, st.st_ino, st.st_ctime_ns)
            except OSError:
                pass
            for path, inode in present.items():
                if self._seen.get(path) != inode:
                    self._seen[path] = inode
                    self._register(Path(path), inode)
            for path in [p for p in self._seen if p not in present]:
                del self._seen[path]
                with self._lock:
                    gone = [p for p in self.plugins.values() if str(p.registration_socket) == path]
                    for plugin in gone:
                        # Only if no newer registration replaced it.
                        if self.plugins.get(plugin.driver) is plugin:
                            del self.plugins[plugin.driver]
                    self._lock.notify_all()
                for plugin in gone:
                    self._drop(plugin)
            self._stop.wait(POLL_S)

    def _register(self, socket: Path, inode: tuple[int, int, int]) -> None:
        channel = grpc.insecure_channel(f"unix:{socket}", options=[("grpc.default_authority", "localhost")])
        try:
            info = _unary(channel, "/pluginregistration.Registration/GetInfo", reg.PluginInfo)(
                bytes(reg.InfoRequest()), timeout=DIAL_TIMEOUT_S)
        except grpc.RpcError as exc:
            self._record(Registration("", str(socket), False, f"GetInfo failed: {exc.code().name}", (), "",
                                      time.monotonic()))
            channel.close()
            return
        versions = tuple(info.supported_versions)
        error = ""
        dra_version = next((v for v in versions if v in _DRA_APIS and v in self.versions), None)
        if info.type != "DRAPlugin":
            error = f"unknown plugin type {info.type!r}"
        elif not os.path.isabs(info.endpoint):
            error = f"endpoint {info.endpoint!r} is not an absolute path"
        elif dra_version is None:
            error = (f"none of services supported by the plugin ({', '.join(versions)}) are supported by the kubelet "
                     f"({', '.join(v for v in self.versions if v in _DRA_APIS)})")
        else:
            with self._lock:
                old = self.plugins.get(info.name)
            if old is not None and old.endpoint == info.endpoint and old.registration_socket != socket:
                error = f"endpoint {info.endpoint} is already registered"
        notify = _unary(channel, "/pluginregistration.Registration/NotifyRegistrationStatus",
                        reg.RegistrationStatusResponse)
        with contextlib.suppress(grpc.RpcError):
            notify(bytes(reg.RegistrationStatus(plugin_registered=not error, error=error)), timeout=DIAL_TIMEOUT_S)
        channel.close()
        self._record(Registration(info.name, str(socket), not error, error, versions, info.endpoint, time.monotonic()))
        if error:
            return
        assert dra_version is not None
        health = next((v for v in ("v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth")
                       if v in versions and v in self.versions), None)
        plugin = DraPlugin(info.name, socket, inode, info.endpoint, versions, dra_version, health,
                           grpc.insecure_channel(f"unix:{info.endpoint}",
                                                 options=[("grpc.default_authority", "localhost")]))
        with self._lock:
            old = self.plugins.get(info.name)
            self.plugins[info.name] = plugin
            self._lock.notify_all()
        if old is not None:
            self._drop(old)
        if health is not None:
            plugin.thread = threading.Thread(target=self._follow_health, args=(plugin,), daemon=True,
                                             name=f"dra-emulator-health-{info.name}")
            plugin.thread.start()

    def _record(self, registration: Registration) -> None:
        with self._lock:
            self.registrations.append(registration)
            self._lock.notify_all()

    def _drop(self, plugin: DraPlugin) -> None:
        if plugin.call is not None:
            plugin.call.cancel()
        plugin.channel.close()
        if plugin.thread is not None and plugin.thread is not threading.current_thread():
            plugin.thread.join(5)

    # -- health ------------------------------------------------------------------------------------------------------

    def _follow_health(self, plugin: DraPlugin) -> None:
        assert plugin.health_version is not None
        api = _HEALTH_APIS[plugin.health_version]
        service = plugin.health_version.split(".")[0]
        method = plugin.channel.unary_stream(f"/{service}.DRAResourceHealth/NodeWatchResources",
                                             request_serializer=bytes,
                                             response_deserializer=api.NodeWatchResourcesResponse.parse)
        try:
            call = plugin.call = method(bytes(api.NodeWatchResourcesRequest()))
            for message in call:
                now = time.monotonic()
                devices = {(d.device.pool_name, d.device.device_name):
                           DeviceHealthSeen(api.HealthStatus(d.health).name, d.message, d.last_updated_time, now)
                           for d in message.devices if d.device is not None}
                with self._lock:
                    plugin.devices = devices
                    plugin.health_messages += 1
                    plugin.health_times.append(now)
                    self._lock.notify_all()
        except grpc.RpcError as exc:
            plugin.stream_error = exc.code().name
        finally:
            with self._lock:
                # The kubelet forgets the driver's health when the stream ends.
                plugin.devices = {}
                plugin.stream_ended = True
                self._lock.notify_all()

    # -- calls -------------------------------------------------------------------------------------------------------

    def plugin(self, driver: str) -> DraPlugin:
        with self._lock:
            return self.plugins[driver]

    def prepare(self, driver: str, claims: Sequence[tuple[str, str, str]], *,
                version: str | None = None, timeout: float = CALL_TIMEOUT_S) -> dict[str, ClaimAnswer]:
        """NodePrepareResources with `(namespace, uid, name)` claims; the answer per UID."""
        plugin = self.plugin(driver)
        version = version or plugin.dra_version
        api = _DRA_APIS[version]
        request = api.NodePrepareResourcesRequest(
            claims=[api.Claim(namespace=ns, uid=uid, name=name) for ns, uid, name in claims])
        response = _unary(plugin.channel, f"/k8s.io.kubelet.pkg.apis.dra.{version.split('.')[0]}.DRAPlugin/"
                          "NodePrepareResources", api.NodePrepareResourcesResponse)(
            bytes(request), timeout=timeout)
        return {uid: ClaimAnswer(r.error, tuple(
            (tuple(d.request_names), d.pool_name, d.device_name, tuple(d.cdi_device_ids), getattr(d, "share_id", None))
            for d in r.devices)) for uid, r in response.claims.items()}

    def unprepare(self, driver: str, claims: Sequence[tuple[str, str, str]], *,
                  version: str | None = None) -> dict[str, str]:
        """NodeUnprepareResources; the error per UID ("" when done)."""
        plugin = self.plugin(driver)
        version = version or plugin.dra_version
        api = _DRA_APIS[version]
        request = api.NodeUnprepareResourcesRequest(
            claims=[api.Claim(namespace=ns, uid=uid, name=name) for ns, uid, name in claims])
        response = _unary(plugin.channel, f"/k8s.io.kubelet.pkg.apis.dra.{version.split('.')[0]}.DRAPlugin/"
                          "NodeUnprepareResources", api.NodeUnprepareResourcesResponse)(
            bytes(request), timeout=CALL_TIMEOUT_S)
        return {uid: r.error for uid, r in response.claims.items()}

    # -- waiting (for tests) -----------------------------------------------------------------------------------------

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> Any:
        """Wait until `predicate(self)` is truthy (checked whenever something changes); its value, or TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate(self)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s: {self!r}")
                self._lock.wait(min(left, 0.05))
