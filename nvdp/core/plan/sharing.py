"""Apply the `sharing` config to the whole-GPU and MIG devices of a node (pure).

Input: resource name -> devices as `nvdp.core.plan.build.whole_and_mig_devices` makes them. Output: the resources to
advertise (unshared remainders, time-sliced replicas, MPS slices) and one MPS control daemon per MPS-shared GPU.

Every refusal is a `PlanError` that names the config entry, the GPU and the numbers, because a plugin that silently
advertises nothing (the fork's behaviour on a bad device reference) leaves users guessing.
"""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass

from nvdp.core.config.settings import Settings
from nvdp.core.config.sharing import Mps, ReplicatedResource, TimeSlicing, device_ref_kind
from nvdp.core.inventory import Gpu, NodeInventory
from nvdp.core.plan.build import PlanError
from nvdp.core.plan.model import Device, MpsDaemonSpec, MpsSlice, Resource, Sharing

log = logging.getLogger(__name__)

#: MPS clients per GPU: Volta (compute capability 7.0) and newer allow 48, older GPUs 16. Upstream draws the line at
#: 7.5 by mistake, which caps a V100 at 16 (see docs/compatibility.md).
MAX_MPS_CLIENTS = 48
MAX_MPS_CLIENTS_PRE_VOLTA = 16
VOLTA = (7, 0)
MIB_PER_GB = 1024  # memoryGB is read as GiB, as the `G` suffix of CUDA_MPS_PINNED_DEVICE_MEM_LIMIT means


@dataclass(frozen=True, slots=True)
class _Entry:
    """One resource of a sharing section, resolved against the node."""

    kind: Sharing
    #: `sharing.mps.resources[1] (nvidia.com/gpu-10gb)`: how messages name the entry.
    where: str
    config: ReplicatedResource
    output: str
    fail_requests_greater_than_one: bool
    #: The base devices this entry shares, in resource (GPU index, MIG index) order.
    devices: tuple[Device, ...]

    @property
    def replicas(self) -> int:
        assert self.config.replicas is not None  # checked when the config was decoded
        return self.config.replicas


def compute_capability(text: str) -> tuple[int, int]:
    """`"8.0"` -> (8, 0); upstream also writes `v7.5`. Unreadable -> (0, 0), i.e. treated as pre-Volta."""
    major, _, minor = text.strip().removeprefix("v").partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return 0, 0


def max_mps_clients(capability: str) -> int:
    return MAX_MPS_CLIENTS if compute_capability(capability) >= VOLTA else MAX_MPS_CLIENTS_PRE_VOLTA


def gb(mib: int) -> str:
    """Memory for messages, in the config's unit: `40 GB`, `79.6 GB` (rounded down, never over-stated)."""
    if mib % MIB_PER_GB == 0:
        return f"{mib // MIB_PER_GB} GB"
    return f"{mib * 10 // MIB_PER_GB / 10:.1f} GB"


def _gpu_name(gpu: Gpu) -> str:
    return f"GPU {gpu.index} ({gpu.uuid})"


def _device_name(device: Device) -> str:
    if device.mig_placement is not None:
        return f"MIG device {device.index} ({device.physical_id})"
    return f"GPU {device.index} ({device.physical_id})"


# --- selecting devices ------------------------------------------------------------------------------------------


def _matches(device: Device, ref: str, kind: str) -> bool:
    if kind == "gpu-index":
        # A GPU reference takes every device of the resource on that GPU: the GPU itself, or its MIG devices
        # when the resource is made of MIG devices (migStrategy single).
        return device.gpu_index == int(ref)
    if kind == "mig-index":
        gpu, _, mig = ref.partition(":")
        return device.mig_placement is not None and device.index == f"{int(gpu)}:{int(mig)}"
    if kind == "gpu-uuid":
        return device.gpu_uuid == ref
    return device.physical_id == ref


