"""The supervisor tree: every long-lived task of nvdp, who starts it and who restarts what.

Nesting is lifetime, outermost lives longest; `[supervised]` children are restarted alone, with backoff, when they
fail (`nvdp.supervise`); everything else ends the process only at start-up or on a signal (`run_tree` below reads
the same way)::

    root nursery
    ├ signals                     SIGTERM/SIGINT/SIGQUIT: cancel everything, exit 0; SIGHUP: Reload. First, so a
    │                               signal during start-up is handled too.
    ├ [supervised] http           /metrics, /healthz, /readyz; up during start-up so probes can say why not ready
    ├ [supervised] events         (with API access) posts rate-limited Node Events; never blocks anyone
    ├ [supervised] config-watch   (with per-node configs) node label + config directory/ConfigMap -> ConfigChosen;
    │                               its first choice decides the settings everything below starts with
    └ asyncio thread              grpclib's loop (nvdp.kubelet.aio); outlives every server, stopped last
      └ NVML session              nvmlInit (the fake library with --simulate); nvmlShutdown on the way out
        └ node nursery
          ├ [supervised] nvml-health    NVML events -> tracker -> HealthPublisher; new GPUs restart it
          ├ [supervised] kubelet-watch  kubelet.sock created -> KubeletStarted; a socket deleted -> SocketDeleted
          ├ [supervised] labels         GFD's labels for each applied plan -> NFD file, NodeFeature or Node labels
          ├ [supervised] dra-plugin     (with --dra) dra.sock, then <driver>-reg.sock; Prepare/Unprepare on trio;
          │                               the health stream; re-registers when the registry dir is re-created
          ├ [supervised] dra-slices     (with --dra) the node's ResourceSlices, kept in sync by their own watch
          ├ report ready                every resource registered -> sd_notify READY=1 (then ends)
          ├ MPS nursery                 [supervised] one control daemon per MPS-shared GPU (nvdp.mps)
          │ └ servers nursery           [supervised] one grpclib server + registration per resource
          └ controller                  nvdp.controller.Controller.run: the only code that changes plan, servers,
                                          MPS daemons and the health watch; applies commands one at a time

Triggers never touch servers or daemons; they send a command to the controller. Servers stop before MPS daemons,
MPS daemons (and their GPUs' compute modes) before NVML shuts down. What the tree reports goes through one
`nvdp.observe.reporter.Observer` (metrics, probes, Node Events).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from nvdp.controller import (
    Command,
    ConfigChosen,
    Controller,
    CountingTracker,
    HealthPublisher,
    KubeletStarted,
    NodeConfig,
    NvmlSession,
    Reload,
    SocketDeleted,
    report_config,
)
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.settings import Settings
from nvdp.core.plan.build import PlanError
from nvdp.kubelet.aio import AsyncioThread, open_asyncio_thread
from nvdp.kubelet.servers import ResourceServers
from nvdp.kubelet.socket_watch import watch_plugin_dir
from nvdp.mps.errors import MpsError, ShmError
from nvdp.nvml import adapter as nvml
from nvdp.observe.http import ProbeState, serve_http
from nvdp.observe.metrics import Metrics, UnexportedMetrics
from nvdp.observe.reporter import Observer
from nvdp.supervise import Supervisor, Task, run_task

if TYPE_CHECKING:
    # The Kubernetes client (httpx) and the node-config watch are imported only when per-node configs or API
    # access are configured: start-up time and memory on nodes that use neither.
    from nvdp.k8s.client import ApiClient
    from nvdp.node_config import ConfigSources, ConfigUpdate

__all__ = ["NodeConfig", "StartupError", "run_daemon"]

log = logging.getLogger(__name__)


#: `/readyz`'s answer (200) and the log's, with failOnInitError=false and no usable NVML.
NO_GPU = "no NVIDIA GPU on this node; serving nothing"


class StartupError(Exception):
    """nvdp cannot start serving (bad config, NVML unavailable with failOnInitError, invalid MIG layout)."""


async def run_daemon(
    settings: Settings,
    *,
    reload_settings: Callable[[], Settings] | None = None,
    handle_signals: bool = True,
    notify_socket: str | None = None,
    search_path: str = os.defpath,
    metrics: Metrics | None = None,
    probes: ProbeState | None = None,
    node_config: NodeConfig | None = None,
    task_status: trio.TaskStatus[ResourceServers | None] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve until cancelled or told to stop by a signal; returns the exit code.

    `reload_settings` re-reads the config file (SIGHUP). `search_path` is the PATH where the MPS control program is
    looked for. `task_status.started()` is called with the servers once every resource is registered, for embedding
    (the demo, tests).
    """
    if metrics is None:
        # Without an endpoint nobody can read a metric: drop them, and never import prometheus-client.
        metrics = Metrics() if settings.metrics_address.strip() else UnexportedMetrics()
    observer = Observer(metrics, probes or ProbeState())
    if settings.simulate is not None:
        # The simulated node brings a fake nvidia-cuda-mps-control beside its fake libnvidia-ml.
        search_path = f"{Path(__file__).parent / 'sim'}{os.pathsep}{search_path}"
    tree = Tree(settings, observer, reload_settings, search_path, node_config)
    try:
        return await tree.run(handle_signals, notify_socket, task_status)
    except BaseExceptionGroup as group:
        # Nurseries wrap errors in groups; a start-up failure alone is reported as itself.
        startup, rest = group.split(StartupError)
        if startup is not None and rest is None:
            raise _first_leaf(startup) from None
        raise


