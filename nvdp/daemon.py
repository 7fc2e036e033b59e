"""The supervisor tree: every long-lived task of nvdp, who starts it and who restarts what.

Nesting is lifetime, outermost lives longest (`Daemon.run`)::

    root nursery
    ├ watch signals               SIGTERM/SIGINT/SIGQUIT: cancel everything, exit 0; SIGHUP: "reload". First, so a
    │                               signal during start-up is handled too.
    ├ serve_http                  /metrics, /healthz, /readyz; up during start-up so probes can say why not ready
    ├ Event recorder              (with API access) posts rate-limited Node Events; never blocks anyone
    ├ watch config                (with per-node configs) node label + config directory/ConfigMap -> "config"; its
    │                               first choice decides the settings everything below starts with
    └ asyncio thread              grpclib's loop (nvdp.kubelet.aio); outlives every server, stopped last
      └ NVML session              nvmlInit (the fake library with --simulate); nvmlShutdown on the way out
        └ main nursery
          ├ health watch          NVML events -> HealthTracker -> publish_health(); restarted if the GPUs change
          ├ watch kubelet socket  kubelet.sock created -> "kubelet-started"; our socket deleted -> "socket-deleted"
          ├ report ready          every resource registered -> sd_notify READY=1
          └ MPS nursery           one supervised nvidia-cuda-mps-control per MPS-shared GPU (nvdp.mps)
            └ servers nursery     one task and cancel scope per resource (nvdp.kubelet.servers)
          controller              `Daemon.control`, the only code that changes servers, MPS daemons and the plan:
                                    it applies commands one at a time

Triggers never touch servers or daemons; they send a `Command` to the controller. A reload builds and checks the
new plan *before* anything stops; if that fails the running plan keeps serving and the error is reported. Servers
stop before MPS daemons, MPS daemons (and their GPUs' compute modes) before NVML shuts down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import parse_config
from nvdp.core.config.schema import Config
from nvdp.core.config.settings import Settings
from nvdp.core.health import ALL_GPUS, HealthTracker, XidPolicy
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.allocate import AllocateOptions
from nvdp.core.plan.build import PlanError, build_plan
from nvdp.core.plan.labels import sharing_labels
from nvdp.core.plan.model import Device, Plan
from nvdp.kubelet.aio import open_asyncio_thread
from nvdp.kubelet.plugin_server import ServingContext
from nvdp.kubelet.servers import ResourceServers
from nvdp.kubelet.socket_watch import watch_plugin_dir
from nvdp.mps import MpsDaemons, MpsError, NvmlComputeMode, find_control_binary
from nvdp.mps.host import HostLauncher
from nvdp.mps.shm import ShmError, ensure_shm
from nvdp.nfd import write_features_file
from nvdp.nvml import adapter as nvml
from nvdp.nvml.adapter import XidEvent
from nvdp.nvml.health import watch_nvml_health
from nvdp.observe.http import ProbeState, serve_http
from nvdp.observe.metrics import Metrics

if TYPE_CHECKING:
    # The Kubernetes client (httpx) and the node-config watch are imported only when per-node configs or API
    # access are configured: start-up time and memory on nodes that use neither.
    from nvdp.k8s.client import ApiClient, ApiConfig
    from nvdp.node_config import ConfigSources, ConfigUpdate
    from nvdp.observe.events import EventRecorder

log = logging.getLogger(__name__)

#: How long a deleted socket waits for a kubelet.sock creation that would explain it (see control()).
SETTLE_S = 0.1


class StartupError(Exception):
    """nvdp cannot start serving (bad config, NVML unavailable with failOnInitError, invalid MIG layout)."""


@dataclass(frozen=True, slots=True)
class Command:
    #: "reload" | "kubelet-started" | "socket-deleted" | "config"
    kind: str
    detail: str = ""
    update: ConfigUpdate | None = None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Per-node config selection (docs/node-config.md): where named configs come from and how to choose one, the
    API access for the node label, ConfigMap and Events, and how a chosen config becomes settings."""

    sources: ConfigSources | None
    api: ApiConfig | None
    #: (parsed config or None for built-in defaults, source for messages) -> settings, with flags and env on top.
    make_settings: Callable[[Config | None, str], Settings]


@dataclass(frozen=True, slots=True)
class NvmlSession:
    host_root: Path
    driver_root: Path


