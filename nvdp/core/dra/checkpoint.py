"""nvdp's DRA checkpoint: what it has prepared, in its own versioned format, with pure transitions.

The kubelet forgets after a restart or reboot which claims a plugin prepared and asks again, and Unprepare carries
only the claim's namespace, name and UID (the claim may be gone from the API). So nvdp writes down, per claim UID:

* `started`, before any side effect: namespace, name and the devices it is about to prepare, with the sharing each
  gets (so a crash can be rolled back: what MPS was acquired for, which GPUs' time slice may have changed);
* `completed`, after the claim's CDI spec is written and before the reply: the exact devices, request names and CDI
  IDs returned (a repeated Prepare answers from here, with no side effect), and each device's extra container edits
  (so a CDI spec lost with a tmpfs `/var/run/cdi` can be written again).

The boot ID is recorded: state from an earlier boot (time-slice settings, MPS daemons) is gone, so a checkpoint of
another boot is discarded whole. The file format (JSON):

    {"version": 1, "bootId": "<boot id>",
     "claims": {"<uid>": {"namespace": "...", "name": "...", "state": "started" | "completed",
                          "devices": [{"requestNames": [...], "pool": "...", "device": "gpu-0", "kind": "gpu",
                                       "uuid": "GPU-...", "gpuUuid": "GPU-...", "shareId": "", "adminAccess": false,
                                       "sharing": {"strategy": "MPS", ...} | null, "cdiDeviceIds": [...],
                                       "edits": {"env": [...], "mounts": [...]},
                                       "shareMemoryBytes": 0, "shareCompute": 0}]}}}

`shareMemoryBytes`/`shareCompute` (an MPS share of a share host, `nvdp.core.dra.shares`) are what the share
consumes: after a restart the accounting of the GPU's shares starts from them. A file without them (written before
shares existed) reads as 0: no share.

Unknown keys are ignored when reading (a newer nvdp of the same major version may add some); a higher `version`
is refused (the file is set aside, see `nvdp.dra.checkpoint_file`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal

import msgspec

from nvdp.core.dra.claims import ClaimPlan, DeviceEdits, DevicePlan
from nvdp.core.dra.config import MPS, TIME_SLICING, DeviceConfig
from nvdp.core.dra.types import PreparedDevice

FORMAT_VERSION = 1
STARTED: Final = "started"
COMPLETED: Final = "completed"


class CheckpointFormatError(Exception):
    """The bytes are not a checkpoint this nvdp can read."""


class _Record(msgspec.Struct, rename="camel", kw_only=True):
    pass


class SharingRecord(_Record):
    """A device's sharing as applied: strategy, time-slice interval, MPS limits."""

    strategy: str
    interval: str = ""
    active_thread_percentage: int | None = None
    pinned_memory_limit_mib: int | None = None


class DeviceRecord(_Record):
    request_names: tuple[str, ...]
    pool: str
    device: str
    #: `gpu` or `mig`.
    kind: str
    uuid: str
    #: The physical GPU (for a MIG device, its parent): where MPS and time slices apply.
    gpu_uuid: str
    share_id: str = ""
    admin_access: bool = False
    sharing: SharingRecord | None = None
    cdi_device_ids: tuple[str, ...] = ()
    edits: DeviceEdits = DeviceEdits()
    #: An MPS share of a share host: what it consumes (bytes > 0, compute units); 0 otherwise.
    share_memory_bytes: int = 0
    share_compute: int = 0


class ClaimEntry(_Record):
    namespace: str
    name: str
    state: Literal["started", "completed"]
    devices: tuple[DeviceRecord, ...] = ()


class Checkpoint(_Record):
    version: int = FORMAT_VERSION
    boot_id: str = ""
    claims: dict[str, ClaimEntry] = msgspec.field(default_factory=dict)


def fresh(boot_id: str) -> Checkpoint:
    return Checkpoint(boot_id=boot_id)


