"""The controller: the only code that changes the plan, the resource servers, the MPS daemons and the health watch.

It takes typed commands (`Reload`, `KubeletStarted`, `SocketDeleted`, `ConfigChosen`) from one channel and applies
them one at a time, so restarts and reloads never interleave. Every change goes the same way: build the new plan
and check it *before* anything stops (a bad config never costs the running one), then let each supervisor
reconcile its children with it. A command that fails unexpectedly is logged and reported; the controller goes on
with the next one and the running plan keeps serving.

`HealthPublisher` recomputes which advertised devices are Unhealthy (XIDs and NVML errors from the tracker, MPS
daemons that do not answer) and sends one snapshot to the servers and the observer.

Everything the controller reports goes through `DaemonObserver` (implemented by `nvdp.observe.reporter.Observer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from nvdp.core.cdi.names import IMEX_CLASS, classes_without_spec
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import ConfigWarning
from nvdp.core.config.schema import Config
from nvdp.core.config.settings import Settings
from nvdp.core.health import ALL_GPUS, HealthTracker, XidPolicy
from nvdp.core.health.events import XidEvent
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan import imex
from nvdp.core.plan.allocate import AllocateOptions
from nvdp.core.plan.build import PlanError, build_plan
from nvdp.core.plan.model import Plan
from nvdp.kubelet.aio import AsyncioThread
from nvdp.kubelet.plugin_server import ServingContext
from nvdp.kubelet.servers import ResourceServers
from nvdp.mps.errors import MpsError, ShmError
from nvdp.nvml import adapter as nvml
from nvdp.nvml.health import watch_nvml_health
from nvdp.supervise import SupervisionReporter, Supervisor, Task

if TYPE_CHECKING:
    from nvdp.core.cdi.build import DevicePluginSpecs
    from nvdp.dra.prepare import MpsProvider
    from nvdp.dra.service import DraMetrics, DraService, ShareObserver
    from nvdp.gfd import LabelPublisher
    from nvdp.k8s.client import ApiClient, ApiConfig
    from nvdp.mps import MpsDaemons
    from nvdp.mps.control_daemon import DaemonTimings
    from nvdp.node_config import ConfigSources, ConfigUpdate

log = logging.getLogger(__name__)

#: How long a deleted socket waits for a kubelet.sock creation that would explain it (see `Controller.run`).
SETTLE_S = 0.1


# -- commands ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reload:
    """SIGHUP: read the config again and apply it."""


@dataclass(frozen=True, slots=True)
class KubeletStarted:
    """kubelet.sock was created: the kubelet (re)started and forgot every registration."""


@dataclass(frozen=True, slots=True)
class SocketDeleted:
    """A socket in the plugin directory was deleted (ours, perhaps)."""

    name: str


@dataclass(frozen=True, slots=True)
class ConfigChosen:
    """The node-config watch chose a config (node label, config directory, ConfigMap)."""

    update: ConfigUpdate


Command = Reload | KubeletStarted | SocketDeleted | ConfigChosen


# -- what the controller reports -----------------------------------------------------------------------------------


class DaemonObserver(Protocol):
    """Everything the controller tells the outside world besides the kubelet (`nvdp.observe.reporter.Observer`)."""

    def plan_applied(
        self, plan: Plan, inventory: NodeInventory, config_name: str, generation: int, seconds: float, summary: str
    ) -> None: ...

    def plan_rejected(self, config_name: str, error: str) -> None: ...

    def config_warnings(self, config_name: str, warnings: Sequence[ConfigWarning]) -> None: ...

    def config_blocked(self, config_name: str, error: str) -> None: ...

    def label_unknown(self, value: str, fallback: str) -> None: ...

    def registration_pending(self, pending: Sequence[str]) -> None: ...

    def kubelet_restarted(self) -> None: ...

    def xid(self, gpu_uuid: str, xid: int, critical: bool) -> None: ...

    def health_changed(self, plan: Plan, unhealthy: Mapping[str, str], nvml_ok: bool) -> None: ...

    def mps_daemon(self, gpu_uuid: str, up: bool, probe_seconds: float | None) -> None: ...

    def mps_restarted(self, gpu_uuid: str) -> None: ...


# -- small pure helpers --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Per-node config selection (docs/node-config.md): where named configs come from and how to choose one, the
    API access for the node label, ConfigMap and Events, and how a chosen config becomes settings."""

    sources: ConfigSources | None
    api: ApiConfig | None
    #: (parsed config or None for built-in defaults, source for messages) -> settings, with flags and env on top.
    make_settings: Callable[[Config | None, str], Settings]

    async def settings_for(self, update: ConfigUpdate) -> Settings:
        """Parsed off the event loop, bounded in size and time: a 1 MiB config must not stall the probes."""
        from nvdp.node_config.sources import parse_config_off_loop

        config = await parse_config_off_loop(update.text, update.source) if update.text.strip() else None
        return self.make_settings(config, update.source)


