"""From a node inventory and settings to the resource plan (pure).

MIG strategies (upstream-nvidia-device-plugin.md §3.1-3.2):

* `none`: every GPU is advertised whole as `nvidia.com/gpu`, MIG-enabled or not;
* `single`: MIG devices are advertised as `nvidia.com/gpu`; the node must be uniform (every GPU MIG-enabled with
  at least one MIG device, one profile only) or have no MIG at all;
* `mixed`: one resource per MIG profile, `nvidia.com/mig-<profile>`; GPUs without MIG stay `nvidia.com/gpu`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.settings import Settings
from nvdp.core.dra.devices import gpu_device_name
from nvdp.core.dra.shares import SharePolicy, share_policies
from nvdp.core.dra.split import DraSplitError, split_gpus
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.model import RESOURCE_PREFIX, Device, Plan

log = logging.getLogger(__name__)

GPU_RESOURCE = RESOURCE_PREFIX + "gpu"


class PlanError(Exception):
    """The node and the settings do not make a valid plan (e.g. a MIG layout the strategy refuses)."""


def gpu_device(gpu: Gpu) -> Device:
    return Device(
        id=gpu.uuid,
        physical_id=gpu.uuid,
        index=str(gpu.index),
        gpu_uuid=gpu.uuid,
        gpu_index=gpu.index,
        # The device node is named by the minor number, which need not equal the NVML index.
        paths=(f"/dev/nvidia{gpu.minor}",),
        numa_node=gpu.numa_node,
    )


def mig_resource_name(profile: str) -> str:
    # Kubernetes resource names cannot hold '+': upstream writes `1g.10gb+me` as `mig-1g.10gb.me`.
    return f"{RESOURCE_PREFIX}mig-{profile.replace('+', '.')}"


def mig_device(gpu: Gpu, mig: MigDevice, inventory: NodeInventory, need_caps: bool) -> Device:
    paths = [f"/dev/nvidia{gpu.minor}"]
    if need_caps:
        # A container needs the GPU-instance and compute-instance access capabilities, whose minors the driver
        # publishes in /proc/driver/nvidia-caps/mig-minors (keyed by the parent's device minor).
        for key in (f"gpu{gpu.minor}/gi{mig.gi}/access", f"gpu{gpu.minor}/gi{mig.gi}/ci{mig.ci}/access"):
            minor = inventory.mig_minors.get(key)
            if minor is None:
                raise PlanError(
                    f"missing MIG capability {key} for {mig.uuid} (GPU {gpu.index}) in "
                    "/proc/driver/nvidia-caps/mig-minors under the driver root: mount it into the container or "
                    "set passDeviceSpecs to false")
            paths.append(f"/dev/nvidia-caps/nvidia-cap{minor}")
    return Device(
        id=mig.uuid,
        physical_id=mig.uuid,
        index=f"{gpu.index}:{mig.index}",
        gpu_uuid=gpu.uuid,
        gpu_index=gpu.index,
        paths=tuple(paths),
        numa_node=gpu.numa_node,
        mig_placement=(mig.gi, mig.ci),
    )


def _check_single(gpus: list[Gpu]) -> None:
    mig_gpus = [g for g in gpus if g.mig_enabled]
    if not mig_gpus:
        return
    for gpu in mig_gpus:
        if not gpu.mig_devices:
            raise PlanError(
                "invalid MIG configuration: at least one device with migEnabled=true was not configured "
                f"correctly: device {gpu.index} ({gpu.uuid}) has no MIG devices configured")
    profiles = {m.profile for g in mig_gpus for m in g.mig_devices}
    if len(profiles) > 1:
        raise PlanError("invalid MIG configuration: more than one MIG device type present on node "
                        f"({', '.join(sorted(profiles))}); use the mixed strategy or repartition the GPUs")
    if len(mig_gpus) != len(gpus):
        raise PlanError("all devices on the node must be configured with the same migEnabled value "
                        "(the single strategy cannot mix MIG and whole GPUs; use the mixed strategy)")


def whole_and_mig_devices(inventory: NodeInventory, settings: Settings) -> dict[str, list[Device]]:
    """Resource name -> devices, before any sharing is applied."""
    # Sort key: GPU index, then MIG enumeration index: the wire order is NVML's order whatever the input order.
    gpus = sorted(inventory.gpus, key=lambda g: g.index)
    strategy = settings.mig_strategy
    need_caps = settings.pass_device_specs
    resources: dict[str, list[Device]] = defaultdict(list)
    if strategy == "single":
        _check_single(gpus)
    for gpu in gpus:
        if strategy == "none" or not gpu.mig_enabled:
            resources[GPU_RESOURCE].append(gpu_device(gpu))
            continue
        if not gpu.mig_devices:
            log.warning("GPU %d (%s) has MIG enabled but no MIG devices: it advertises nothing", gpu.index, gpu.uuid)
        for mig in sorted(gpu.mig_devices, key=lambda m: m.index):
            name = GPU_RESOURCE if strategy == "single" else mig_resource_name(mig.profile)
            resources[name].append(mig_device(gpu, mig, inventory, need_caps))
    return resources


def build_plan(inventory: NodeInventory, settings: Settings) -> Plan:
    """The resources this node advertises, sharing applied, and the MPS control daemons they need.

    Resources with no device are left out (upstream starts no server).
    """
    if settings.mig_strategy not in ("none", "single", "mixed"):
        raise PlanError(f"unknown MIG strategy: {settings.mig_strategy}")
    from nvdp.core.plan.imex import require_imex_channels

    require_imex_channels(inventory, settings)
    # Imported here: nvdp.core.plan.sharing raises this module's PlanError, so a top-level import would be circular.
    from nvdp.core.plan.sharing import apply_sharing

    try:
        split = split_gpus(inventory, settings.dra_enabled, settings.config.dra)
    except DraSplitError as exc:
        raise PlanError(str(exc)) from None
    # GPUs served through DRA are not there as far as the device plugin is concerned (MIG checks included).
    served = inventory
    if split.dra:
        served = replace(inventory, gpus=tuple(g for g in inventory.gpus if g.uuid not in split.dra))
    resources, mps_daemons = apply_sharing(whole_and_mig_devices(served, settings), inventory, settings)
    return Plan(tuple(sorted(resources, key=lambda r: r.name)), mps_daemons, dra_gpus=split.dra,
                dra_share_hosts=dra_share_hosts(inventory, settings, split.dra))


def dra_share_hosts(inventory: NodeInventory, settings: Settings,
                    dra_gpus: tuple[str, ...]) -> tuple[tuple[str, SharePolicy], ...]:
    """The DRA GPUs `dra.sharing.mps` publishes for MPS shares, with their policies; `PlanError` when a chosen GPU
    is not a whole GPU served through DRA, or the policy does not fit it (so a reload with such a config is refused
    before anything changes)."""
    dra = settings.config.dra
    spec = dra.sharing.mps if dra is not None and dra.sharing is not None else None
    if not settings.dra_enabled or spec is None:
        return ()
    if not settings.mps_root:
        raise PlanError("dra.sharing.mps: MPS shares need an MPS root for their control daemons: set --mps-root "
                        "(MPS_ROOT, or flags.mpsRoot in the config)")
    names = {g.uuid: gpu_device_name(g) for g in inventory.gpus if g.uuid in dra_gpus and not g.mig_enabled}
    try:
        policies = share_policies(spec.checked(), inventory.gpus, names)
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    return tuple(sorted(policies.items()))