class Tree:
    """The tree of the module docstring. `run()` builds it top to bottom; nothing here changes it afterwards (that
    is the controller's job)."""

    def __init__(
        self, settings: Settings, observer: Observer, reload_settings: Callable[[], Settings] | None,
        search_path: str, node_config: NodeConfig | None,
    ) -> None:
        self.settings = settings
        self.observer = observer
        self.reload_settings = reload_settings
        self.search_path = search_path
        self.node_config = node_config
        self.commands, self._receive = trio.open_memory_channel[Command](16)
        #: The first config the node-config watch chose (None without per-node configs).
        self.first_update: ConfigUpdate | None = None
        #: Why the live source's first config was refused (None: it was not, or there is no live source).
        self.first_refused: ConfigError | None = None
        self.controller: Controller | None = None
        self.client: ApiClient | None = None

    def __repr__(self) -> str:
        return f"<Tree {self.controller!r} {self.observer!r}>"

    async def run(
        self, handle_signals: bool, notify_socket: str | None, task_status: trio.TaskStatus[ResourceServers | None]
    ) -> int:
        settings, observer = self.settings, self.observer
        async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as root:
            if handle_signals:
                await root.start(watch_signals, root.cancel_scope, self.commands)
            root_tasks: Supervisor[str, Task] = Supervisor(root, run_task, reporter=observer)
            await self.start_http(root_tasks)
            client = self.client = await self.start_api(stack, root_tasks)
            self.check_dra(client)
            if self.node_config is not None and self.node_config.sources is not None:
                settings = self.settings = await self.start_config_watch(root_tasks, self.node_config.sources,
                                                                          client)
            async with open_asyncio_thread() as host, open_nvml(settings) as session, \
                    trio.open_nursery() as node:
                if session is None:
                    # Serving nothing is the intended state: ready (helm --wait, rollout status finish), and says why.
                    observer.nvml_unavailable(NO_GPU)
                    task_status.started(None)
                    await trio.sleep_forever()
                node_tasks: Supervisor[str, Task] = Supervisor(node, run_task, reporter=observer)
                health = HealthPublisher(CountingTracker.for_settings(settings, observer), observer)
                async with trio.open_nursery() as mps_nursery:
                    controller = self.controller = Controller(
                        settings, session=session, observer=observer, health=health, reporter=observer,
                        tasks=node_tasks,
                        mps_nursery=mps_nursery, search_path=self.search_path,
                        reload_settings=self.reload_settings, node_config=self.node_config,
                        update=self.first_update)
                    try:
                        async with trio.open_nursery() as servers_nursery:
                            await self.serve(controller, host, servers_nursery, node, node_tasks, notify_socket,
                                             task_status)
                    finally:
                        # Servers are gone; the MPS daemons go next: removed if nvdp owns them, else left to
                        # the MPS host (docs/mps.md), before the nursery ends their supervision.
                        with trio.CancelScope(shield=True):
                            await controller.release_mps()
            root.cancel_scope.cancel()
        return 0

    async def serve(
        self, controller: Controller, host: AsyncioThread, servers_nursery: trio.Nursery, node: trio.Nursery,
        node_tasks: Supervisor[str, Task], notify_socket: str | None,
        task_status: trio.TaskStatus[ResourceServers | None],
    ) -> None:
        """The first plan, the servers, the kubelet watch, then the controller's loop until cancelled."""
        settings = self.settings
        started = trio.current_time()
        refused: Exception | None = self.first_refused
        inventory, plan = controller.inventory, controller.plan
        if refused is None:
            try:
                inventory, plan = await controller.first_plan()
            except (ConfigError, PlanError) as exc:
                if not self.live_source:
                    raise StartupError(str(exc)) from None
                refused = exc  # e.g. slices larger than the GPU: the config, not the node, is wrong
            except (MpsError, ShmError) as exc:
                raise StartupError(str(exc)) from None
        servers = ResourceServers(
            servers_nursery, host, settings.plugin_dir or Path(tempfile.gettempdir()), settings.kubelet_socket,
            observer=self.observer.metrics, on_change=controller.servers_changed, reporter=self.observer)
        controller.attach(servers)
        controller.attach_dra(self.client, host, self.observer, self.observer)
        if settings.kubelet_socket is not None:
            await node_tasks.start("kubelet-watch", Task(watch_kubelet, (settings.kubelet_socket, self.commands)))
        await self.start_labels(controller, node_tasks)
        if refused is None:
            await controller.apply(settings, inventory, plan, started)
        else:
            controller.serve_nothing(settings, inventory, refused)
        node.start_soon(report_ready, servers, notify_socket, task_status)
        await controller.run(self._receive)

    async def start_labels(self, controller: Controller, tasks: Supervisor[str, Task]) -> None:
        """The GFD label child (docs/labels.md), when a sink is configured."""
        from nvdp.gfd import LabelPublisher, label_sink

        node_name = self.settings.node_name or (self.node_config.sources.node_name if self.node_config is not None
                                                and self.node_config.sources is not None else None)
        try:
            sink = label_sink(self.settings, self.client, node_name)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if sink is None:
            return
        publisher = LabelPublisher(sink, host_root=controller.session.host_root,
                                   machine_type_file=self.settings.machine_type_file,
                                   timestamps=not self.settings.no_timestamp,
                                   min_interval_s=self.settings.label_interval)
        controller.health.labels = publisher
        log.info("GPU feature labels go to the %s", sink.description)
        await tasks.start("labels", Task(publisher.run, ()))
    def check_dra(self, client: ApiClient | None) -> None:
        """DRA reads claims and writes ResourceSlices through the API, and writes CDI specs: all must be there."""
        settings = self.settings
        if not settings.dra_enabled:
            return
        if client is None:
            raise StartupError("DRA is enabled but nvdp has no Kubernetes API access (give --node-name, and run in "
                               "a pod with a service account or give --kubeconfig)")
        if not settings.node_name:
            raise StartupError("DRA is enabled but this node's name is unknown: set --node-name (env NODE_NAME)")
        if settings.cdi_root is None:
            raise StartupError("DRA is enabled but there is no CDI root to write claim specs to: set --cdi-root")

    async def start_http(self, tasks: Supervisor[str, Task]) -> None:
        address = self.settings.metrics_address
        if not address.strip():
            return
        metrics, probes = self.observer.metrics, self.observer.probes
        try:
            await tasks.start("http", Task(serve_http, (address, metrics, probes)), first_failure_raises=True)
        except* OSError as group:
            # A taken port is a start-up error: the operator must choose another one.
            exc = group.exceptions[0]
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(f"cannot serve metrics and probes on {address!r}: {reason}; choose another "
                               "--metrics-address (METRICS_ADDRESS) or an empty one to disable the endpoint") from None

    async def start_api(
        self, stack: contextlib.AsyncExitStack, tasks: Supervisor[str, Task]
    ) -> ApiClient | None:
        """The Kubernetes API client and the Node Event recorder, when API access is configured."""
        if self.node_config is None or self.node_config.api is None:
            return None
        from nvdp.k8s.client import open_client
        from nvdp.observe.events import EventRecorder

        client = await stack.enter_async_context(open_client(self.node_config.api))
        sources = self.node_config.sources
        node_name = self.settings.node_name or (sources.node_name if sources is not None else None)
        if node_name:
            # Node Events: rate-limited, posted by their own task, never blocking the controller.
            events = EventRecorder(node_name, metrics=self.observer.metrics)
            self.observer.events = events
            await tasks.start("events", Task(events.serve, (client,)))
        return client

    async def start_config_watch(
        self, tasks: Supervisor[str, Task], sources: ConfigSources, client: ApiClient | None
    ) -> Settings:
        """Start the node-config watch; its first choice becomes the settings everything else starts with."""
        assert self.node_config is not None
        try:
            await tasks.start("config-watch", Task(self.watch_config, (sources, client)), first_failure_raises=True)
        except* ConfigError as group:
            raise StartupError(str(group.exceptions[0])) from None
        assert self.first_update is not None
        report_config(self.first_update, self.observer)
        try:
            return await self.node_config.settings_for(self.first_update)
        except ConfigError as exc:
            # A live source: nvdp starts, serves nothing from this config and applies it once it is fixed (the
            # watch sends the fixed one). The flags and environment alone decide how NVML and the rest start.
            self.first_refused = exc
        try:
            return self.node_config.make_settings(None, "flags and environment")
        except ConfigError as exc:
            raise StartupError(str(exc)) from None

    @property
    def live_source(self) -> bool:
        """Configs come from a config directory or ConfigMap that can be fixed while nvdp runs."""
        return self.node_config is not None and self.node_config.sources is not None

    async def watch_config(
        self, sources: ConfigSources, client: ApiClient | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """The config-watch child: every choice becomes a ConfigChosen command, but the very first, which decides
        the start-up settings. A restarted watch sends its first choice too; the controller ignores it when it is
        the config being served."""
        from nvdp.node_config import watch_config

        async with watch_config(sources, client, observer=self.observer.metrics) as updates:
            update = await updates.receive()
            if self.first_update is None:
                self.first_update = update
                task_status.started()
            else:
                task_status.started()
                await self.commands.send(ConfigChosen(update))
            async for update in updates:
                await self.commands.send(ConfigChosen(update))


def _first_leaf(group: BaseExceptionGroup[StartupError]) -> StartupError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, StartupError)
    return leaf