def serving_contexts(plan: Plan, inventory: NodeInventory, settings: Settings,
                     cdi_classes_without_spec: tuple[str, ...] = ()) -> list[ServingContext]:
    options = AllocateOptions(
        device_list_strategy=settings.device_list_strategy,
        device_id_strategy=settings.device_id_strategy,
        pass_device_specs=settings.pass_device_specs,
        dev_root=str(settings.dev_root),
        control_devices=inventory.control_devices,
        gdrcopy_enabled=settings.gdrcopy_enabled,
        gds_enabled=settings.gds_enabled,
        mofed_enabled=settings.mofed_enabled,
        cdi_annotation_prefix=settings.cdi_annotation_prefix,
        imex_channels=imex.select_imex_channels(inventory, settings),
        cdi_classes_without_spec=cdi_classes_without_spec,
    )
    return [ServingContext(r, options, inventory, settings.shared_devices_allocation_policy) for r in plan.resources]


def describe_plan(plan: Plan) -> str:
    if not plan.resources:
        return "no devices found"
    return ", ".join(f"{r.name}: {len(r.devices)}" for r in plan.resources)


def report_config(update: ConfigUpdate, observer: DaemonObserver) -> None:
    """The one place a config decision is logged and reported (the node-config watch only says what its sources
    saw)."""
    log.info("config: %s (%s)", update.name or "built-in defaults", update.reason)
    if update.problem:
        log.warning("config: %s", update.problem)
    if update.unknown_label is not None:
        observer.label_unknown(update.unknown_label, update.name or "built-in defaults")


def probe_timings(settings: Settings) -> dict[str, DaemonTimings]:
    """`timings=` for `MpsDaemons` from `--mps-probe-timeout` and `--mps-probe-failures`; nothing when both are at
    their defaults, so that the daemons' own defaults (or a test's) apply. Read when the daemons are first set up:
    changing them takes a restart."""
    from nvdp.mps.control_daemon import DEFAULT_TIMINGS

    timings = replace(DEFAULT_TIMINGS, probe_timeout_s=settings.mps_probe_timeout,
                      probe_failures=settings.mps_probe_failures)
    return {} if timings == DEFAULT_TIMINGS else {"timings": timings}


class CountingTracker(HealthTracker):
    """The health tracker, also reporting every XID per GPU and code, critical under the health policy or not."""

    observer: DaemonObserver

    @classmethod
    def for_settings(cls, settings: Settings, observer: DaemonObserver) -> CountingTracker:
        policy = XidPolicy.from_env(settings.disable_healthchecks, settings.enable_healthchecks)
        for warning in policy.warnings:
            log.warning("%s", warning)
        log.info("health checks: %s; Unhealthy GPUs are probed again after %.0f s of quiet", policy.describe(),
                 settings.health_quiet_period)
        tracker = cls(policy, quiet_period_s=settings.health_quiet_period)
        tracker.observer = observer
        return tracker

    def on_xid(self, event: XidEvent, now: float) -> bool:
        self.observer.xid(event.gpu_uuid, event.xid, self.is_critical(event))
        return super().on_xid(event, now)


# -- health --------------------------------------------------------------------------------------------------------


