"""DRA in the daemon: the pieces of the DRA kubelet plugin put together, and what the controller tells them.

`DraService` owns, for one driver name on one node:

* the `ClaimPreparer` (`nvdp.dra.prepare`) with the real seams: claims read through the API (`ApiClaimGetter`),
  per-claim CDI specs written with the CDI generator's edits (`ClaimSpecs`), MPS through DRA's own per-GPU control
  daemons (`nvdp.dra.mps_shares`, made by the controller), time slices through nvidia-smi where it is found;
* the kubelet plugin's sockets and gRPC servers (`DraKubeletPlugin`) and the health feed of its stream;
* the ResourceSlice publisher (`SlicePublisher`).

Two of them are long-lived children of the daemon's task supervisor (`tasks`): `dra-plugin` and `dra-slices`,
restarted alone with backoff like every child. The controller calls `apply()` with every plan it applies (which
GPUs go to DRA is the plan's `dra_gpus`) and `health_changed()` whenever the health tracker may have changed (the
devices' ResourceSlice taints and the health stream follow it).

MPS shares (`dra.sharing.mps`, docs/dra.md "MPS shares"): the plan names the share hosts and their policies; their
devices are published with `allowMultipleAllocations` and consumable capacities (`nvdp.core.dra.shares`), and taints
while an XID or a silent control daemon keeps new shares off them; a daemon that does not answer marks its host
Unhealthy on the health stream. A GPU changes between share host and exclusive device only once no claim is prepared
on it (`share_host_transition`): until then it keeps its mode, the log says why, and every unprepare looks again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, cast

import trio

from nvdp.cdi import CdiError
from nvdp.cdi.plugin_specs import load_driver_files
from nvdp.cdi.writer import owned_files, remove_spec, write_spec
from nvdp.core.cdi.build import (
    CLAIM_KIND,
    CLAIM_VENDOR,
    CdiOptions,
    DriverFiles,
    claim_spec,
    claim_spec_filename,
    common_edits,
    gpu_edits,
    mig_edits,
)
from nvdp.core.cdi.spec import ContainerEdits, Mount
from nvdp.core.config.settings import Settings
from nvdp.core.dra import checkpoint as cp
from nvdp.core.dra.claims import DeviceEdits, NodeDevice
from nvdp.core.dra.devices import MAX_TAINTS_PER_DEVICE, DeviceSet, DraDevice, HealthFact, build_devices, pci_bus_id
from nvdp.core.dra.plugin import HealthTarget, health_facts
from nvdp.core.dra.shares import (
    MpsSharesConfig,
    SharePolicy,
    apply_share_overrides,
    share_host_taints,
    share_host_transition,
    share_policy,
    unhealthy_share_hosts,
)
from nvdp.core.dra.types import ClaimRef, PrepareResult, UnprepareResult
from nvdp.core.health.tracker import HealthTracker
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.model import Plan
from nvdp.dra.calls import CallObserver, ClaimCalls
from nvdp.dra.kubelet_plugin import DraHealthFeed, DraKubeletPlugin, DraPluginPaths
from nvdp.dra.mps_shares import MpsShares
from nvdp.dra.prepare import ClaimFetchError, ClaimPreparer, MpsProvider, SideEffectError
from nvdp.dra.publisher import SliceObserver, SlicePublisher
from nvdp.dra.sysfs import pcie_roots
from nvdp.dra.timeslice import NvidiaSmiTimeSlicer, find_nvidia_smi
from nvdp.k8s.client import ApiClient, ApiError, ApiUnreachable
from nvdp.k8s.resourceclaims import ClaimReadError, get_claim
from nvdp.k8s.watch import WatchObserver
from nvdp.kubelet.aio import AsyncioThread
from nvdp.supervise import Task

log = logging.getLogger(__name__)

#: The daemon's task supervisor names the two children so.
PLUGIN_CHILD, SLICES_CHILD = "dra-plugin", "dra-slices"
#: Bound on recovering the checkpoint at start (API reads of unfinished claims included): the plan must go on.
RECOVER_TIMEOUT_S = 30.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CHECKPOINT = "checkpoint.json"
_CLAIM_SPEC_PREFIX = f"{CLAIM_VENDOR}-claim_"


class ShareObserver(Protocol):
    def dra_share_hosts_waiting(self, driver: str, waiting: Mapping[str, str]) -> None:
        """The devices whose move to or from MPS shares waits for their prepared claims (device -> why)."""


class DraMetrics(CallObserver, SliceObserver, WatchObserver, Protocol):
    """Where DRA reports (nvdp.observe.metrics.Metrics)."""


class ApiClaimGetter:
    """`ClaimGetter` over the API client: every failure that is not NotFound becomes `ClaimFetchError`."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    async def get(self, namespace: str, name: str) -> Mapping[str, object] | None:
        try:
            return await get_claim(self.client, namespace, name)
        except (ApiError, ApiUnreachable, ClaimReadError) as exc:
            raise ClaimFetchError(f"cannot read ResourceClaim {namespace}/{name}: {exc}") from None