@contextlib.asynccontextmanager
async def open_nvml(settings: Settings) -> AsyncIterator[NvmlSession | None]:
    """Start NVML (through the simulated node's fake library with --simulate). Yields None when NVML cannot start
    and `failOnInitError` is false: the caller then serves nothing and waits, as upstream does."""
    with contextlib.ExitStack() as stack:
        host_root, driver_root = Path("/"), settings.driver_root
        if settings.simulate is not None:
            from nvdp import sim  # only the simulation needs a C compiler

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdp-sim-")))
            try:
                node = sim.load_node(settings.simulate)
                handle = await trio.to_thread.run_sync(sim.activate, node, workdir)
            except (sim.SimNodeError, sim.SimBuildError) as exc:
                raise StartupError(str(exc)) from None
            host_root = driver_root = handle.host_root
            log.info("simulating the GPU node described by %s", settings.simulate)
        try:
            await trio.to_thread.run_sync(nvml.init)
        except nvml.NvmlError as exc:
            message = f"failed to initialize NVML: {exc}"
            if settings.fail_on_init_error:
                raise StartupError(
                    f"{message}. If this is not a GPU node, set failOnInitError=false (--fail-on-init-error=false) "
                    "to have nvdp wait instead of exiting.") from None
            log.error("%s; failOnInitError is false, so nvdp serves no devices and waits", message)
            yield None
            return
        try:
            yield NvmlSession(host_root, driver_root)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(nvml.shutdown)


def serving_contexts(plan: Plan, inventory: NodeInventory, settings: Settings) -> list[ServingContext]:
    options = AllocateOptions(
        device_list_strategy=settings.device_list_strategy,
        device_id_strategy=settings.device_id_strategy,
        pass_device_specs=settings.pass_device_specs,
        dev_root=str(settings.dev_root),
        control_devices=inventory.control_devices,
        gdrcopy_enabled=settings.gdrcopy_enabled,
        gds_enabled=settings.gds_enabled,
        mofed_enabled=settings.mofed_enabled,
    )
    return [ServingContext(r, options, inventory, settings.shared_devices_allocation_policy) for r in plan.resources]


def describe_plan(plan: Plan) -> str:
    if not plan.resources:
        return "no devices found"
    return ", ".join(f"{r.name}: {len(r.devices)}" for r in plan.resources)


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
    daemon = Daemon(settings, reload_settings, search_path, metrics or Metrics(), probes or ProbeState(), node_config)
    try:
        return await daemon.run(handle_signals, notify_socket, task_status)
    except BaseExceptionGroup as group:
        # Nurseries wrap errors in groups; a start-up failure alone is reported as itself.
        startup, rest = group.split(StartupError)
        if startup is not None and rest is None:
            raise _first_leaf(startup) from None
        raise


def _first_leaf(group: BaseExceptionGroup[StartupError]) -> StartupError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, StartupError)
    return leaf