class HealthPublisher:
    """Which advertised devices are Unhealthy now, sent to the servers and the observer on every change."""

    def __init__(self, tracker: HealthTracker, observer: DaemonObserver) -> None:
        self.tracker = tracker
        self.observer = observer
        #: GPUs whose MPS control daemon does not answer.
        self.mps_down: set[str] = set()
        self.plan = Plan(resources=())
        self.servers: ResourceServers | None = None
        #: The GFD label child, told of every health change (None: labels are not published).
        self.labels: LabelPublisher | None = None
        #: Also told of every health change (the DRA service: its taints and health stream).
        self.listeners: list[Callable[[], None]] = []

    def publish(self) -> None:
        devices = [d for r in self.plan.resources for d in r.devices]
        unhealthy = self.tracker.unhealthy(devices)
        if self.mps_down:
            for device in devices:
                if device.mps is not None and device.gpu_uuid in self.mps_down:
                    unhealthy.setdefault(device.id, "MPS control daemon not answering")
        if self.servers is not None:
            self.servers.publish_health(unhealthy)
        for listener in self.listeners:
            listener()
        self.observer.health_changed(self.plan, unhealthy, self.tracker.fault(ALL_GPUS) is None)
        if self.labels is not None:
            self.labels.nudge()


# -- the controller ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NvmlSession:
    host_root: Path
    driver_root: Path
    #: Where the host's device nodes are seen besides `host_root` (IMEX channels); None: nowhere else.
    dev_root: Path | None = None


async def discover(session: NvmlSession) -> NodeInventory:
    inventory = await trio.to_thread.run_sync(nvml.read_inventory, session.host_root, session.driver_root,
                                              session.dev_root)
    log.info("driver %s, CUDA %s, %d GPU(s)", inventory.driver_version, inventory.cuda_driver_version,
             len(inventory.gpus))
    for gpu in inventory.gpus:
        log.debug("GPU %d: %s %s, %d MiB, minor %d, NUMA %s%s", gpu.index, gpu.name, gpu.uuid, gpu.memory_mib,
                  gpu.minor, gpu.numa_node, ", MIG enabled" if gpu.mig_enabled else "")
    return inventory


