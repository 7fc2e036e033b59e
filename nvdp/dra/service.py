"""DRA in the daemon: the pieces of the DRA kubelet plugin put together, and what the controller tells them.

`DraService` owns, for one driver name on one node:

* the `ClaimPreparer` (`nvdp.dra.prepare`) with the real seams: claims read through the API (`ApiClaimGetter`),
  per-claim CDI specs written with the CDI generator's edits (`ClaimSpecs`), MPS through nvdp's per-GPU control
  daemons (`nvdp.dra.mps`, run by the controller), time slices through nvidia-smi where it is found;
* the kubelet plugin's sockets and gRPC servers (`DraKubeletPlugin`) and the health feed of its stream;
* the ResourceSlice publisher (`SlicePublisher`).

Two of them are long-lived children of the daemon's task supervisor (`tasks`): `dra-plugin` and `dra-slices`,
restarted alone with backoff like every child. The controller calls `apply()` with every plan it applies (which
GPUs go to DRA is the plan's `dra_gpus`) and `health_changed()` whenever the health tracker may have changed (the
devices' ResourceSlice taints and the health stream follow it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
from nvdp.core.dra.claims import DeviceEdits, NodeDevice
from nvdp.core.dra.devices import DeviceSet, build_devices, pci_bus_id
from nvdp.core.dra.plugin import HealthTarget, health_facts
from nvdp.core.health.tracker import HealthTracker
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.model import Plan
from nvdp.dra.calls import CallObserver, ClaimCalls
from nvdp.dra.kubelet_plugin import DraHealthFeed, DraKubeletPlugin, DraPluginPaths
from nvdp.dra.mps import DraMps
from nvdp.dra.prepare import ClaimFetchError, ClaimPreparer, SideEffectError
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
                 mps: DraMps | None = None) -> None:
        self.identity = DraIdentity.of(settings)
        identity = self.identity
        self.tracker = tracker
        self.mps = mps
        self.simulated_root = simulated_root
        self.paths = DraPluginPaths(identity.driver, identity.registry_dir, identity.plugins_dir)
        self.cdi = ClaimSpecs(identity.cdi_root)
        smi = find_nvidia_smi(settings.driver_root, path_env)
        self.preparer = ClaimPreparer(
            identity.driver, identity.node, self.paths.plugin_socket.parent / CHECKPOINT, read_boot_id(),
            ApiClaimGetter(client), self.cdi, mps, {},
            timeslicer=NvidiaSmiTimeSlicer(smi) if smi is not None else None)
        self.feed = DraHealthFeed(identity.node, tracker)
        self.calls = ClaimCalls(self.preparer, observer=metrics)
        self.plugin = DraKubeletPlugin(host, self.paths, self.calls, self.feed)
        self.publisher = SlicePublisher(client, identity.node, identity.driver, observer=metrics,
                                        watch_observer=metrics)
        self.inventory = NodeInventory(driver_version="", cuda_driver_version=0, gpus=())
        self.served: frozenset[str] = frozenset()
        self._roots: dict[str, str] = {}
        self._problems: tuple[str, ...] = ()
        self.recovered = False

    def __repr__(self) -> str:
        return (f"<DraService {self.identity.driver} gpus={len(self.served)} {self.plugin!r} {self.preparer!r} "
                f"{self.cdi!r}>")

    @property
    def tasks(self) -> dict[str, Task]:
        return {PLUGIN_CHILD: Task(self.plugin.run, ()), SLICES_CHILD: Task(self.publisher.run, ())}

    async def apply(self, settings: Settings, inventory: NodeInventory, plan: Plan) -> None:
        """Serve `plan.dra_gpus` of `inventory`: slices, the preparer's devices, health targets, driver files. The
        first call also recovers the checkpoint (before the plugin's socket exists: no Prepare races it)."""
        self.inventory, self.served = inventory, frozenset(plan.dra_gpus)
        if self.mps is not None:
            self.mps.set_inventory(inventory)
        self._roots = await trio.to_thread.run_sync(self._pcie_roots, inventory)
        try:
            self.cdi.files = await load_driver_files(settings, inventory, self.simulated_root)
        except (CdiError, OSError, trio.TooSlowError) as exc:
            log.error("DRA: the NVIDIA driver's files cannot be scanned (%s): claims cannot be prepared until the "
                      "next plan", exc)
        device_set = self._publish()
        self.preparer.update_devices(node_devices(inventory, device_set))
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

    def withdraw(self) -> None:
        """The GPUs leave DRA (DRA switched off, the driver renamed): the slices go when the publisher stops."""
        self.publisher.withdraw_on_stop()

    def _publish(self) -> DeviceSet:
        device_set = build_devices(self.inventory, self.served, driver=self.identity.driver,
                                   facts=health_facts(self.tracker.faults), pcie_roots=self._roots)
        if device_set.problems != self._problems:
            self._problems = device_set.problems
            for problem in device_set.problems:
                log.warning("DRA: %s", problem)
        self.publisher.set_devices([d.api for d in device_set.devices])
        self.feed.set_targets([HealthTarget(d.name, d.gpu_uuid, d.placement) for d in device_set.devices])
        return device_set

    def _pcie_roots(self, inventory: NodeInventory) -> dict[str, str]:
        sys_root = self.simulated_root / "sys" if self.simulated_root is not None else Path("/sys")
        ids = [bus for bus in (pci_bus_id(g.pci_bus_id) for g in inventory.gpus if g.uuid in self.served) if bus]
        return pcie_roots(ids, sys_root)