def _why_unmatched(ref: str, kind: str, name: str, inventory: NodeInventory) -> str:
    """Why `ref` selects nothing in `name`: not on this node at all, or on it but not part of that resource."""
    gpus = sorted(inventory.gpus, key=lambda g: g.index)
    found: str | None = None
    if kind == "gpu-index":
        gpu = next((g for g in gpus if g.index == int(ref)), None)
        found = _gpu_name(gpu) if gpu else None
        missing = f"no GPU with index {ref} on this node (GPU indices: {', '.join(str(g.index) for g in gpus)})"
    elif kind == "gpu-uuid":
        gpu = next((g for g in gpus if g.uuid == ref), None)
        found = _gpu_name(gpu) if gpu else None
        missing = f"no GPU with UUID {ref} on this node"
    else:
        for gpu in gpus:
            for mig in gpu.mig_devices:
                if kind == "mig-uuid":
                    hit = mig.uuid == ref
                else:
                    g, _, m = ref.partition(":")
                    hit = (gpu.index, mig.index) == (int(g), int(m))
                if hit:
                    found = f"MIG device {gpu.index}:{mig.index} ({mig.uuid}, profile {mig.profile})"
        missing = f"no MIG device {ref} on this node"
    if found is None:
        return missing
    return f"{found} is on this node but not part of {name} (check migStrategy and the resource name)"


def _select(config: ReplicatedResource, base: dict[str, list[Device]], inventory: NodeInventory,
            where: str) -> tuple[Device, ...]:
    assert config.name is not None
    devices = base.get(config.name, [])
    selection = config.selection()
    if not devices:
        if selection.is_all:
            # One config file often serves a whole fleet: a resource this node lacks is skipped, as upstream does.
            log.warning("%s: this node has no %s devices: nothing to share", where, config.name)
            return ()
        raise PlanError(f"{where}: this node has no {config.name} devices, but devices {config.devices!r} "
                        "asks for some")
    if selection.is_all:
        return tuple(devices)
    if selection.count is not None:
        if selection.count > len(devices):
            raise PlanError(f"{where}: requested {selection.count} devices to be replicated, but only "
                            f"{len(devices)} {config.name} devices available")
        # The first N in resource order (GPU index, MIG index), so the choice is the same on every start.
        return tuple(devices[:selection.count])
    chosen: set[str] = set()
    for ref in selection.refs:
        kind = device_ref_kind(ref)
        assert kind is not None  # checked when the config was decoded
        hits = [d for d in devices if _matches(d, ref, kind)]
        if not hits:
            raise PlanError(f"{where}: device {ref!r}: {_why_unmatched(ref, kind, config.name, inventory)}")
        chosen.update(d.id for d in hits)
    return tuple(d for d in devices if d.id in chosen)


def _entries(section: TimeSlicing | Mps, kind: Sharing, key: str, base: dict[str, list[Device]],
             inventory: NodeInventory) -> list[_Entry]:
    entries = []
    for i, config in enumerate(section.resources or ()):
        output = section.output_name(config)
        where = f"sharing.{key}.resources[{i}] ({output})"
        entries.append(_Entry(kind, where, config, output, section.fails_requests_greater_than_one,
                              _select(config, base, inventory, where)))
    return entries


# --- checks across entries --------------------------------------------------------------------------------------


def _check_overlaps(entries: list[_Entry]) -> None:
    time_sliced: dict[str, _Entry] = {}  # base device id -> entry
    time_sliced_gpus: dict[str, _Entry] = {}  # GPU uuid -> entry
    mps_gpus: dict[str, _Entry] = {}
    for entry in entries:
        for device in entry.devices:
            if entry.kind is Sharing.TIME_SLICING:
                other = time_sliced.get(device.id)
                if other is not None:
                    raise PlanError(f"{_device_name(device)} is time-sliced by both {other.where} and "
                                    f"{entry.where}: share each device once")
                time_sliced[device.id] = entry
                time_sliced_gpus.setdefault(device.gpu_uuid, entry)
            else:
                # Several MPS resources may slice one GPU (nos writes gpu-10gb x2 and gpu-20gb x1 on one card).
                mps_gpus.setdefault(device.gpu_uuid, entry)
            if device.gpu_uuid in time_sliced_gpus and device.gpu_uuid in mps_gpus:
                raise PlanError(
                    f"GPU {device.gpu_index} ({device.gpu_uuid}) is both time-sliced "
                    f"({time_sliced_gpus[device.gpu_uuid].where}) and MPS-shared ({mps_gpus[device.gpu_uuid].where}): "
                    "a GPU takes one kind of sharing (different GPUs of a node may use different kinds)")


def _check_names(entries: list[_Entry], remainder: dict[str, list[Device]]) -> None:
    kinds: dict[str, _Entry] = {}
    for entry in entries:
        if not entry.devices:
            continue
        rest = remainder.get(entry.output)
        if rest:
            # Whole devices and replicas under one name would hand a pod either, at random.
            raise PlanError(
                f"{entry.where}: {entry.output} would hold both shared devices and unshared ones "
                f"({', '.join(_device_name(d) for d in rest)}): set rename (or renameByDefault) so that shared "
                "and whole devices are separate resources, or share every device")
        other = kinds.setdefault(entry.output, entry)
        if other.kind is not entry.kind:
            raise PlanError(f"{entry.output} would hold both time-sliced ({other.where}) and MPS ({entry.where}) "
                            "devices: give one of them another rename")