def _container_edits(extra: DeviceEdits) -> ContainerEdits:
    return ContainerEdits(env=tuple(extra.env), mounts=tuple(
        Mount(host_path=m.host_path, container_path=m.container_path, options=tuple(m.options))
        for m in extra.mounts))


class ClaimSpecs:
    """`ClaimCdi`: one spec file per claim, `<cdi root>/k8s.gpu.nvidia.com-claim_<uid>.json`, kind
    `k8s.gpu.nvidia.com/claim`, a device `<uid>-<device>` per prepared device with its nodes (a MIG device: its
    parent's node and its capability nodes) and what its config adds (MPS), and the driver's common edits once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        #: The node's driver files and the options built from the settings; None until first scanned.
        self.files: tuple[DriverFiles, CdiOptions] | None = None

    def __repr__(self) -> str:
        return f"<ClaimSpecs {self.root} scanned={self.files is not None}>"

    async def write(self, claim_uid: str,
                    devices: Sequence[tuple[str, NodeDevice, DeviceEdits]]) -> Mapping[str, tuple[str, ...]]:
        if self.files is None:
            raise SideEffectError("the NVIDIA driver's files are not known yet (the scan of the driver root failed "
                                  "or has not run; see nvdp's log)")
        files, options = self.files
        try:
            entries = []
            for name, node_device, extra in devices:
                gpu, mig = node_device.gpu, node_device.mig
                base = mig_edits(gpu, mig, files, options) if mig is not None else gpu_edits(gpu, files, options)
                entries.append((name, base.merged(_container_edits(extra))))
            spec = claim_spec(claim_uid, entries, common_edits(files, options))
            await write_spec(self.root, claim_spec_filename(claim_uid), spec)
        except (ValueError, CdiError, OSError) as exc:
            # ValueError: CdiBuildError, CdiSpecError (a device that cannot be described or validated).
            raise SideEffectError(f"cannot write the claim's CDI spec in {self.root}: {exc}") from None
        return {name: (f"{CLAIM_KIND}={claim_uid}-{name}",) for name, _, _ in devices}

    async def remove(self, claim_uid: str) -> None:
        try:
            await remove_spec(self.root, claim_spec_filename(claim_uid))
        except (CdiError, OSError) as exc:
            raise SideEffectError(f"cannot remove the claim's CDI spec from {self.root}: {exc}") from None

    async def list_claims(self) -> set[str]:
        try:
            names = await trio.to_thread.run_sync(owned_files, self.root, _CLAIM_SPEC_PREFIX)
        except CdiError as exc:
            raise SideEffectError(str(exc)) from None
        return {n[len(_CLAIM_SPEC_PREFIX):].rsplit(".", 1)[0] for n in names if n.startswith(_CLAIM_SPEC_PREFIX)}


class _Claims:
    """The preparer as the kubelet's calls reach it: after an unprepare, a device waiting to change its mode is
    looked at again."""

    def __init__(self, service: DraService) -> None:
        self.service = service

    async def prepare(self, claims: Sequence[ClaimRef]) -> Mapping[str, PrepareResult]:
        return await self.service.preparer.prepare(claims)

    async def unprepare(self, claims: Sequence[ClaimRef]) -> Mapping[str, UnprepareResult]:
        answers = await self.service.preparer.unprepare(claims)
        self.service.unprepared()
        return answers


def read_boot_id(path: Path = BOOT_ID) -> str:
    """This boot's ID (the checkpoint is discarded when it changes); "" where the kernel does not say."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def node_devices(inventory: NodeInventory, device_set: DeviceSet) -> dict[str, NodeDevice]:
    """Published device name -> the GPU (and MIG device) it stands for, for the preparer."""
    found: dict[str, NodeDevice] = {}
    for device in device_set.devices:
        gpu = inventory.gpu_by_uuid(device.gpu_uuid)
        if gpu is None:
            continue
        mig = None
        if device.placement is not None:
            mig = next((m for m in gpu.mig_devices if (m.gi, m.ci) == device.placement), None)
            if mig is None:
                continue
        found[device.name] = NodeDevice(gpu, mig)
    return found