class Daemon:
    """The supervisor tree (module docstring) and what its controller owns: plan, servers, MPS daemons, health."""

    def __init__(
        self, settings: Settings, reload_settings: Callable[[], Settings] | None, search_path: str,
        metrics: Metrics, probes: ProbeState, node_config: NodeConfig | None = None,
    ) -> None:
        self.settings = settings
        self._reload_settings = reload_settings
        self.node_config = node_config
        #: The last config chosen by the node-config sources (None without them).
        self.update: ConfigUpdate | None = None
        self.events: EventRecorder | None = None
        #: GPU UUID -> (reason, number of advertised devices) for GPUs with Unhealthy devices; for Node Events.
        self._unhealthy_gpus: dict[str, tuple[str, int]] = {}
        self.metrics = metrics
        self.probes = probes
        if settings.simulate is not None:
            # The simulated node brings a fake nvidia-cuda-mps-control beside its fake libnvidia-ml.
            search_path = f"{Path(__file__).parent / 'sim'}{os.pathsep}{search_path}"
        self.search_path = search_path
        self.tracker = _CountingTracker.for_settings(settings, metrics)
        self.generation = 0
        self.mps: MpsDaemons | None = None
        self.mps_down: set[str] = set()
        #: Processes started per MPS daemon as last seen answering (to count restarts for /metrics).
        self._mps_starts: dict[str, int] = {}
        self._health_scope: trio.CancelScope | None = None
        self._health_gpus: tuple[str, ...] = ()

    def __repr__(self) -> str:
        plan = describe_plan(self.plan) if hasattr(self, "plan") else "starting"
        return f"<Daemon generation={self.generation} {plan} {self.tracker!r} {self.mps!r}>"

    async def run(
        self, handle_signals: bool, notify_socket: str | None, task_status: trio.TaskStatus[ResourceServers | None]
    ) -> int:
        settings = self.settings
        async with contextlib.AsyncExitStack() as root_stack, trio.open_nursery() as root:
            send, receive = trio.open_memory_channel[Command](16)
            if handle_signals:
                # First of all, so that a SIGTERM during start-up also ends in an orderly exit 0.
                await root.start(watch_signals, root.cancel_scope, send)
            # /metrics, /healthz, /readyz: up during start-up too, so probes see why nvdp is not ready yet.
            try:
                await root.start(serve_http, settings.metrics_address, self.metrics, self.probes)
            except* OSError as group:
                # serve_tcp reports a failed bind from inside its own nursery, hence the group.
                exc = group.exceptions[0]
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise StartupError(f"cannot serve metrics and probes on {settings.metrics_address!r}: {reason}; "
                                   "choose another --metrics-address (METRICS_ADDRESS) or an empty one to disable "
                                   "the endpoint") from None
            client = None
            if self.node_config is not None and self.node_config.api is not None:
                from nvdp.k8s.client import open_client
                from nvdp.observe.events import EventRecorder

                client = await root_stack.enter_async_context(open_client(self.node_config.api))
                sources = self.node_config.sources
                node_name = settings.node_name or (sources.node_name if sources is not None else None)
                if node_name:
                    # Node Events: rate-limited, posted by their own task, never blocking the controller.
                    self.events = EventRecorder(node_name, metrics=self.metrics)
                    root.start_soon(self.events.serve, client)
            if self.node_config is not None and self.node_config.sources is not None:
                # The node-label / config-directory watch: its first choice decides the settings NVML starts with.
                try:
                    self.update = await root.start(self._watch_config, self.node_config.sources, client, send)
                    settings = self.settings = self._settings_for(self.update)
                except* ConfigError as group:
                    raise StartupError(str(group.exceptions[0])) from None
                self._report(self.update)
            async with open_asyncio_thread() as host, open_nvml(settings) as session, \
                    trio.open_nursery() as nursery:
                if session is None:
                    self.probes.set_pending(["NVML is not available (failOnInitError=false)"])
                    task_status.started(None)
                    await trio.sleep_forever()
                self.session = session
                self.inventory = await discover(session)
                plugin_dir = settings.plugin_dir or Path(tempfile.gettempdir())
                # MPS daemons outlive the servers: their nursery is outside the servers', so on the way out the
                # servers stop first and the daemons (and compute modes) after them.
                async with trio.open_nursery() as mps_nursery, trio.open_nursery() as servers_nursery:
                    self._nursery, self._mps_nursery = nursery, mps_nursery
                    try:
                        self.plan = build_plan(self.inventory, settings)
                        await self.prepare_mps(settings, self.plan)
                    except (PlanError, MpsError, ShmError) as exc:
                        raise StartupError(str(exc)) from None
                    self.servers = ResourceServers(
                        servers_nursery, host, plugin_dir, settings.kubelet_socket, observer=self.metrics,
                        on_change=self._servers_changed)
                    if settings.kubelet_socket is not None:
                        # Feeds "kubelet-started"/"socket-deleted" to the controller.
                        nursery.start_soon(watch_kubelet, settings.kubelet_socket, send)
                    # Feeds NVML health events to the tracker; restarted by start_health() if the GPUs change.
                    await self.start_health()
                    await self.apply(settings, self.inventory, self.plan, started=trio.current_time())
                    # Waits for every registration, then tells systemd and the embedding caller.
                    nursery.start_soon(report_ready, self.servers, notify_socket, task_status)
                    # The controller: the only code that changes servers, MPS daemons and plans after start-up.
                    await self.control(receive)
            root.cancel_scope.cancel()
        return 0

    # -- health ----------------------------------------------------------------------------------------------------

    def publish_health(self) -> None:
        """Recompute which advertised devices are Unhealthy (XIDs, NVML, MPS daemons) and send that out."""
        devices = [d for r in self.plan.resources for d in r.devices]
        unhealthy = self.tracker.unhealthy(devices)
        if self.mps_down:
            for device in devices:
                if device.mps is not None and device.gpu_uuid in self.mps_down:
                    unhealthy.setdefault(device.id, "MPS control daemon not answering")
        self.servers.publish_health(unhealthy)
        self.metrics.health_changed(self.plan, unhealthy)
        self.probes.nvml_ok = self.tracker.fault(ALL_GPUS) is None
        self._report_health_events(devices, unhealthy)

    def _report_health_events(self, devices: list[Device], unhealthy: Mapping[str, str]) -> None:
        """One Node Event per physical GPU that turns Unhealthy or recovers (not one per replica: a GPU cut into
        48 slices would otherwise flood the API server)."""
        by_gpu: dict[str, tuple[str, int]] = {}
        for device in devices:
            reason = unhealthy.get(device.id)
            if reason is not None:
                _, count = by_gpu.get(device.gpu_uuid, (reason, 0))
                by_gpu[device.gpu_uuid] = (reason, count + 1)
        previous, self._unhealthy_gpus = self._unhealthy_gpus, by_gpu
        if self.events is None:
            return
        for gpu_uuid, (reason, count) in by_gpu.items():
            if gpu_uuid not in previous:
                self.events.device_unhealthy(gpu_uuid, f"{reason} ({count} advertised device(s))")
        for gpu_uuid in previous.keys() - by_gpu.keys():
            self.events.device_recovered(gpu_uuid)

    async def start_health(self) -> None:
        """(Re)start the NVML health watch for the node's physical GPUs; a no-op when they have not changed."""
        gpus = tuple(g.uuid for g in sorted(self.inventory.gpus, key=lambda g: g.index))
        if gpus == self._health_gpus and self._health_scope is not None:
            return
        if self._health_scope is not None:
            self._health_scope.cancel()
        self._health_gpus = gpus
        self._health_scope = await self._nursery.start(self._watch_health, gpus)

    async def _watch_health(self, gpus: tuple[str, ...], *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            await watch_nvml_health(gpus, self.tracker, self.publish_health,
                                    task_status=_started_with(task_status, scope))

    def _mps_health(self, gpu_uuid: str, healthy: bool) -> None:
        running = self.mps.running.get(gpu_uuid) if self.mps is not None else None
        if healthy:
            self.mps_down.discard(gpu_uuid)
            if running is not None and running.state.starts > self._mps_starts.get(gpu_uuid, 1):
                # Answering again after a new process started: that was a restart.
                self.metrics.mps_restart(gpu_uuid)
            if running is not None:
                self._mps_starts[gpu_uuid] = running.state.starts
        else:
            self.mps_down.add(gpu_uuid)
        self.metrics.mps_daemon(gpu_uuid, healthy, running.state.last_probe_s if running is not None else None)
        self.publish_health()

    def _mps_probe(self, gpu_uuid: str, seconds: float) -> None:
        self.metrics.mps_daemon(gpu_uuid, gpu_uuid not in self.mps_down, seconds)

    def _servers_changed(self) -> None:
        # Against the plan, not the running servers: between stopping old servers and starting new ones nothing
        # runs, and that must not read as "everything registered".
        running = self.servers.running
        self.probes.set_pending([r.name for r in self.plan.resources
                                 if r.name not in running or not running[r.name].registered.is_set()])

    # -- plans -----------------------------------------------------------------------------------------------------

    async def prepare_mps(self, settings: Settings, plan: Plan) -> None:
        """What MPS needs before any server changes: the control program and the clients' shm tmpfs."""
        if not plan.mps_daemons:
            return
        control = find_control_binary(settings.driver_root, self.search_path)
        shm = Path(settings.mps_root) / "shm"
        if settings.simulate is not None:
            # A simulated node has no clients to share memory with: a plain directory stands in for the tmpfs.
            await trio.Path(shm).mkdir(parents=True, exist_ok=True)
        else:
            await trio.to_thread.run_sync(ensure_shm, shm, settings.mps_shm_size)
        host = settings.mps_host_socket  # h2-mps: the daemons are nvdp mps-host's, else nvdp's own (local)
        if self.mps is None or self.mps.control != control or getattr(self.mps.launcher, "socket_path", None) != host:
            if self.mps is not None:
                await self.mps.stop_all()
            self.mps = MpsDaemons(self._mps_nursery, control, NvmlComputeMode(), self._mps_health,
                                  on_probe=self._mps_probe, path_env=self.search_path,
                                  launcher=HostLauncher(host) if host is not None else None)

    async def apply(self, settings: Settings, inventory: NodeInventory, plan: Plan, started: float) -> None:
        """Make the running servers and MPS daemons match `plan`: stop what is gone or changed, then start what is
        new. Servers of MPS resources start only after their daemons answer."""
        if settings.config.resources:
            # Upstream parses this section (renaming patterns) and ignores it with a warning; so do we.
            log.warning("the config's `resources` section is ignored (as upstream does); rename shared "
                        "resources with sharing.*.resources[].rename instead")
        contexts = serving_contexts(plan, inventory, settings)
        self.settings, self.inventory, self.plan = settings, inventory, plan
        await self.servers.stop_unwanted(contexts)
        if self.mps is not None:
            try:
                await self.mps.apply(plan.mps_daemons)
            except MpsError as exc:
                log.error("MPS: %s; the affected slices stay Unhealthy until their daemon answers", exc)
        # Servers start with the current health snapshot, so a new server never advertises a faulty GPU as Healthy.
        self.publish_health()
        await self.servers.start_missing(contexts)
        self.generation += 1
        self.metrics.plan_applied(plan, inventory, self.config_name, self.generation, trio.current_time() - started)
        log.info("serving (generation %d): %s", self.generation, describe_plan(plan))
        if self.events is not None:
            self.events.config_applied(self.config_name, self.generation, describe_plan(plan))
        await self.write_labels(settings, inventory, plan)
        if not plan.resources:
            log.warning("No devices found. Waiting indefinitely.")

    async def write_labels(self, settings: Settings, inventory: NodeInventory, plan: Plan) -> None:
        """The sharing labels upstream's GFD would write, as an NFD local feature file (when NFD's directory is
        there: nvdp does not create it on hosts without node-feature-discovery)."""
        path = settings.nfd_features_file
        if path is None:
            return
        if not await trio.Path(path.parent).is_dir():
            log.debug("no node-feature-discovery directory %s: sharing labels not written", path.parent)
            return
        try:
            await trio.to_thread.run_sync(write_features_file, path, sharing_labels(plan, inventory))
        except OSError as exc:
            log.warning("cannot write the sharing labels to %s: %s", path, exc.strerror or exc)

    @property
    def config_name(self) -> str:
        if self.update is not None:
            return self.update.name or "built-in defaults"
        return str(self.settings.config_file) if self.settings.config_file else "built-in defaults"

    async def reload(self, settings: Settings) -> bool:
        """Re-read the node and build the new plan *before* anything stops; on error keep serving as before."""
        started = trio.current_time()
        try:
            inventory = await discover(self.session)
            plan = build_plan(inventory, settings)
            await self.prepare_mps(settings, plan)
        except (ConfigError, PlanError, MpsError, ShmError, nvml.NvmlError) as exc:
            self.reject(exc)
            return False
        await self.apply(settings, inventory, plan, started)
        await self.start_health()
        return True

    def reject(self, exc: Exception) -> None:
        log.error("config rejected: %s; keeping the running config", exc)
        self.metrics.reload_failed(self.config_name, str(exc))
        if self.events is not None:
            self.events.config_rejected(self.config_name, str(exc))

    # -- per-node config -------------------------------------------------------------------------------------------

    async def _watch_config(
        self, sources: ConfigSources, client: ApiClient | None, send: trio.MemorySendChannel[Command], *,
        task_status: trio.TaskStatus[ConfigUpdate],
    ) -> None:
        from nvdp.node_config import watch_config

        async with watch_config(sources, client) as updates:
            task_status.started(await updates.receive())
            async for update in updates:
                await send.send(Command("config", update=update))

    def _settings_for(self, update: ConfigUpdate) -> Settings:
        assert self.node_config is not None
        config = parse_config(update.text, update.source) if update.text.strip() else None
        return self.node_config.make_settings(config, update.source)

    def _report(self, update: ConfigUpdate) -> None:
        log.info("config: %s (%s)", update.name or "built-in defaults", update.reason)
        if update.problem:
            log.warning("config: %s", update.problem)
        if update.unknown_label is not None:
            self.metrics.config_label_unknown(update.unknown_label)
            if self.events is not None:
                self.events.config_label_unknown(update.unknown_label, update.name or "built-in defaults")

    async def apply_update(self, update: ConfigUpdate) -> None:
        self._report(update)
        if not update.changed:
            return
        previous, self.update = self.update, update
        try:
            settings = self._settings_for(update)
        except ConfigError as exc:
            self.update = previous
            self.reject(exc)
            return
        if not await self.reload(settings):
            self.update = previous

    async def control(self, receive: trio.MemoryReceiveChannel[Command]) -> None:
        """Apply commands one at a time, so restarts and reloads never interleave."""
        servers = self.servers
        async for command in receive:
            batch = [command]
            if command.kind == "socket-deleted":
                # A restarting kubelet deletes our sockets just before it creates kubelet.sock again: wait a
                # moment so that one restart of everything answers both, instead of restarting a server twice.
                with trio.move_on_after(SETTLE_S):
                    async for more in receive:
                        batch.append(more)
                        if more.kind == "kubelet-started":
                            break
            kinds = {c.kind for c in batch}
            if "kubelet-started" in kinds:
                log.info("kubelet socket created: restarting every server and registering again")
                self.metrics.kubelet_restart()
                await servers.restart_all()
            else:
                for deleted in (c.detail for c in batch if c.kind == "socket-deleted"):
                    name = servers.resource_for_socket(deleted)
                    if name is not None and not await trio.Path(servers.plugin_dir / deleted).exists():
                        log.warning("socket %s of %s was removed: restarting that server", deleted, name)
                        await servers.restart(name)
            for update in (c.update for c in batch if c.kind == "config" and c.update is not None):
                await self.apply_update(update)
            if "reload" in kinds and self.update is not None:
                # SIGHUP with per-node configs: apply the chosen config again (its content is re-parsed).
                assert self.node_config is not None
                try:
                    settings = self._settings_for(self.update)
                except ConfigError as exc:
                    self.reject(exc)
                    continue
                await self.reload(settings)
            elif "reload" in kinds:
                if self._reload_settings is None:
                    log.info("reload requested; nothing to reload (no config file)")
                    continue
                try:
                    settings = self._reload_settings()
                except ConfigError as exc:
                    self.reject(exc)
                    continue
                await self.reload(settings)


class _CountingTracker(HealthTracker):
    """The health tracker, also counting every XID per GPU and code for /metrics."""

    metrics: Metrics

    @classmethod
    def for_settings(cls, settings: Settings, metrics: Metrics) -> _CountingTracker:
        policy = XidPolicy.from_env(settings.disable_healthchecks, settings.enable_healthchecks)
        for warning in policy.warnings:
            log.warning("%s", warning)
        log.info("health checks: %s; Unhealthy GPUs are probed again after %.0f s of quiet", policy.describe(),
                 settings.health_quiet_period)
        tracker = cls(policy, quiet_period_s=settings.health_quiet_period)
        tracker.metrics = metrics
        return tracker

    def on_xid(self, event: XidEvent, now: float) -> bool:
        self.metrics.xid(event.gpu_uuid, event.xid)
        return super().on_xid(event, now)


def _started_with(
    task_status: trio.TaskStatus[trio.CancelScope], scope: trio.CancelScope
) -> trio.TaskStatus[None]:
    """Adapts a TaskStatus so that a child's started() reports `scope` to our caller."""

    class _Status:
        def started(self, value: None = None) -> None:
            task_status.started(scope)

    return _Status()  # type: ignore[return-value]


async def report_ready(
    servers: ResourceServers, notify_socket: str | None, task_status: trio.TaskStatus[ResourceServers | None]
) -> None:
    await servers.wait_all_registered()
    log.info("ready: every resource is registered with the kubelet")
    sd_notify(notify_socket, "READY=1")
    task_status.started(servers)


async def discover(session: NvmlSession) -> NodeInventory:
    inventory = await trio.to_thread.run_sync(nvml.read_inventory, session.host_root, session.driver_root)
    log.info("driver %s, CUDA %s, %d GPU(s)", inventory.driver_version, inventory.cuda_driver_version,
             len(inventory.gpus))
    for gpu in inventory.gpus:
        log.debug("GPU %d: %s %s, %d MiB, minor %d, NUMA %s%s", gpu.index, gpu.name, gpu.uuid, gpu.memory_mib,
                  gpu.minor, gpu.numa_node, ", MIG enabled" if gpu.mig_enabled else "")
    return inventory


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
                await send.send(Command("reload"))
            else:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                scope.cancel()
                return


async def watch_kubelet(kubelet_socket: Path, send: trio.MemorySendChannel[Command]) -> None:
    async for event in watch_plugin_dir(kubelet_socket):
        if event.kind == "kubelet-started":
            await send.send(Command("kubelet-started", event.name))
        else:
            await send.send(Command("socket-deleted", event.name))

