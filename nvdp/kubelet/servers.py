"""The per-resource servers, as trio sees them: start, register, reconcile by diff, restart, stop.

Each resource runs in its own task with its own cancel scope inside the servers nursery. `ResourceServers.apply()`
compares the wanted serving contexts with the running ones: removed or changed resources are stopped first, new ones
started second, and unchanged ones are left alone, so their `ListAndWatch` streams never break.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from nvdp.kubelet.aio import AsyncioThread
from nvdp.kubelet.plugin_server import BoundServer, CallObserver, ServingContext, start_server, stop_server
from nvdp.kubelet.registration import RegistrationError, register

log = logging.getLogger(__name__)


class ServerObserver(CallObserver, Protocol):
    """What the servers report (nvdp.observe.metrics.Metrics)."""

    def registered(self, resource: str) -> None: ...


#: Registration retry delays: first retry after 0.5 s, doubling, capped at 30 s (upstream retries every 30 s).
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
STOP_TIMEOUT_S = 3.0


@dataclass(eq=False)
class RunningResource:
    context: ServingContext
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    registered: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)
    bound: BoundServer | None = None
    registrations: int = 0

    def __repr__(self) -> str:
        return (f"<RunningResource {self.context.resource.name} devices={len(self.context.resource.devices)} "
                f"registered={self.registered.is_set()} stopped={self.stopped.is_set()}>")


class ResourceServers:
    """Owns the running resource servers; only the daemon's controller task calls its async methods."""

    def __init__(
        self,
        nursery: trio.Nursery,
        host: AsyncioThread,
        plugin_dir: Path,
        kubelet_socket: Path | None,
        *,
        observer: ServerObserver | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._nursery = nursery
        self._observer = observer
        #: Called (on trio) whenever a resource is started, stopped or registered: readiness follows it.
        self._on_change = on_change
        self._host = host
        self.plugin_dir = plugin_dir
        self.kubelet_socket = kubelet_socket
        self._running: dict[str, RunningResource] = {}
        self._unhealthy: Mapping[str, str] = {}
        #: Set whenever a resource becomes registered or the set of resources changes.
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<ResourceServers {sorted(self._running)} registered={self.all_registered}>"

    @property
    def running(self) -> Mapping[str, RunningResource]:
        return self._running

    @property
    def all_registered(self) -> bool:
        return all(r.registered.is_set() for r in self._running.values())

    async def wait_all_registered(self) -> None:
        while not self.all_registered:
            event = self._changed
            await event.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self._on_change is not None:
            self._on_change()

    async def apply(self, contexts: Sequence[ServingContext]) -> None:
        await self.stop_unwanted(contexts)
        await self.start_missing(contexts)

    async def stop_unwanted(self, contexts: Sequence[ServingContext]) -> None:
        """Stop the servers whose resource is gone or changed (first half of a reconcile)."""
        wanted = {c.resource.name: c for c in contexts}
        for name, running in list(self._running.items()):
            if wanted.get(name) != running.context:
                await self._stop(name)
        self._notify()

    async def start_missing(self, contexts: Sequence[ServingContext]) -> None:
        """Start servers for wanted resources that are not running (second half of a reconcile)."""
        for context in contexts:
            if context.resource.name not in self._running:
                await self._start(context)
        self._notify()

    async def restart_all(self) -> None:
        contexts = [r.context for r in self._running.values()]
        for name in list(self._running):
            await self._stop(name)
        for context in contexts:
            await self._start(context)
        self._notify()

    async def restart(self, name: str) -> None:
        running = self._running.get(name)
        if running is None:
            return
        await self._stop(name)
        await self._start(running.context)
        self._notify()

    async def stop_all(self) -> None:
        for name in list(self._running):
            await self._stop(name)
        self._notify()

    def publish_health(self, unhealthy: Mapping[str, str]) -> None:
        """Send a new health snapshot (unhealthy device ID -> reason) to every running server."""
        self._unhealthy = unhealthy
        for running in self._running.values():
            if running.bound is not None:
                self._host.call_soon(running.bound.mirror.publish, unhealthy)

    def resource_for_socket(self, socket_name: str) -> str | None:
        for name, running in self._running.items():
            if running.context.resource.socket_name == socket_name:
                return name
        return None

    async def _start(self, context: ServingContext) -> None:
        running = RunningResource(context)
        self._running[context.resource.name] = running
        await self._nursery.start(self._serve, running)

    async def _stop(self, name: str) -> None:
        running = self._running.pop(name)
        running.scope.cancel()
        await running.stopped.wait()

    async def _serve(self, running: RunningResource, *, task_status: trio.TaskStatus[None]) -> None:
        resource = running.context.resource
        socket_path = self.plugin_dir / resource.socket_name
        try:
            with running.scope:
                try:
                    # Shielded (and short): once the loop has bound the socket, the BoundServer must come back here
                    # to be stopped, or a cancellation during start-up would leave the socket behind.
                    with trio.CancelScope(shield=True):
                        running.bound = await self._host.run(
                            start_server, running.context, self._unhealthy, socket_path, self._observer)
                except OSError as exc:
                    # Typically the plugin directory is missing because the kubelet is not up yet. The socket
                    # watcher restarts us when kubelet.sock appears.
                    log.warning("cannot serve %s on %s: %s; waiting for the kubelet", resource.name, socket_path,
                                exc.strerror or exc)
                    task_status.started()
                    await trio.sleep_forever()
                try:
                    log.info("serving %s on %s (%d devices)", resource.name, socket_path, len(resource.devices))
                    task_status.started()
                    if self.kubelet_socket is None:
                        log.info("skipping registration of %s with the kubelet (no kubelet socket)", resource.name)
                    else:
                        await self._register(running)
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
                        await self._host.run(stop_server, running.bound)
                    log.info("stopped serving %s", resource.name)
        finally:
            running.stopped.set()

    async def _register(self, running: RunningResource) -> None:
        assert self.kubelet_socket is not None
        resource = running.context.resource
        delay = RETRY_FIRST_S
        while True:
            try:
                await self._host.run(register, self.kubelet_socket, resource.socket_name, resource.name)
            except RegistrationError as exc:
                log.warning("registering %s failed: %s; retrying in %.1f s", resource.name, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            running.registrations += 1
            running.registered.set()
            if self._observer is not None:
                self._observer.registered(resource.name)
            self._notify()
            log.info("registered %s with the kubelet", resource.name)
            return

