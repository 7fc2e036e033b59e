"""The DRA kubelet plugin as trio sees it: one supervised child that owns both sockets and re-registers.

One life of the child:

1. watch the kubelet's registry directory and the plugin's own directory (`nvdp.inotify`), before anything is
   bound, so no event is missed;
2. bind `<plugins dir>/<driver>/dra.sock` (DRAPlugin v1 + v1beta1, DRAResourceHealth v1 + v1alpha1) first: the
   kubelet dials it as soon as it reads the registration, so it must already answer;
3. bind `<registry dir>/<driver>-reg.sock`; the kubelet's plugin watcher sees it, calls GetInfo and
   NotifyRegistrationStatus;
4. serve until the registry directory is re-created (the kubelet then no longer sees our socket), or one of our
   sockets is deleted: then both are unbound and bound again, which registers again;
5. on the way out (SIGTERM, a reload that turns DRA off, a restart by the supervisor) the registration socket goes
   first, then dra.sock; each is removed only if it is still ours (same inode).

Stale sockets (ours from a crashed run) are unlinked before binding. A missing registry directory is waited for.
Claims are prepared by the `ClaimCalls` the child runs beside its servers; health comes from `DraHealthFeed`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from nvdp.core.dra.plugin import (
    HEALTH_RESEND_S,
    HealthSnapshot,
    HealthTarget,
    health_snapshot,
    plugin_socket_path,
    registration_socket_name,
    unhealthy_targets,
)
from nvdp.core.health.tracker import HealthTracker
from nvdp.dra import grpc_servers
from nvdp.dra.calls import ClaimCalls
from nvdp.dra.grpc_servers import BoundSocket, PluginIdentity
from nvdp.inotify import DirectoryWatch
from nvdp.inotify import flags as F
from nvdp.kubelet.aio import AsyncioThread

log = logging.getLogger(__name__)

#: How long unbinding one socket may take on the way out.
STOP_TIMEOUT_S = 3.0
_DIR_MASK = F.CREATE | F.MOVED_TO | F.DELETE | F.MOVED_FROM


@dataclass(frozen=True, slots=True)
class DraPluginPaths:
    driver: str
    registry_dir: Path
    plugins_dir: Path

    @property
    def plugin_socket(self) -> Path:
        return Path(plugin_socket_path(self.plugins_dir, self.driver))

    @property
    def registration_socket(self) -> Path:
        return self.registry_dir / registration_socket_name(self.driver)


class DraHealthFeed:
    """The DRA devices' health, computed on trio from the device plugin's tracker and sent to the health streams.

    `set_targets()` when the published devices change; `publish()` whenever the tracker may have changed (the
    daemon's HealthPublisher calls it). Only changed snapshots reach the streams."""

    def __init__(self, pool: str, tracker: HealthTracker) -> None:
        self.tracker = tracker
        self.pool = pool
        self.targets: tuple[HealthTarget, ...] = ()
        self.snapshot = HealthSnapshot(pool)
        #: Device name -> reason for what the tracker does not know (an MPS share host whose daemon is silent).
        self.extra: Mapping[str, str] = {}
        #: Where snapshots go (set by the plugin while dra.sock is bound).
        self._sink: tuple[AsyncioThread, grpc_servers.HealthMirror] | None = None

    def __repr__(self) -> str:
        return f"<DraHealthFeed pool={self.pool} devices={len(self.targets)} snapshot={self.snapshot!r}>"

    def set_targets(self, targets: Sequence[HealthTarget]) -> None:
        self.targets = tuple(targets)
        self.publish()

    def publish(self) -> None:
        unhealthy = {**self.extra, **unhealthy_targets(self.tracker, self.targets)}
        self.snapshot = health_snapshot(self.pool, self.targets, unhealthy)
        if self._sink is not None:
            host, mirror = self._sink
            host.call_soon(mirror.publish, self.snapshot)

    def attach(self, host: AsyncioThread, mirror: grpc_servers.HealthMirror | None) -> None:
        self._sink = (host, mirror) if mirror is not None else None


@dataclass(eq=False)
class RegistrationState:
    """What the kubelet said about this run's registration."""

    registered: trio.Event = field(default_factory=trio.Event)
    #: NotifyRegistrationStatus calls with plugin_registered true, and the last error the kubelet sent.
    registrations: int = 0
    last_error: str = ""


class DraKubeletPlugin:
    """The child (see the module docstring). `run` is what the supervisor runs."""

    def __init__(self, host: AsyncioThread, paths: DraPluginPaths, calls: ClaimCalls, health: DraHealthFeed, *,
                 health_resend_s: float = HEALTH_RESEND_S) -> None:
        self.host = host
        self.paths = paths
        self.calls = calls
        self.health = health
        self.health_resend_s = health_resend_s
        self.state = RegistrationState()
        #: Binds of the pair of sockets over the child's lives (each one a registration for the kubelet).
        self.binds = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return (f"<DraKubeletPlugin {self.paths.driver} binds={self.binds} "
                f"registered={self.state.registered.is_set()} {self.calls!r}>")

    async def wait_until(self, predicate: Callable[[DraKubeletPlugin], object]) -> None:
        """Until `predicate(self)` holds; checked whenever a bind or the kubelet's verdict changes something."""
        while not predicate(self):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def identity(self) -> PluginIdentity:
        return PluginIdentity(self.paths.driver, str(self.paths.plugin_socket))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Started once dra.sock is bound (the registration socket may still wait for the kubelet's directory)."""
        self._token = trio.lowlevel.current_trio_token()
        started = False

        def up() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        async with trio.open_nursery() as nursery:
            await nursery.start(self.calls.serve)
            while True:
                with DirectoryWatch(self.paths.registry_dir, _DIR_MASK) as registry, \
                        DirectoryWatch(self.paths.plugin_socket.parent, _DIR_MASK) as own:
                    plugin, registration = await self._bind(registry, up)
                    try:
                        await self._wait_for_rebind(registry, own, plugin, registration)
                    finally:
                        with trio.CancelScope(shield=True):
                            await self._unbind(registration)
                            await self._unbind(plugin)
                            self.health.attach(self.host, None)

    # -- binding -------------------------------------------------------------------------------------------------------

    async def _bind(self, registry: DirectoryWatch, up: Callable[[], None]) -> tuple[BoundSocket, BoundSocket]:
        paths = self.paths
        await trio.Path(paths.plugin_socket.parent).mkdir(mode=0o750, parents=True, exist_ok=True)
        plugin = await self._bind_one(grpc_servers.bind_plugin, paths.plugin_socket, self.calls,
                                      self.health.snapshot, self.health_resend_s)
        self.health.attach(self.host, plugin.mirror)
        # A snapshot computed while binding may have missed the mirror: send the current one.
        self.health.publish()
        up()
        try:
            while True:
                try:
                    registration = await self._bind_one(grpc_servers.bind_registration,
                                                        paths.registration_socket, self.identity, self._on_status)
                    break
                except OSError as exc:
                    log.warning("cannot create %s: %s; waiting for the kubelet's registry directory",
                                paths.registration_socket, exc.strerror or exc)
                    await self._wait_for_registry(registry)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._unbind(plugin)
            raise
        self.binds += 1
        self.state = RegistrationState()
        self._notify()
        log.info("DRA driver %s: serving %s, registration socket %s", paths.driver, paths.plugin_socket,
                 paths.registration_socket)
        return plugin, registration

    async def _bind_one(self, bind: Callable[..., Awaitable[BoundSocket]], *args: Any) -> BoundSocket:
        # Shielded (and short): a socket the loop has bound must come back here to be unbound.
        with trio.CancelScope(shield=True):
            bound = await self.host.run(bind, *args, passthrough=(OSError,))
        return bound

    async def _unbind(self, bound: BoundSocket) -> None:
        with trio.move_on_after(STOP_TIMEOUT_S):
            await self.host.run(grpc_servers.stop, bound)

    def _on_status(self, registered: bool, error: str) -> None:
        """On the asyncio loop: hand the kubelet's verdict to trio."""
        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._status, registered, error)

    def _status(self, registered: bool, error: str) -> None:
        if registered:
            self.state.registrations += 1
            self.state.registered.set()
            log.info("DRA driver %s registered with the kubelet", self.paths.driver)
        else:
            self.state.last_error = error
            log.error("the kubelet refused DRA driver %s: %s", self.paths.driver, error or "no reason given")
        self._notify()

    # -- watching ------------------------------------------------------------------------------------------------------

    async def _wait_for_registry(self, registry: DirectoryWatch) -> None:
        while not await trio.Path(self.paths.registry_dir).is_dir():
            await registry.wait()

    async def _wait_for_rebind(self, registry: DirectoryWatch, own: DirectoryWatch, plugin: BoundSocket,
                               registration: BoundSocket) -> None:
        """Return when the pair of sockets must be bound again (see the module docstring)."""
        async with trio.open_nursery() as nursery:
            async def watch(directory: DirectoryWatch, bound: BoundSocket) -> None:
                while True:
                    for event in await directory.wait():
                        if event.kind == "appeared":
                            if bound.is_ours():
                                # Our socket is in the directory as it is now: an event from before our bind (the
                                # directory came back while we waited for it).
                                continue
                            log.warning("%s was re-created: binding %s again", directory.directory,
                                        bound.socket_path.name)
                            nursery.cancel_scope.cancel()
                            return
                        if event.kind == "removed":
                            log.warning("%s was removed; waiting for it to come back", directory.directory)
                        elif event.name == bound.socket_path.name and not bound.is_ours():
                            log.warning("%s was deleted: binding the DRA sockets again", bound.socket_path)
                            nursery.cancel_scope.cancel()
                            return

            nursery.start_soon(watch, registry, registration)
            nursery.start_soon(watch, own, plugin)