@dataclass(frozen=True, slots=True)
class DraIdentity:
    """What, when it changes on a reload, makes a new `DraService` (sockets, checkpoint, pool)."""

    driver: str
    node: str
    registry_dir: Path
    plugins_dir: Path
    cdi_root: Path

    @classmethod
    def of(cls, settings: Settings) -> DraIdentity:
        assert settings.node_name is not None and settings.cdi_root is not None  # checked at start-up
        return cls(settings.dra_driver_name, settings.node_name, settings.kubelet_registry_dir,
                   settings.kubelet_plugins_dir, settings.cdi_root)


class DraService:
    """See the module docstring. Created by the controller; `tasks` go to its task supervisor."""

    def __init__(self, settings: Settings, client: ApiClient, host: AsyncioThread, tracker: HealthTracker, *,
                 simulated_root: Path | None, path_env: str, metrics: DraMetrics | None = None,
                 mps: MpsProvider | None = None, observer: ShareObserver | None = None) -> None:
        self.identity = DraIdentity.of(settings)
        identity = self.identity
        self.tracker = tracker
        self.mps = mps
        self.observer = observer
        self.simulated_root = simulated_root
        self.paths = DraPluginPaths(identity.driver, identity.registry_dir, identity.plugins_dir)
        self.cdi = ClaimSpecs(identity.cdi_root)
        smi = find_nvidia_smi(settings.driver_root, path_env)
        self.preparer = ClaimPreparer(
            identity.driver, identity.node, self.paths.plugin_socket.parent / CHECKPOINT, read_boot_id(),
            ApiClaimGetter(client), self.cdi, mps, {},
            timeslicer=NvidiaSmiTimeSlicer(smi) if smi is not None else None)
        self.feed = DraHealthFeed(identity.node, tracker)
        self.calls = ClaimCalls(_Claims(self), observer=metrics)
        self.plugin = DraKubeletPlugin(host, self.paths, self.calls, self.feed)
        self.publisher = SlicePublisher(client, identity.node, identity.driver, observer=metrics,
                                        watch_observer=metrics)
        self.inventory = NodeInventory(driver_version="", cuda_driver_version=0, gpus=())
        self.served: frozenset[str] = frozenset()
        self._roots: dict[str, str] = {}
        self._problems: tuple[str, ...] = ()
        self.recovered = False
        #: Device name -> policy: the share hosts the plan wants, and those in force now (`share_host_transition`).
        self.wanted_share_hosts: dict[str, SharePolicy] = {}
        self.share_hosts: dict[str, SharePolicy] | None = None
        #: Device name -> why its change of mode waits for its prepared claims.
        self.waiting: dict[str, str] = {}
        self._node_devices: dict[str, NodeDevice] = {}

    def __repr__(self) -> str:
        return (f"<DraService {self.identity.driver} gpus={len(self.served)} {self.plugin!r} {self.preparer!r} "
                f"{self.cdi!r}>")

    @property
    def tasks(self) -> dict[str, Task]:
        return {PLUGIN_CHILD: Task(self.plugin.run, ()), SLICES_CHILD: Task(self.publisher.run, ())}

    async def apply(self, settings: Settings, inventory: NodeInventory, plan: Plan) -> None:
        """Serve `plan.dra_gpus` of `inventory`: slices, the preparer's devices, share hosts, health targets, driver
        files. The first call also recovers the checkpoint (before the plugin's socket exists: no Prepare races
        it)."""
        self.inventory, self.served = inventory, frozenset(plan.dra_gpus)
        self.wanted_share_hosts = dict(plan.dra_share_hosts)
        if self.share_hosts is None:
            self.share_hosts = self._share_hosts_in_checkpoint()
        if isinstance(self.mps, MpsShares):
            spec = settings.config.dra.sharing.mps if settings.config.dra and settings.config.dra.sharing else None
            self.mps.update_gpus(inventory.gpus, spec.checked().keep_warm_s if spec is not None else 0.0)
        self._transition()
        self._roots = await trio.to_thread.run_sync(self._pcie_roots, inventory)
        try:
            self.cdi.files = await load_driver_files(settings, inventory, self.simulated_root)
        except (CdiError, OSError, trio.TooSlowError) as exc:
            log.error("DRA: the NVIDIA driver's files cannot be scanned (%s): claims cannot be prepared until the "
                      "next plan", exc)
        device_set = self._publish()
        self._node_devices = node_devices(inventory, device_set)
        self.preparer.update_devices(self._node_devices, share_hosts=self.share_hosts)
        log.info("DRA driver %s serves %d GPU(s) as %d device(s)", self.identity.driver, len(self.served),
                 len(device_set.devices))
        if not self.recovered:
            self.recovered = True
            with trio.move_on_after(RECOVER_TIMEOUT_S) as scope:
                await self.preparer.recover()
            if scope.cancelled_caught:
                log.error("DRA: recovering the checkpoint took longer than %.0f s; left for the next start",
                          RECOVER_TIMEOUT_S)

    def health_changed(self) -> None:
        """The tracker may have changed: taints on the slices, and the health stream."""
        if self.served:
            self._publish()
        else:
            self.feed.publish()

    def mps_health(self, gpu_uuid: str, healthy: bool) -> None:
        """A DRA control daemon answers again, or stopped answering: its share host's taints and health follow."""
        if self.share_hosts and any(p.gpu_uuid == gpu_uuid for p in self.share_hosts.values()):
            self.health_changed()

    async def release_mps(self) -> None:
        """nvdp is ending (or DRA goes): the control daemons nvdp owns are removed, the MPS host's stay."""
        if isinstance(self.mps, MpsShares):
            await self.mps.daemons.release()

    def unprepared(self) -> None:
        """Claims went: a device that waits to change its mode may change it now."""
        if not self.waiting:
            return
        before = self.share_hosts
        self._transition()
        if self.share_hosts != before:
            self.preparer.update_devices(self._node_devices, share_hosts=self.share_hosts)
            self.health_changed()

    def _share_hosts_in_checkpoint(self) -> dict[str, SharePolicy]:
        """At start: the devices MPS shares are prepared on are share hosts (they were when nvdp went), with the
        plan's policy, or the default one when the plan no longer wants them (until their shares are gone)."""
        hosts: dict[str, SharePolicy] = {}
        for entry in self.preparer.checkpoint.claims.values():
            for device in entry.devices:
                if not device.share_memory_bytes or device.device in hosts:
                    continue
                gpu = self.inventory.gpu_by_uuid(device.gpu_uuid)
                if device.device in self.wanted_share_hosts:
                    hosts[device.device] = self.wanted_share_hosts[device.device]
                elif gpu is not None:
                    hosts[device.device] = share_policy(gpu, MpsSharesConfig(devices="all"))
        return hosts

    def _transition(self) -> None:
        """The share hosts in force now; a device whose mode would change under prepared claims waits (logged)."""
        now, waiting = share_host_transition(self.share_hosts or {}, self.wanted_share_hosts,
                                             cp.prepared_per_device(self.preparer.checkpoint))
        for device, why in sorted(waiting.items()):
            if self.waiting.get(device) != why:
                log.warning("DRA: %s", why)
        for device in sorted(set(self.waiting) - set(waiting)):
            log.info("DRA: %s is %s now", device, "an MPS share host" if device in now else "no MPS share host")
        self.share_hosts, self.waiting = now, waiting
        if self.observer is not None:
            self.observer.dra_share_hosts_waiting(self.identity.driver, waiting)

    def withdraw(self) -> None:
        """The GPUs leave DRA (DRA switched off, the driver renamed): the slices go when the publisher stops."""
        self.publisher.withdraw_on_stop()

    def _publish(self) -> DeviceSet:
        facts = health_facts(self.tracker.faults)
        device_set = build_devices(self.inventory, self.served, driver=self.identity.driver, facts=facts,
                                   pcie_roots=self._roots)
        device_set = self._with_shares(device_set, facts)
        if device_set.problems != self._problems:
            self._problems = device_set.problems
            for problem in device_set.problems:
                log.warning("DRA: %s", problem)
        self.publisher.set_devices([d.api for d in device_set.devices])
        self.feed.extra = unhealthy_share_hosts(self.share_hosts or {}, self._daemons_healthy())
        self.feed.set_targets([HealthTarget(d.name, d.gpu_uuid, d.placement) for d in device_set.devices])
        return device_set

    def _daemons_healthy(self) -> dict[str, bool]:
        return dict(self.mps.daemons.healthy) if isinstance(self.mps, MpsShares) else {}

    def _with_shares(self, device_set: DeviceSet, facts: Sequence[HealthFact]) -> DeviceSet:
        """Share hosts' devices with their capacities and request policies, and the taints that keep new shares off
        while an XID or a silent control daemon would fail them."""
        hosts = self.share_hosts or {}
        if not hosts:
            return device_set
        healthy = self._daemons_healthy()
        devices: list[DraDevice] = []
        for device in device_set.devices:
            policy = hosts.get(device.name)
            gpu = self.inventory.gpu_by_uuid(device.gpu_uuid)
            if policy is None or gpu is None or device.placement is not None or policy.gpu_uuid != gpu.uuid:
                devices.append(device)
                continue
            api = apply_share_overrides(device.api, gpu, policy)
            xids = [f.xid for f in facts if f.gpu_uuid == device.gpu_uuid and f.xid is not None and f.fatal]
            extra = share_host_taints(min(xids) if xids else None, healthy.get(device.gpu_uuid) is False)
            if extra:
                taints = [*cast("list[dict[str, str]]", api.get("taints", [])), *extra]
                api["taints"] = taints[-MAX_TAINTS_PER_DEVICE:]
            devices.append(replace(device, api=api))
        return replace(device_set, devices=tuple(devices))

    def _pcie_roots(self, inventory: NodeInventory) -> dict[str, str]:
        sys_root = self.simulated_root / "sys" if self.simulated_root is not None else Path("/sys")
        ids = [bus for bus in (pci_bus_id(g.pci_bus_id) for g in inventory.gpus if g.uuid in self.served) if bus]
        return pcie_roots(ids, sys_root)