@dataclass(frozen=True, slots=True)
class _Slice:
    entry: _Entry
    gpu: Gpu
    memory_mib: int
    percent: int
    memory_gb: int | None


def _slice(entry: _Entry, gpu: Gpu) -> _Slice:
    config = entry.config
    if config.memory_gb is not None:
        memory_mib = config.memory_gb * MIB_PER_GB
        # Compute follows memory: 10 GB of a 40 GB GPU gets 25 % of its SMs.
        default_percent = memory_mib * 100 // gpu.memory_mib if gpu.memory_mib else 100
    else:
        # Upstream dialect: each selected GPU split equally, as upstream's control daemon does.
        memory_mib = gpu.memory_mib // entry.replicas
        default_percent = 100 // entry.replicas
    percent = config.compute_percent or min(100, max(1, default_percent))
    return _Slice(entry, gpu, memory_mib, percent, config.memory_gb)


def _describe_slices(slices: list[_Slice]) -> str:
    parts = []
    for s in slices:
        size = f"{s.entry.config.memory_gb} GB" if s.memory_gb is not None else f"{gb(s.memory_mib)} (equal split)"
        parts.append(f"{s.entry.replicas} x {s.entry.output} of {size} ({s.entry.where})")
    return ", ".join(parts)


def _check_mps_gpu(gpu: Gpu, slices: list[_Slice]) -> None:
    asked = sum(s.memory_mib * s.entry.replicas for s in slices)
    if asked > gpu.memory_mib:
        raise PlanError(f"{_gpu_name(gpu)}: MPS slices ask for {gb(asked)} but the GPU has {gb(gpu.memory_mib)}: "
                        f"{_describe_slices(slices)}")
    clients = sum(s.entry.replicas for s in slices)
    limit = max_mps_clients(gpu.compute_capability)
    if clients > limit:
        raise PlanError(
            f"{_gpu_name(gpu)}: maximum allowed replicas exceeded: {clients} > {limit} MPS clients for compute "
            f"capability {gpu.compute_capability}: {_describe_slices(slices)}")
    if compute_capability(gpu.compute_capability) < VOLTA:
        log.warning("%s: compute capability %s is older than Volta: MPS enforces no memory or compute limits there",
                    _gpu_name(gpu), gpu.compute_capability)


def _refuse_mig(entry: _Entry, gpus: dict[str, Gpu]) -> None:
    for device in entry.devices:
        if device.mig_placement is not None:
            raise PlanError(f"{entry.where}: sharing using MPS is not supported for MIG devices: "
                            f"{_device_name(device)}")
        if gpus[device.gpu_uuid].mig_enabled:
            # With migStrategy none a MIG-enabled GPU is advertised whole, but CUDA sees only its MIG devices.
            raise PlanError(f"{entry.where}: sharing using MPS is not supported for MIG devices: "
                            f"{_device_name(device)} has MIG enabled")


# --- building ---------------------------------------------------------------------------------------------------


def _sort_key(device: Device) -> tuple[int, int, int, int]:
    _, _, mig = device.index.partition(":")
    memory_gb = device.mps.memory_gb if device.mps is not None and device.mps.memory_gb is not None else 0
    replica = -1 if device.replica is None else device.replica
    return device.gpu_index, int(mig) if mig.isdigit() else -1, memory_gb, replica


def _replica(device: Device, replica_id: str, replica: int, mps: MpsSlice | None) -> Device:
    return Device(id=replica_id, physical_id=device.physical_id, index=device.index, gpu_uuid=device.gpu_uuid,
                  gpu_index=device.gpu_index, paths=device.paths, numa_node=device.numa_node, replica=replica,
                  mig_placement=device.mig_placement, mps=mps)


def mps_dirs(mps_root: str, gpu_uuid: str) -> tuple[str, str, str]:
    """(pipe, log, shm) directories on the host: one control daemon per GPU, one shm tmpfs for the node."""
    root = posixpath.normpath(mps_root)
    return (posixpath.join(root, gpu_uuid, "pipe"), posixpath.join(root, gpu_uuid, "log"),
            posixpath.join(root, "shm"))