def for_boot(checkpoint: Checkpoint, boot_id: str) -> tuple[Checkpoint, bool]:
    """The checkpoint to use in this boot, and whether an earlier boot's was discarded.

    A checkpoint without a boot ID (written where none could be read) is kept and takes this one.
    """
    if checkpoint.boot_id and checkpoint.boot_id != boot_id:
        return fresh(boot_id), True
    return msgspec.structs.replace(checkpoint, boot_id=boot_id), False


def sharing_record(config: DeviceConfig, pinned_mib: int | None) -> SharingRecord | None:
    sharing = config.sharing
    if sharing is None:
        return None
    if sharing.strategy == MPS:
        mps = sharing.mps
        return SharingRecord(strategy=MPS, active_thread_percentage=mps.active_thread_percentage if mps else None,
                             pinned_memory_limit_mib=pinned_mib)
    return SharingRecord(strategy=TIME_SLICING, interval=sharing.interval)


def planned_record(plan: DevicePlan) -> DeviceRecord:
    """What `started` records for a device about to be prepared (no CDI IDs yet)."""
    node_device = plan.node_device
    return DeviceRecord(
        request_names=(plan.request_name,), pool=plan.pool, device=plan.device, kind=node_device.kind,
        uuid=node_device.uuid, gpu_uuid=node_device.gpu.uuid, share_id=plan.share_id,
        admin_access=plan.admin_access, sharing=sharing_record(plan.config, plan.mps_pinned_mib),
        share_memory_bytes=plan.share_memory_bytes, share_compute=plan.share_compute)


def started(checkpoint: Checkpoint, plan: ClaimPlan) -> Checkpoint:
    entry = ClaimEntry(namespace=plan.ref.namespace, name=plan.ref.name, state=STARTED,
                       devices=tuple(planned_record(device) for device in plan.devices))
    return _with(checkpoint, plan.ref.uid, entry)


def completed(checkpoint: Checkpoint, uid: str, devices: tuple[DeviceRecord, ...]) -> Checkpoint:
    entry = checkpoint.claims[uid]
    return _with(checkpoint, uid, msgspec.structs.replace(entry, state=COMPLETED, devices=devices))


def removed(checkpoint: Checkpoint, uid: str) -> Checkpoint:
    if uid not in checkpoint.claims:
        return checkpoint
    claims = {key: entry for key, entry in checkpoint.claims.items() if key != uid}
    return msgspec.structs.replace(checkpoint, claims=claims)


def _with(checkpoint: Checkpoint, uid: str, entry: ClaimEntry) -> Checkpoint:
    return msgspec.structs.replace(checkpoint, claims={**checkpoint.claims, uid: entry})


def prepared_devices(entry: ClaimEntry) -> tuple[PreparedDevice, ...]:
    """The answer a completed claim gives, from its entry alone."""
    return tuple(PreparedDevice(request_names=d.request_names, pool_name=d.pool, device_name=d.device,
                                cdi_device_ids=d.cdi_device_ids, share_id=d.share_id) for d in entry.devices)


def may_share(held: DeviceRecord, wanted: DeviceRecord) -> bool:
    """Whether a device held by one claim may also be prepared for another.

    Admin access never excludes anyone. Consumable capacity (both allocations carry a share ID) shares a device
    when both claims configure it alike. Otherwise both claims must ask for the same kind of sharing: MPS and MPS
    (each claim's limits apply to its own clients), or TimeSlicing with the same interval (one interval per GPU).
    """
    if held.admin_access or wanted.admin_access:
        return True
    if held.share_memory_bytes and wanted.share_memory_bytes:
        # MPS shares of a share host: each has its own limits; whether they fit together is `held_shares`' sum.
        return True
    if held.share_id and wanted.share_id:
        return held.sharing == wanted.sharing
    if held.sharing is None or wanted.sharing is None or held.sharing.strategy != wanted.sharing.strategy:
        return False
    return held.sharing.strategy == MPS or held.sharing.interval == wanted.sharing.interval