class Controller:
    """Owns the plan and applies commands to the supervisors (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: NvmlSession,
        observer: DaemonObserver,
        health: HealthPublisher,
        reporter: SupervisionReporter | None = None,
        tasks: Supervisor[str, Task],
        mps_nursery: trio.Nursery,
        search_path: str,
        reload_settings: Callable[[], Settings] | None,
        node_config: NodeConfig | None,
        update: ConfigUpdate | None,
    ) -> None:
        self.settings = settings
        self.session = session
        self.observer = observer
        #: Where the MPS daemons' supervisor reports (the same Observer as every supervisor's).
        self.reporter = reporter
        self.health = health
        self.tasks = tasks
        self._mps_nursery = mps_nursery
        self.search_path = search_path
        self._reload_settings = reload_settings
        self.node_config = node_config
        #: The last config chosen by the node-config sources (None without them).
        self.update = update
        self.generation = 0
        self.inventory = NodeInventory(driver_version="", cuda_driver_version=0, gpus=())
        self.plan = Plan(resources=())
        self.servers: ResourceServers | None = None
        self.mps: MpsDaemons | None = None
        #: The DRA kubelet plugin (None with DRA off), and what it needs from the tree (`attach_dra`).
        self.dra: DraService | None = None
        self.dra_client: ApiClient | None = None
        self.dra_host: AsyncioThread | None = None
        self.dra_metrics: DraMetrics | None = None
        self.dra_observer: ShareObserver | None = None
        #: The process of each MPS daemon last seen answering (a new one answering is a restart, for /metrics).
        self._mps_pids: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Controller generation={self.generation} {describe_plan(self.plan)} {self.mps!r}>"

    @property
    def config_name(self) -> str:
        if self.update is not None:
            return self.update.name or "built-in defaults"
        return str(self.settings.config_file) if self.settings.config_file else "built-in defaults"

    # -- start-up --------------------------------------------------------------------------------------------------

    async def first_plan(self) -> tuple[NodeInventory, Plan]:
        """The node and the plan nvdp starts with; their errors are start-up errors (the caller decides)."""
        inventory = await discover(self.session)
        plan = build_plan(inventory, self.settings)
        await self.prepare_mps(self.settings, plan)
        return inventory, plan

    def attach(self, servers: ResourceServers) -> None:
        self.servers = servers
        self.health.servers = servers

    # -- applying plans ----------------------------------------------------------------------------------------------

    async def prepare_mps(self, settings: Settings, plan: Plan) -> None:
        """What MPS needs before any server changes: the control program and the clients' shm tmpfs."""
        if not plan.mps_daemons:
            return
        # Imported here, the first time a plan shares a GPU through MPS: start-up on other nodes skips them.
        from nvdp.mps import HostLauncher, MpsDaemons, NvmlComputeMode, find_control_binary

        control = find_control_binary(settings.driver_root, self.search_path)
        await self.ensure_mps_shm(settings)
        # Who owns the daemons: `nvdp mps-host` when configured (they outlive nvdp's pod or unit), else nvdp itself.
        host = settings.mps_host_socket
        if self.mps is None or self.mps.control != control or getattr(self.mps.launcher, "socket_path", None) != host:
            if self.mps is not None:
                await self.mps.stop_all()
            self.mps = MpsDaemons(self._mps_nursery, control, NvmlComputeMode(), self._mps_health,
                                  on_probe=self._mps_probe, path_env=self.search_path,
                                  launcher=HostLauncher(host) if host is not None else None,
                                  reporter=self.reporter, **probe_timings(settings))

    async def ensure_mps_shm(self, settings: Settings) -> None:
        """The MPS clients' shm tmpfs, `<mps root>/shm`. Raises `ShmError`."""
        shm = Path(settings.mps_root) / "shm"
        if settings.simulate is not None:
            # A simulated node has no clients to share memory with: a plain directory stands in for the tmpfs.
            await trio.Path(shm).mkdir(parents=True, exist_ok=True)
        else:
            from nvdp.mps.shm import ensure_shm

            await trio.to_thread.run_sync(ensure_shm, shm, settings.mps_shm_size)

    async def release_mps(self) -> None:
        """nvdp is ending: the MPS daemons it owns are removed (the device plugin's and DRA's), the MPS host's are
        left running."""
        if self.mps is not None:
            await self.mps.release()
        if self.dra is not None:
            await self.dra.release_mps()

    async def apply(self, settings: Settings, inventory: NodeInventory, plan: Plan, started: float) -> None:
        """Make the running servers, MPS daemons and health watch match `plan`: stop what is gone or changed, then
        start what is new. Servers of MPS resources start only after their daemons answer."""
        assert self.servers is not None
        cdi_specs = await self.build_cdi(settings, inventory, plan)
        # A class Allocate would name but whose spec was not written (its nodes are missing under the dev root).
        imex_class = (IMEX_CLASS,) if imex.select_imex_channels(inventory, settings) else ()
        wanted = settings.cdi_feature_classes + imex_class
        missing = classes_without_spec(cdi_specs, wanted) if settings.cdi_enabled else ()
        contexts = serving_contexts(plan, inventory, settings, missing)
        self.settings, self.inventory, self.plan = settings, inventory, plan
        await self.servers.stop_unwanted(contexts)
        if self.mps is not None:
            try:
                await self.mps.apply(plan.mps_daemons)
            except MpsError as exc:
                log.error("MPS: %s; the affected slices stay Unhealthy until their daemon answers", exc)
        # Servers start with the current health snapshot, so a new server never advertises a faulty GPU as Healthy.
        # The health watch follows the node's physical GPUs (unchanged GPUs leave it running), and is listening
        # before a new server advertises anything.
        gpus = tuple(g.uuid for g in sorted(inventory.gpus, key=lambda g: g.index))
        await self.tasks.apply({**self.tasks.specs, "nvml-health": Task(self.watch_health, (gpus,))})
        self.health.plan = plan
        self.health.publish()
        await self.apply_dra(settings, inventory, plan)
        # CDI specs before any server advertises: a device on ListAndWatch is already defined for the runtime.
        await self.write_cdi(settings, inventory, plan, cdi_specs)
        await self.servers.start_missing(contexts)
        self.generation += 1
        summary = describe_plan(plan)
        self.observer.plan_applied(plan, inventory, self.config_name, self.generation,
                                   trio.current_time() - started, summary)
        log.info("serving (generation %d): %s", self.generation, summary)
        self.report_warnings(settings)
        self.servers_changed()  # readiness from this plan (it may follow a refused first config)
        if self.health.labels is not None:
            self.health.labels.update(plan, inventory, settings.mig_strategy)
        if not plan.resources:
            log.warning("No devices found. Waiting indefinitely.")

    def attach_dra(self, client: ApiClient | None, host: AsyncioThread, metrics: DraMetrics | None = None,
                   observer: ShareObserver | None = None) -> None:
        """What DRA needs from the tree: the API client (None without API access), grpclib's loop, metrics."""
        self.dra_client, self.dra_host, self.dra_metrics = client, host, metrics
        self.dra_observer = observer

    async def apply_dra(self, settings: Settings, inventory: NodeInventory, plan: Plan) -> None:
        """The DRA kubelet plugin follows the plan (docs/dra.md): started with DRA on, given the plan's DRA GPUs,
        stopped (its slices withdrawn) when DRA goes off or its identity changes."""
        wanted = settings.dra_enabled and self.dra_client is not None and self.dra_host is not None
        if self.dra is None and not settings.dra_enabled:
            return  # nothing of DRA imported on a node that does not use it (start-up time, memory)
        from nvdp.dra.service import PLUGIN_CHILD, SLICES_CHILD, DraIdentity, DraService

        if settings.dra_enabled and not wanted:
            # Only a reload gets here (start-up refuses it): the plan already keeps these GPUs from the device plugin.
            log.error("DRA is enabled but nvdp has no Kubernetes API access: the GPUs chosen for DRA are served by "
                      "neither API until nvdp is restarted with --node-name and API access")
        if self.dra is not None and (not wanted or self.dra.identity != DraIdentity.of(settings)):
            self.dra.withdraw()
            self.health.listeners.remove(self.dra.health_changed)
            await self.tasks.apply({k: v for k, v in self.tasks.specs.items() if k not in (PLUGIN_CHILD, SLICES_CHILD)})
            await self.dra.release_mps()
            self.dra = None
        if not wanted:
            return
        assert self.dra_client is not None and self.dra_host is not None
        if self.dra is None:
            simulated = self.session.driver_root if settings.simulate is not None else None
            self.dra = DraService(settings, self.dra_client, self.dra_host, self.health.tracker,
                                  simulated_root=simulated, path_env=self.search_path, metrics=self.dra_metrics,
                                  observer=self.dra_observer, mps=await self.dra_mps(settings, inventory))
            self.health.listeners.append(self.dra.health_changed)
        await self.dra.apply(settings, inventory, plan)
        await self.tasks.apply({**self.tasks.specs, **self.dra.tasks})

    async def dra_mps(self, settings: Settings, inventory: NodeInventory) -> MpsProvider:
        """The MPS of DRA claims (`nvdp.dra.mps_shares`): control daemons of its own, apart from the device plugin's
        (on other GPUs: the plan splits them), one per GPU for every MPS claim and share on it. Where MPS cannot run
        (no --mps-root, no control program, no shm) a stand-in fails each MPS claim with the reason."""
        from nvdp.dra.mps import MpsUnavailable
        from nvdp.dra.mps_shares import MpsShares
        from nvdp.mps import HostLauncher, MpsDaemons, NvmlComputeMode, find_control_binary

        if not settings.mps_root:
            return MpsUnavailable("MPS needs --mps-root (MPS_ROOT): nvdp has no directory for its control daemons")
        try:
            control = find_control_binary(settings.driver_root, self.search_path)
            await self.ensure_mps_shm(settings)
        except (MpsError, ShmError) as exc:
            log.error("DRA: MPS claims cannot be prepared on this node: %s", exc)
            return MpsUnavailable(f"MPS is not available on this node: {exc}")
        host = settings.mps_host_socket

        def on_health(gpu_uuid: str, healthy: bool) -> None:
            if self.dra is not None:
                self.dra.mps_health(gpu_uuid, healthy)

        daemons = MpsDaemons(self._mps_nursery, control, NvmlComputeMode(), on_health, on_probe=None,
                             path_env=self.search_path,
                             launcher=HostLauncher(host) if host is not None else None, reporter=self.reporter,
                             **probe_timings(settings))
        spec = settings.config.dra.sharing.mps if settings.config.dra and settings.config.dra.sharing else None
        return MpsShares(self._mps_nursery, daemons, inventory.gpus, settings.mps_root,
                         keep_warm_s=spec.checked().keep_warm_s if spec is not None else 0.0)

    async def build_cdi(self, settings: Settings, inventory: NodeInventory, plan: Plan) -> DevicePluginSpecs | None:
        """The CDI specs `plan` needs, scanned and built but not written (None without CDI or when the scan
        failed, logged): Allocate must know which feature classes have no spec before servers answer."""
        if settings.cdi_root is None or not settings.cdi_enabled:
            return None
        from nvdp.cdi.plugin_specs import prepare_device_plugin_specs

        return await prepare_device_plugin_specs(settings, inventory, plan, self._simulated_root(settings))

    async def write_cdi(self, settings: Settings, inventory: NodeInventory, plan: Plan,
                        built: DevicePluginSpecs | None = None) -> None:
        """The device plugin's CDI spec files follow every plan (docs/cdi.md); a failure is logged and serving goes
        on. They stay when nvdp stops: containers created while it restarts still need them."""
        if settings.cdi_root is None:
            return
        from nvdp.cdi.plugin_specs import update_device_plugin_specs

        await update_device_plugin_specs(settings, inventory, plan, self._simulated_root(settings), built)

    def _simulated_root(self, settings: Settings) -> Path | None:
        return self.session.driver_root if settings.simulate is not None else None

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
        return True

    def report_warnings(self, settings: Settings) -> None:
        """Once per config load: each warning (upstream's or the fork's meaning served) in the log, and all of
        them to the observer (a Node Event, the `nvdp_config_warnings` gauge, `nvdp status`)."""
        for warning in settings.config_warnings:
            log.warning("config warning: %s", warning)
        self.observer.config_warnings(self.config_name, settings.config_warnings)

    def serve_nothing(self, settings: Settings, inventory: NodeInventory, exc: Exception) -> None:
        """The first config of a live source (config directory, ConfigMap) is refused: nothing is served, the probes
        say why, and the config watch's next choice (the fixed config) is applied as any change is."""
        self.settings, self.inventory, self.plan = settings, inventory, Plan(resources=())
        log.error("config %s rejected: %s; serving nothing until it is fixed", self.config_name, exc)
        self.observer.config_blocked(self.config_name, str(exc))

    def reject(self, exc: Exception) -> None:
        log.error("config rejected: %s; keeping the running config", exc)
        self.observer.plan_rejected(self.config_name, str(exc))

    # -- MPS daemons' health ----------------------------------------------------------------------------------------

    def _mps_health(self, gpu_uuid: str, healthy: bool) -> None:
        running = self.mps.running.get(gpu_uuid) if self.mps is not None else None
        if healthy:
            self.health.mps_down.discard(gpu_uuid)
            pid = running.state.pid if running is not None else None
            if pid is not None:
                before = self._mps_pids.get(gpu_uuid)
                if before is not None and before != pid:
                    # Answering again from another process (started fresh, or adopted after a restart elsewhere).
                    self.observer.mps_restarted(gpu_uuid)
                self._mps_pids[gpu_uuid] = pid
        else:
            self.health.mps_down.add(gpu_uuid)
        self.observer.mps_daemon(gpu_uuid, healthy, running.state.last_probe_s if running is not None else None)
        self.health.publish()

    def _mps_probe(self, gpu_uuid: str, seconds: float) -> None:
        self.observer.mps_daemon(gpu_uuid, gpu_uuid not in self.health.mps_down, seconds)

    def servers_changed(self) -> None:
        """Readiness follows the plan, not the running servers: between stopping old servers and starting new
        ones nothing runs, and that must not read as "everything registered"."""
        if self.servers is None:
            return
        self.observer.registration_pending(
            [r.name for r in self.plan.resources if not self.servers.is_registered(r.name)])

    # -- per-node config ---------------------------------------------------------------------------------------------

    async def apply_update(self, update: ConfigUpdate) -> None:
        report_config(update, self.observer)
        previous = self.update
        if not update.changed or (previous is not None and (previous.name, previous.text) == (update.name,
                                                                                               update.text)):
            # Also what a restarted config watch sends first: the config being served.
            self.update = update if previous is None else previous
            return
        assert self.node_config is not None
        self.update = update
        try:
            settings = await self.node_config.settings_for(update)
        except ConfigError as exc:
            self.update = previous
            self.reject(exc)
            return
        if not await self.reload(settings):
            self.update = previous

    # -- the command loop ------------------------------------------------------------------------------------------

    async def run(self, receive: trio.MemoryReceiveChannel[Command]) -> None:
        """Apply commands one at a time. A command that fails unexpectedly is logged with its traceback and
        reported as a rejected change; the running plan keeps serving and the next command is applied."""
        async for command in receive:
            batch: list[Command] = [command]
            if isinstance(command, SocketDeleted):
                # A restarting kubelet deletes our sockets just before it creates kubelet.sock again: wait a
                # moment so that one restart of everything answers both, instead of restarting a server twice.
                with trio.move_on_after(SETTLE_S):
                    async for more in receive:
                        batch.append(more)
                        if isinstance(more, KubeletStarted):
                            break
            try:
                await self.handle(batch)
            except Exception as exc:
                log.error("applying %s failed unexpectedly; the running plan keeps serving", batch, exc_info=True)
                self.observer.plan_rejected(self.config_name, f"internal error: {type(exc).__name__}: {exc}")

    async def handle(self, batch: Sequence[Command]) -> None:
        servers = self.servers
        assert servers is not None
        if any(isinstance(c, KubeletStarted) for c in batch):
            log.info("kubelet socket created: restarting every server and registering again")
            self.observer.kubelet_restarted()
            await servers.restart_all()
        else:
            for deleted in (c.name for c in batch if isinstance(c, SocketDeleted)):
                name = servers.resource_for_socket(deleted)
                if name is not None and not await trio.Path(servers.plugin_dir / deleted).exists():
                    log.warning("socket %s of %s was removed: restarting that server", deleted, name)
                    await servers.restart(name)
        for chosen in (c for c in batch if isinstance(c, ConfigChosen)):
            await self.apply_update(chosen.update)
        if any(isinstance(c, Reload) for c in batch):
            await self._reload_requested()

    async def _reload_requested(self) -> None:
        if self.update is not None:
            # SIGHUP with per-node configs: apply the chosen config again (its content is re-parsed).
            assert self.node_config is not None
            try:
                settings = await self.node_config.settings_for(self.update)
            except ConfigError as exc:
                self.reject(exc)
                return
        elif self._reload_settings is None:
            log.info("reload requested; nothing to reload (no config file)")
            return
        else:
            try:
                # The file is read and parsed off the event loop (bounded by the loader itself: 1 MiB, 10 s).
                settings = await trio.to_thread.run_sync(self._reload_settings, abandon_on_cancel=True)
            except ConfigError as exc:
                self.reject(exc)
                return
        await self.reload(settings)

    # -- the health watch (a child of the tasks supervisor) -------------------------------------------------------

    async def watch_health(self, gpus: tuple[str, ...], *, task_status: trio.TaskStatus[None]) -> None:
        """While the watch is down nothing checks the GPUs: they count as Unhealthy (a node-wide fault, which the
        restarted watch clears like any other, after a quiet period and a good probe)."""
        try:
            await watch_nvml_health(gpus, self.health.tracker, self.health.publish, task_status=task_status)
        except Exception as exc:
            reason = f"the NVML health watch failed ({type(exc).__name__}) and is being restarted"
            if self.health.tracker.on_error(None, reason, trio.current_time()):
                self.health.publish()
            raise