def _request_bound(slices: list[_Slice]) -> tuple[int, int]:
    """The most memory (MiB) and compute (%) one container may get from these slices of one GPU."""
    memory = percent = 0
    by_output: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        by_output[s.entry.output].append(s)
    for group in by_output.values():
        if group[0].entry.fail_requests_greater_than_one:
            memory = max(memory, *(s.memory_mib for s in group))
            percent = max(percent, *(s.percent for s in group))
        else:
            # Several slices of one GPU in one request add up; the daemon's defaults must not cut them.
            memory = max(memory, sum(s.memory_mib * s.entry.replicas for s in group))
            percent = max(percent, sum(s.percent * s.entry.replicas for s in group))
    return memory, min(percent, 100)


def apply_sharing(base: dict[str, list[Device]], inventory: NodeInventory,
                  settings: Settings) -> tuple[list[Resource], tuple[MpsDaemonSpec, ...]]:
    """The resources to advertise and the MPS control daemons they need, or PlanError."""
    sharing = settings.config.sharing
    entries: list[_Entry] = []
    if sharing is not None and sharing.time_slicing is not None:
        entries += _entries(sharing.time_slicing, Sharing.TIME_SLICING, "timeSlicing", base, inventory)
    if sharing is not None and sharing.mps is not None:
        entries += _entries(sharing.mps, Sharing.MPS, "mps", base, inventory)
    _check_overlaps(entries)

    shared_ids = {d.id for entry in entries for d in entry.devices}
    # A shared device is no longer advertised whole (the fork advertises it both ways).
    remainder = {name: [d for d in devices if d.id not in shared_ids] for name, devices in base.items()}
    _check_names(entries, remainder)

    gpus = {g.uuid: g for g in inventory.gpus}
    slices_by_gpu: dict[str, list[_Slice]] = defaultdict(list)
    for entry in entries:
        if entry.kind is Sharing.MPS:
            _refuse_mig(entry, gpus)
            for device in entry.devices:
                slices_by_gpu[device.gpu_uuid].append(_slice(entry, gpus[device.gpu_uuid]))
    for uuid, slices in slices_by_gpu.items():
        _check_mps_gpu(gpus[uuid], slices)

    devices: dict[str, list[Device]] = {name: rest for name, rest in remainder.items() if rest}
    kinds: dict[str, Sharing] = dict.fromkeys(devices, Sharing.NONE)
    fail: dict[str, bool] = dict.fromkeys(devices, False)
    # Numbered per ID prefix across the whole node, so two entries that slice one GPU to the same size never give
    # two devices one ID.
    next_replica: dict[str, int] = defaultdict(int)
    for entry in entries:
        if not entry.devices:
            continue
        out = devices.setdefault(entry.output, [])
        kinds[entry.output] = entry.kind
        fail[entry.output] = entry.fail_requests_greater_than_one
        for device in entry.devices:
            mps: MpsSlice | None = None
            prefix = device.physical_id
            if entry.kind is Sharing.MPS:
                s = _slice(entry, gpus[device.gpu_uuid])
                pipe_dir, _, shm_dir = mps_dirs(settings.mps_root, device.gpu_uuid)
                mps = MpsSlice(pipe_dir=pipe_dir, shm_dir=shm_dir, memory_limit_mib=s.memory_mib,
                               active_thread_percentage=s.percent, memory_gb=s.memory_gb)
                if s.memory_gb is not None:
                    # The fork's ID, which nos parses: `<uuid>::<memoryGB>::<n>`.
                    prefix = f"{device.physical_id}::{s.memory_gb}"
            for _ in range(entry.replicas):
                n = next_replica[prefix]
                next_replica[prefix] += 1
                out.append(_replica(device, f"{prefix}::{n}", n, mps))

    resources = [Resource(name, tuple(sorted(devs, key=_sort_key)), sharing=kinds[name],
                          fail_requests_greater_than_one=fail[name])
                 for name, devs in devices.items()]
    daemons = []
    for uuid, slices in slices_by_gpu.items():
        gpu = gpus[uuid]
        pipe_dir, log_dir, _ = mps_dirs(settings.mps_root, uuid)
        memory, percent = _request_bound(slices)
        daemons.append(MpsDaemonSpec(gpu_uuid=uuid, gpu_index=gpu.index, pipe_dir=pipe_dir, log_dir=log_dir,
                                     pinned_mem_limit_mib=memory, active_thread_percentage=percent))
    return resources, tuple(sorted(daemons, key=lambda d: d.gpu_index))