def conflict(checkpoint: Checkpoint, plan: ClaimPlan,
             in_flight: Mapping[str, tuple[DeviceRecord, ...]] | None = None) -> str | None:
    """Why `plan` may not have one of its devices, or None.

    Devices of completed claims and of claims being prepared right now (`in_flight`, by UID) count; a `started`
    entry of an earlier life does not (its claim is rolled back or cleaned up, see `nvdp.dra.prepare`).
    """
    holders: list[tuple[str, str, Iterable[DeviceRecord]]] = [
        (uid, "is already allocated to", entry.devices)
        for uid, entry in checkpoint.claims.items() if entry.state == COMPLETED and uid != plan.ref.uid]
    holders += [(uid, "is being prepared for", devices)
                for uid, devices in (in_flight or {}).items() if uid != plan.ref.uid]
    for device in plan.devices:
        wanted = planned_record(device)
        for uid, verb, records in holders:
            for held in records:
                if held.device == device.device and not may_share(held, wanted):
                    return f"requested device {device.device} {verb} different claim {uid}"
    return None


def held_shares(checkpoint: Checkpoint, plan: ClaimPlan,
                in_flight: Mapping[str, tuple[DeviceRecord, ...]] | None = None) -> dict[str, list[DeviceRecord]]:
    """Device name -> the MPS shares other claims hold on it (completed, or being prepared now), for each device of
    `plan` that is a share. Shares of the plan itself on the same device count too, before the one checked."""
    wanted = {device.device for device in plan.devices if device.share_memory_bytes}
    held: dict[str, list[DeviceRecord]] = {name: [] for name in wanted}
    sources: list[Iterable[DeviceRecord]] = [
        entry.devices for uid, entry in checkpoint.claims.items() if entry.state == COMPLETED and uid != plan.ref.uid]
    sources += [records for uid, records in (in_flight or {}).items() if uid != plan.ref.uid]
    for records in sources:
        for record in records:
            if record.share_memory_bytes and record.device in held:
                held[record.device].append(record)
    return held


def prepared_per_device(checkpoint: Checkpoint) -> dict[str, int]:
    """Device name -> how many claims hold it (completed or half-prepared): what a change of its mode waits for."""
    counts: dict[str, int] = {}
    for entry in checkpoint.claims.values():
        for device in {d.device for d in entry.devices}:
            counts[device] = counts.get(device, 0) + 1
    return counts


def prepared_shares(checkpoint: Checkpoint) -> list[tuple[str, str, str, str]]:
    """(claim UID, device, share ID, GPU UUID) of every MPS share of a completed claim, for the health stream
    (`nvdp.core.dra.shares.share_health`)."""
    return [(uid, d.device, d.share_id, d.gpu_uuid) for uid, entry in sorted(checkpoint.claims.items())
            if entry.state == COMPLETED for d in entry.devices if d.share_memory_bytes]


def timeslice_resets(checkpoint: Checkpoint, uid: str) -> tuple[str, ...]:
    """GPUs whose time slice claim `uid` set and no other claim still relies on: reset them after it goes."""
    entry = checkpoint.claims.get(uid)
    if entry is None:
        return ()
    mine = {d.gpu_uuid for d in entry.devices
            if d.kind == "gpu" and d.sharing is not None and d.sharing.strategy == TIME_SLICING}
    others = {d.gpu_uuid for key, other in checkpoint.claims.items() if key != uid for d in other.devices
              if d.sharing is not None and d.sharing.strategy == TIME_SLICING}
    return tuple(sorted(mine - others))


def encode(checkpoint: Checkpoint) -> bytes:
    return msgspec.json.encode(checkpoint)


class _Version(msgspec.Struct):
    version: int = 0


def decode(data: bytes) -> Checkpoint:
    """Read a checkpoint; `CheckpointFormatError` when the bytes are not one this version can use."""
    try:
        version = msgspec.json.decode(data, type=_Version).version
    except msgspec.DecodeError as e:
        raise CheckpointFormatError(f"not a checkpoint: {e}") from None
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(f"checkpoint format version {version}; this nvdp reads {FORMAT_VERSION}")
    try:
        return msgspec.json.decode(data, type=Checkpoint)
    except msgspec.DecodeError as e:
        raise CheckpointFormatError(f"not a checkpoint: {e}") from None
