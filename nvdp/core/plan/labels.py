"""GPU Feature Discovery's node labels, computed from the plan nvdp serves and the inventory it read.

nvdp produces upstream GFD's label set itself (docs/labels.md), so no second DaemonSet is needed. The names and value
formats are upstream's (`internal/lm`); where upstream reads its config file, nvdp reads the plan built from it, which
says the same thing after every check:

- per resource, `nvidia.com/gpu` for whole GPUs (or MIG devices under `single`) and `nvidia.com/mig-<profile>` under
  `mixed`: `.count` (physical devices), `.replicas` (per device), `.sharing-strategy`, `.product` (sanitised,
  `-MIG-<profile>`, `-SHARED` when replicated under its own name), `.memory`; whole GPUs `.family`, `.compute.major`,
  `.compute.minor`; MIG devices `.multiprocessors`, `.slices.gi/.ci`, `.engines.*`. A renamed resource is labelled
  under the name upstream labels it by (`nvidia.com/gpu`), without `-SHARED`;
- node-wide: driver and CUDA versions, `gpu.machine`, `gpu.mode`, `mig.capable`, `mig.strategy`, `mps.capable` and,
  when asked for, `gfd.timestamp`;
- beyond upstream: a renamed MPS resource (a slice, `nvidia.com/gpu-10gb`) gets labels of its own, with the slice's
  memory in `.memory` (upstream issue #535).

Everything here is pure: the caller passes the host facts that are not NVML's (`HostFacts`) and the time.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.model import RESOURCE_PREFIX, Device, Plan, Resource, Sharing

MPS_CAPABLE = "nvidia.com/mps.capable"
TIMESTAMP = "nvidia.com/gfd.timestamp"
GPU = "gpu"

#: PCI class codes (sysfs `class`) that say how a GPU is used: `gpu.mode`.
PCI_CLASS_VGA = 0x030000
PCI_CLASS_3D = 0x030200

_UNWANTED = re.compile(r"[^A-Za-z0-9\-_. ]")


class LabelError(Exception):
    """The labels cannot be computed (upstream's one refusal: MPS sharing on a node with MIG-enabled GPUs)."""


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What GFD reads outside NVML: the machine's DMI product name and each GPU's PCI class (by GPU UUID)."""

    #: Contents of the machine-type file, stripped; None when it cannot be read.
    machine: str | None = None
    pci_classes: Mapping[str, int] = field(default_factory=dict)


def sanitise(name: str) -> str:
    """GFD's label-value form of a name: characters outside `[A-Za-z0-9-_. ]` dropped, runs of whitespace made
    one `-`, leading and trailing whitespace gone."""
    return "-".join(_UNWANTED.sub("", name).split())


def gfd_profile(profile: str) -> str:
    """A MIG profile as GFD names it: `1g.10gb+me` -> `1g.10gb.me` (a label value and a resource name cannot
    hold `+`)."""
    return profile.replace("+", ".")


def family(major: int, minor: int) -> str:
    """The architecture family GFD derives from the CUDA compute capability."""
    if major == 7:
        return "volta" if minor < 5 else "turing"
    if major == 8:
        return "ampere" if minor < 9 else "ada-lovelace"
    return {1: "tesla", 2: "fermi", 3: "kepler", 5: "maxwell", 6: "pascal", 9: "hopper", 10: "blackwell",
            12: "blackwell", 13: "rubin"}.get(major, "undefined")


# -- what the plan says about sharing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SharingInfo:
    replicas: int = 1
    strategy: Sharing = Sharing.NONE
    #: Replicated under its own name (`-SHARED`), not renamed.
    suffix: bool = False


def _mig_of(device: Device, inventory: NodeInventory) -> tuple[Gpu, MigDevice] | None:
    gpu = inventory.gpu_by_uuid(device.gpu_uuid)
    if gpu is None or device.mig_placement is None:
        return None
    mig = next((m for m in gpu.mig_devices if m.uuid == device.physical_id), None)
    return None if mig is None else (gpu, mig)


def _kind(device: Device, inventory: NodeInventory, mig_strategy: str) -> tuple[str, bool]:
    """(the resource upstream labels this device under, is it a MIG device)."""
    found = _mig_of(device, inventory)
    if found is None:
        return GPU, False
    return (GPU if mig_strategy != "mixed" else f"mig-{gfd_profile(found[1].profile)}"), True


def _per_device(resource: Resource) -> int:
    """Replicas per physical device, as upstream emits them (not the node's total: upstream issue #732)."""
    return max(Counter(d.physical_id for d in resource.devices).values())


def _sharing(plan: Plan, inventory: NodeInventory, mig_strategy: str) -> dict[tuple[str, bool], _SharingInfo]:
    """Per upstream resource: the largest replication among the plan's resources of its devices, and whether a
    replicated one kept the upstream name (a renamed one gets no `-SHARED`, as upstream)."""
    found: dict[tuple[str, bool], _SharingInfo] = {}
    for resource in plan.resources:
        if not resource.devices:
            continue
        key = _kind(resource.devices[0], inventory, mig_strategy)
        replicas = _per_device(resource)
        shared = resource.sharing is not Sharing.NONE and replicas > 1
        before = found.get(key, _SharingInfo())
        own_name = resource.short_name == key[0]
        if shared and replicas >= before.replicas:
            found[key] = _SharingInfo(replicas, resource.sharing, before.suffix or own_name)
        elif shared:
            found[key] = _SharingInfo(before.replicas, before.strategy, before.suffix or own_name)
    return found


# -- per-resource labels -------------------------------------------------------------------------------------------


def _product(*parts: str, shared: bool = False) -> str:
    kept = [sanitise(p) for p in parts if p]
    if shared:
        kept.append("SHARED")
    return "-".join(kept)


def _base(name: str, count: int, product: str, sharing: _SharingInfo | None) -> dict[str, str]:
    """`.count`, `.replicas`, `.sharing-strategy`, `.product`; `sharing` None: sharing labels disabled (upstream
    labels MIG-enabled GPUs so under `nvidia.com/gpu`: replicas 0)."""
    replicas = 0 if sharing is None else sharing.replicas
    strategy = sharing.strategy if sharing is not None and sharing.replicas > 1 else Sharing.NONE
    prefix = RESOURCE_PREFIX + name
    return {f"{prefix}.count": str(count), f"{prefix}.replicas": str(replicas),
            f"{prefix}.sharing-strategy": str(strategy), f"{prefix}.product": product}


def _whole_gpu(gpu: Gpu, count: int, sharing: _SharingInfo | None) -> dict[str, str]:
    shared = sharing is not None and sharing.replicas > 1 and sharing.suffix
    labels = _base(GPU, count, _product(gpu.name, shared=shared), sharing)
    prefix = RESOURCE_PREFIX + GPU
    if gpu.memory_mib:
        labels[f"{prefix}.memory"] = str(gpu.memory_mib)
    major, _, minor = gpu.compute_capability.partition(".")
    if major.isdigit() and minor.isdigit() and int(major) != 0:
        labels[f"{prefix}.family"] = family(int(major), int(minor))
        labels[f"{prefix}.compute.major"] = major
        labels[f"{prefix}.compute.minor"] = minor
    return labels


def _mig(name: str, gpu: Gpu, mig: MigDevice, count: int, sharing: _SharingInfo) -> dict[str, str]:
    shared = sharing.replicas > 1 and sharing.suffix
    labels = _base(name, count, _product(gpu.name, "MIG", gfd_profile(mig.profile), shared=shared), sharing)
    prefix = RESOURCE_PREFIX + name
    for suffix, value in (("memory", mig.memory_mib), ("multiprocessors", mig.multiprocessors),
                          ("slices.gi", mig.slices_gi), ("slices.ci", mig.slices_ci),
                          ("engines.copy", mig.copy_engines), ("engines.decoder", mig.decoders),
                          ("engines.encoder", mig.encoders), ("engines.jpeg", mig.jpeg_engines),
                          ("engines.ofa", mig.ofa_engines)):
        labels[f"{prefix}.{suffix}"] = str(value)
    return labels


def _invalid_single(gpu: Gpu) -> dict[str, str]:
    """Upstream's labels for a node the `single` strategy cannot serve (it also logs why)."""
    prefix = RESOURCE_PREFIX + GPU
    return {f"{prefix}.product": _product(gpu.name, "MIG", "INVALID"), f"{prefix}.count": "0",
            f"{prefix}.replicas": "0", f"{prefix}.sharing-strategy": "", f"{prefix}.memory": "0"}


def _gpu_labels(gpus: list[Gpu], sharing: Mapping[tuple[str, bool], _SharingInfo]) -> dict[str, str]:
    """`nvidia.com/gpu.*` for whole GPUs. MIG-enabled GPUs are labelled without sharing, and whole GPUs of the same
    product override them (upstream's order). Upstream picks among several products in map order; nvdp lets the
    lowest-index whole GPU win (the lowest-index MIG-enabled one when there is no whole GPU), so they never flap."""
    counts = Counter(g.name for g in gpus)
    labels: dict[str, str] = {}
    ordered = sorted(gpus, key=lambda g: (not g.mig_enabled, -g.index))
    for gpu in ordered:
        info = None if gpu.mig_enabled else sharing.get((GPU, False), _SharingInfo())
        labels.update(_whole_gpu(gpu, counts[gpu.name], info))
    return labels


def _mig_labels(gpus: list[Gpu], mig_strategy: str,
                sharing: Mapping[tuple[str, bool], _SharingInfo]) -> dict[str, str]:
    mig_gpus = [g for g in gpus if g.mig_enabled]
    # Sort key: GPU index, then MIG enumeration index: the first device of a profile describes it.
    migs = [(g, m) for g in mig_gpus for m in sorted(g.mig_devices, key=lambda m: m.index)]
    by_profile: dict[str, list[tuple[Gpu, MigDevice]]] = {}
    for gpu, mig in migs:
        by_profile.setdefault(gfd_profile(mig.profile), []).append((gpu, mig))
    if mig_strategy == "single":
        if not mig_gpus:
            return {}
        if any(not g.mig_devices for g in mig_gpus) or len(mig_gpus) != len(gpus) or len(by_profile) != 1:
            return _invalid_single(mig_gpus[0])
        ((_profile, devices),) = by_profile.items()
        gpu, mig = devices[0]
        return _mig(GPU, gpu, mig, len(devices), sharing.get((GPU, True), _SharingInfo()))
    labels: dict[str, str] = {}
    for profile, devices in sorted(by_profile.items()):
        gpu, mig = devices[0]
        name = f"mig-{profile}"
        labels.update(_mig(name, gpu, mig, len(devices), sharing.get((name, True), _SharingInfo())))
    return labels


def _slice_labels(plan: Plan, inventory: NodeInventory, mig_strategy: str) -> dict[str, str]:
    """Beyond upstream: a renamed MPS resource is a slice of its GPUs; it is labelled under its own name, with the
    slice's memory (what a pod asking for `nvidia.com/gpu-10gb` gets), not the whole GPU's."""
    labels: dict[str, str] = {}
    for resource in plan.resources:
        if resource.sharing is not Sharing.MPS or not resource.devices:
            continue
        kind, _is_mig = _kind(resource.devices[0], inventory, mig_strategy)
        if resource.short_name == kind:
            continue
        first = resource.devices[0]
        gpu = inventory.gpu_by_uuid(first.gpu_uuid)
        if gpu is None or first.mps is None:
            continue
        replicas = _per_device(resource)
        info = _SharingInfo(replicas, Sharing.MPS, suffix=False)
        count = len({d.physical_id for d in resource.devices})
        labels.update(_base(resource.short_name, count, _product(gpu.name), info))
        # A slice is served through MPS even alone on its GPU (one 20gb slice of a 40 GB GPU).
        labels[f"{RESOURCE_PREFIX}{resource.short_name}.sharing-strategy"] = str(Sharing.MPS)
        # Slices of one resource have one size; the smallest is what a pod can count on.
        memory = min(d.mps.memory_limit_mib for d in resource.devices if d.mps is not None)
        labels[f"{RESOURCE_PREFIX}{resource.short_name}.memory"] = str(memory)
    return labels


# -- node-wide labels ----------------------------------------------------------------------------------------------


def version_labels(driver_version: str, cuda_driver_version: int) -> dict[str, str]:
    """Driver and CUDA version labels, with upstream's deprecated names beside the new ones. The CUDA "runtime"
    version is what the driver supports (`nvmlSystemGetCudaDriverVersion`), as upstream reports it. A driver version
    that is not `X.Y[.Z]` leaves the driver labels out (upstream refuses to label the node at all)."""
    labels: dict[str, str] = {}
    parts = driver_version.split(".")
    if 2 <= len(parts) <= 3 and all(parts):
        major, minor, rev = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
        labels |= {"nvidia.com/cuda.driver.major": major, "nvidia.com/cuda.driver.minor": minor,
                   "nvidia.com/cuda.driver.rev": rev, "nvidia.com/cuda.driver-version.major": major,
                   "nvidia.com/cuda.driver-version.minor": minor, "nvidia.com/cuda.driver-version.revision": rev,
                   "nvidia.com/cuda.driver-version.full": driver_version}
    if cuda_driver_version > 0:
        cuda_major, cuda_minor = cuda_driver_version // 1000, cuda_driver_version % 1000 // 10
        labels |= {"nvidia.com/cuda.runtime.major": str(cuda_major), "nvidia.com/cuda.runtime.minor": str(cuda_minor),
                   "nvidia.com/cuda.runtime-version.major": str(cuda_major),
                   "nvidia.com/cuda.runtime-version.minor": str(cuda_minor),
                   "nvidia.com/cuda.runtime-version.full": f"{cuda_major}.{cuda_minor}"}
    return labels


def gpu_mode(gpus: list[Gpu], pci_classes: Mapping[str, int]) -> str:
    """`compute` (3D controller), `graphics` (VGA controller) or `unknown` (another class, a class that could not be
    read, or GPUs of different classes). MIG-enabled GPUs cannot switch mode: they count as compute, as upstream."""
    classes = set()
    for gpu in gpus:
        pci_class = PCI_CLASS_3D if gpu.mig_enabled else pci_classes.get(gpu.uuid)
        if pci_class is None:
            return "unknown"
        classes.add(pci_class)
    if len(classes) != 1:
        return "unknown"
    return {PCI_CLASS_VGA: "graphics", PCI_CLASS_3D: "compute"}.get(classes.pop(), "unknown")


def mps_capable(plan: Plan, gpus: list[Gpu]) -> str:
    """`true` when a resource is shared through MPS (replicas > 1) and no GPU has MIG enabled; an MPS-shared node
    with a MIG-enabled GPU cannot be labelled (LabelError, upstream's message)."""
    mps = any(r.sharing is Sharing.MPS and r.devices and _per_device(r) > 1 for r in plan.resources)
    if not mps:
        return "false"
    if any(g.mig_enabled for g in gpus):
        raise LabelError("failed to check MPS-capable: MPS sharing is not supported for mig devices")
    return "true"


def node_labels(plan: Plan, inventory: NodeInventory, *, mig_strategy: str, host: HostFacts,
                timestamp: int | None = None) -> dict[str, str]:
    """Every GFD label for this node, sorted by key. No GPUs: no labels but the timestamp, as upstream. Raises
    LabelError (see `mps_capable`)."""
    gpus = sorted(inventory.gpus, key=lambda g: g.index)
    labels: dict[str, str] = {}
    if gpus:
        sharing = _sharing(plan, inventory, mig_strategy)
        labels |= version_labels(inventory.driver_version, inventory.cuda_driver_version)
        labels["nvidia.com/gpu.machine"] = sanitise(host.machine) if host.machine else "unknown"
        labels["nvidia.com/mig.capable"] = "true" if any(g.mig_capable for g in gpus) else "false"
        labels[MPS_CAPABLE] = mps_capable(plan, gpus)
        labels |= _gpu_labels(gpus, sharing)
        if mig_strategy != "none":
            labels["nvidia.com/mig.strategy"] = mig_strategy
            labels |= _mig_labels(gpus, mig_strategy, sharing)
        labels["nvidia.com/gpu.mode"] = gpu_mode(gpus, host.pci_classes)
        labels |= {k: v for k, v in _slice_labels(plan, inventory, mig_strategy).items() if k not in labels}
    if timestamp is not None:
        labels[TIMESTAMP] = str(timestamp)
    return dict(sorted(labels.items()))


def render_features(labels: Mapping[str, str]) -> str:
    """NFD's local feature file format: one `key=value` per line."""
    return "".join(f"{key}={value}\n" for key, value in sorted(labels.items()))
