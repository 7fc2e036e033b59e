"""The per-resource servers, as trio sees them: each resource one supervised child (`nvdp.supervise`).

A resource's child binds its grpclib server on the asyncio thread, registers it with the kubelet (retrying with
backoff while the kubelet refuses or cannot be reached), then serves until cancelled; on the way out the server is
stopped and its socket removed. An unexpected exception anywhere in that life restarts *that* resource only, after
the supervisor's backoff: its socket disappears meanwhile, so the kubelet marks its devices Unhealthy, and
`/readyz` names it. The other resources, their sockets and their `ListAndWatch` streams are never touched.

`ResourceServers.stop_unwanted()` and `start_missing()` are the two halves of a reconcile by diff: removed or
changed resources are stopped first, new ones started second, unchanged ones are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from nvdp.core.supervision import Backoff
from nvdp.kubelet.aio import AsyncioThread
from nvdp.kubelet.plugin_server import BoundServer, CallObserver, ServingContext, start_server, stop_server
from nvdp.kubelet.registration import RegistrationError, register
from nvdp.supervise import DEFAULT_BACKOFF, SupervisionReporter, Supervisor

log = logging.getLogger(__name__)


class ServerObserver(CallObserver, Protocol):
    """What the servers report (nvdp.observe.metrics.Metrics)."""

    def registered(self, resource: str) -> None: ...


#: Registration retry delays: first retry after 0.5 s, doubling, capped at 30 s (upstream retries every 30 s).
REGISTER_BACKOFF = Backoff(first_s=0.5, max_s=30.0, jitter=0.0)
STOP_TIMEOUT_S = 3.0


def child_name(resource: str) -> str:
    """How a resource's child is named in logs, metrics (`child` label) and /readyz."""
    return f"server {resource}"


@dataclass(eq=False)
class RunningResource:
    """One run of a resource's server (a restart makes a new one)."""

    context: ServingContext
    registered: trio.Event = field(default_factory=trio.Event)
    bound: BoundServer | None = None
    registrations: int = 0

    def __repr__(self) -> str:
        return (f"<RunningResource {self.context.resource.name} devices={len(self.context.resource.devices)} "
                f"registered={self.registered.is_set()}>")


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
        reporter: SupervisionReporter | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._observer = observer
        #: Called (on trio) whenever a resource is started, stopped or registered: readiness follows it.
        self._on_change = on_change
        self._host = host
        self.plugin_dir = plugin_dir
        self.kubelet_socket = kubelet_socket
        self._supervisor: Supervisor[str, ServingContext] = Supervisor(
            nursery, self._serve, name=child_name, reporter=reporter, backoff=backoff)
        self._runs: dict[str, RunningResource] = {}
        self._unhealthy: Mapping[str, str] = {}
        #: Set whenever a resource becomes registered or the set of resources changes.
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<ResourceServers {sorted(self._supervisor.children)} registered={self.all_registered}>"

    @property
    def supervisor(self) -> Supervisor[str, ServingContext]:
        return self._supervisor

    @property
    def running(self) -> Mapping[str, RunningResource]:
        """The current run of each wanted resource (a resource between two runs has none)."""
        return {name: self._runs[name] for name in self._supervisor.children if name in self._runs}

    def is_registered(self, name: str) -> bool:
        run = self._runs.get(name)
        return name in self._supervisor.children and run is not None and run.registered.is_set()

    @property
    def all_registered(self) -> bool:
        return all(self.is_registered(name) for name in self._supervisor.children)

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
        await self._supervisor.stop_many(
            [name for name, spec in self._supervisor.specs.items() if wanted.get(name) != spec])
        self._notify()

    async def start_missing(self, contexts: Sequence[ServingContext]) -> None:
        """Start servers for wanted resources that are not running (second half of a reconcile)."""
        running = self._supervisor.children
        for context in contexts:
            if context.resource.name not in running:
                await self._supervisor.start(context.resource.name, context)
        self._notify()

    async def restart_all(self) -> None:
        await self._supervisor.restart_all()
        self._notify()

    async def restart(self, name: str) -> None:
        await self._supervisor.restart(name)
        self._notify()

    async def stop_all(self) -> None:
        await self._supervisor.stop_all()
        self._notify()

    def publish_health(self, unhealthy: Mapping[str, str]) -> None:
        """Send a new health snapshot (unhealthy device ID -> reason) to every running server."""
        self._unhealthy = unhealthy
        for run in self._runs.values():
            if run.bound is not None:
                self._host.call_soon(run.bound.mirror.publish, unhealthy)

    def resource_for_socket(self, socket_name: str) -> str | None:
        for name, context in self._supervisor.specs.items():
            if context.resource.socket_name == socket_name:
                return name
        return None

    # ------------------------------------------------------------------------------------------- one resource

    async def _serve(self, name: str, context: ServingContext, *, task_status: trio.TaskStatus[None]) -> None:
        """One life of a resource's server: bind, register, serve until cancelled; always stopped on the way out."""
        run = RunningResource(context)
        self._runs[name] = run
        socket_path = self.plugin_dir / context.resource.socket_name
        try:
            try:
                # Shielded (and short): once the loop has bound the socket, the BoundServer must come back here to
                # be stopped, or a cancellation during start-up would leave the socket behind.
                with trio.CancelScope(shield=True):
                    run.bound = await self._host.run(
                        start_server, context, self._unhealthy, socket_path, self._observer, passthrough=(OSError,))
            except OSError as exc:
                # Typically the plugin directory is missing because the kubelet is not up yet. The socket
                # watcher restarts us when kubelet.sock appears.
                log.warning("cannot serve %s on %s: %s; waiting for the kubelet", name, socket_path,
                            exc.strerror or exc)
                task_status.started()
                await trio.sleep_forever()
            try:
                log.info("serving %s on %s (%d devices)", name, socket_path, len(context.resource.devices))
                task_status.started()
                if self.kubelet_socket is None:
                    log.info("skipping registration of %s with the kubelet (no kubelet socket)", name)
                else:
                    await self._register(run)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
                    await self._host.run(stop_server, run.bound)
                log.info("stopped serving %s", name)
        finally:
            if self._runs.get(name) is run:
                del self._runs[name]
            self._notify()

    async def _register(self, run: RunningResource) -> None:
        assert self.kubelet_socket is not None
        resource = run.context.resource
        failures = 0
        while True:
            try:
                await self._host.run(register, self.kubelet_socket, resource.socket_name, resource.name,
                                     passthrough=(RegistrationError,))
            except RegistrationError as exc:
                failures += 1
                delay = REGISTER_BACKOFF.delay(failures, 0.5)
                log.warning("registering %s failed: %s; retrying in %.1f s", resource.name, exc, delay)
                await trio.sleep(delay)
                continue
            run.registrations += 1
            run.registered.set()
            if self._observer is not None:
                self._observer.registered(resource.name)
            self._notify()
            log.info("registered %s with the kubelet", resource.name)
            return