@contextlib.asynccontextmanager
async def open_nvml(settings: Settings) -> AsyncIterator[NvmlSession | None]:
    """Start NVML (through the simulated node's fake library with --simulate). Yields None when NVML cannot start
    and `failOnInitError` is false: the caller then serves nothing and waits, as upstream does."""
    with contextlib.ExitStack() as stack:
        host_root, driver_root, dev_root = Path("/"), settings.driver_root, settings.dev_root
        if settings.simulate is not None:
            from nvdp import sim  # only the simulation needs a C compiler

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdp-sim-")))
            try:
                node = sim.load_node(settings.simulate)
                handle = await trio.to_thread.run_sync(sim.activate, node, workdir)
            except (sim.SimNodeError, sim.SimBuildError) as exc:
                raise StartupError(str(exc)) from None
            host_root = driver_root = dev_root = handle.host_root
            log.info("simulating the GPU node described by %s", settings.simulate)
        try:
            await trio.to_thread.run_sync(nvml.init)
        except nvml.NvmlError as exc:
            message = f"failed to initialize NVML: {exc}"
            if settings.fail_on_init_error:
                raise StartupError(
                    f"{message}. If this is not a GPU node, set failOnInitError=false (--fail-on-init-error=false) "
                    "to have nvdp wait instead of exiting.") from None
            # The one line that says so (nothing repeats it): on a node without GPUs this is the intended state.
            log.warning("%s: %s (failOnInitError is false, so nvdp serves no devices and waits)", message, NO_GPU)
            yield None
            return
        try:
            yield NvmlSession(host_root, driver_root, dev_root)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(nvml.shutdown)


def sd_notify(notify_socket: str | None, message: str) -> None:
    """systemd's readiness protocol: one datagram on $NOTIFY_SOCKET (an abstract socket when it starts with @)."""
    if not notify_socket:
        return
    address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("cannot notify systemd on %s: %s", notify_socket, exc)


async def report_ready(
    servers: ResourceServers, notify_socket: str | None, task_status: trio.TaskStatus[ResourceServers | None]
) -> None:
    await servers.wait_all_registered()
    log.info("ready: every resource is registered with the kubelet")
    sd_notify(notify_socket, "READY=1")
    task_status.started(servers)


async def watch_signals(
    scope: trio.CancelScope,
    send: trio.MemorySendChannel[Command],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: reloading the config")
                await send.send(Reload())
            else:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                scope.cancel()
                return


async def watch_kubelet(
    kubelet_socket: Path, send: trio.MemorySendChannel[Command], *, task_status: trio.TaskStatus[None]
) -> None:
    """The kubelet-watch child: plugin-directory events become commands for the controller."""
    task_status.started()
    async for event in watch_plugin_dir(kubelet_socket):
        if event.kind == "kubelet-started":
            await send.send(KubeletStarted())
        else:
            await send.send(SocketDeleted(event.name))
