"""The resource plan: which kubelet resources this node advertises and which devices each one holds.

A plan is immutable. The daemon builds a new one from (config, inventory) and hands it to the servers by reference;
nothing is mutated in place, so a `ListAndWatch` or an `Allocate` never sees half an update. Health is not part of
the plan: it is a separate snapshot (`DeviceHealth`) that changes far more often than the plan does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nvdp.core.dra.shares import SharePolicy

RESOURCE_PREFIX = "nvidia.com/"


class Sharing(StrEnum):
    NONE = "none"
    TIME_SLICING = "time-slicing"
    MPS = "mps"


@dataclass(frozen=True, slots=True)
class MpsSlice:
    """What an MPS client container gets: its GPU's control daemon and its limits."""

    #: `<mpsRoot>/<gpu uuid>/pipe`: one control daemon per GPU.
    pipe_dir: str
    #: `<mpsRoot>/shm`: a dedicated tmpfs mounted at /dev/shm, so clients need no hostIPC.
    shm_dir: str
    #: Pinned device memory limit of the slice in MiB (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT).
    memory_limit_mib: int
    #: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE.
    active_thread_percentage: int
    #: Fork-style slices are declared in GB (= GiB) and advertised as `<uuid>::<memoryGB>::<n>`; None otherwise.
    memory_gb: int | None = None


@dataclass(frozen=True, slots=True)
class MpsDaemonSpec:
    """One MPS control daemon: one per MPS-shared GPU."""

    gpu_uuid: str
    gpu_index: int
    pipe_dir: str
    log_dir: str
    #: The daemon's default pinned-memory limit: the largest slice on this GPU (a client's env can only lower it).
    pinned_mem_limit_mib: int
    #: The daemon's default active thread percentage: the largest computePercent on this GPU.
    active_thread_percentage: int


@dataclass(frozen=True, slots=True)
class Device:
    """One device as the kubelet sees it: a whole GPU, a MIG device, or one replica of either."""

    #: The ID advertised on `ListAndWatch` and received in `Allocate`: a GPU or MIG UUID, `<uuid>::<n>` for a
    #: replica, `<uuid>::<memoryGB>::<n>` for a fork-style MPS slice.
    id: str
    #: The GPU or MIG UUID this device stands for (the ID without any replica annotation).
    physical_id: str
    #: What `deviceIDStrategy: index` puts in `NVIDIA_VISIBLE_DEVICES`: `"0"` for a GPU, `"0:1"` for a MIG device.
    index: str
    #: UUID and enumeration index of the physical GPU; health events arrive per physical GPU.
    gpu_uuid: str
    gpu_index: int
    #: Device nodes this device needs in the container (`/dev/nvidia<minor>`, MIG capability nodes), unprefixed.
    paths: tuple[str, ...]
    numa_node: int | None = None
    #: Replica number for shared devices, else None.
    replica: int | None = None
    #: MIG placement (gi, ci) for MIG devices, else None: an XID carrying instance ids matches only this device.
    mig_placement: tuple[int, int] | None = None
    #: Set for MPS slices.
    mps: MpsSlice | None = None

    @property
    def is_replica(self) -> bool:
        return self.replica is not None


@dataclass(frozen=True, slots=True)
class Resource:
    """One extended resource, served by its own gRPC server on its own socket."""

    name: str
    #: Ordered deterministically (GPU index, MIG index, replica number): this is the order on the wire.
    devices: tuple[Device, ...]
    sharing: Sharing = Sharing.NONE
    #: Refuse requests for more than one device of this (shared) resource.
    fail_requests_greater_than_one: bool = False
    _by_id: dict[str, Device] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {d.id: d for d in self.devices})

    @property
    def short_name(self) -> str:
        """The name after `nvidia.com/`: `gpu`, `mig-1g.5gb`, `gpu-10gb`."""
        return self.name.removeprefix(RESOURCE_PREFIX)

    @property
    def socket_name(self) -> str:
        """The socket's base name in the plugin directory, as upstream names it: `nvidia-gpu.sock`."""
        return f"nvidia-{self.short_name}.sock"

    def device(self, device_id: str) -> Device | None:
        """O(1) lookup, so Allocate never scans every device."""
        return self._by_id.get(device_id)


@dataclass(frozen=True, slots=True)
class Plan:
    """Every resource the node advertises, ordered by name, and the MPS control daemons they need."""

    resources: tuple[Resource, ...]
    #: Ordered by GPU index.
    mps_daemons: tuple[MpsDaemonSpec, ...] = ()
    #: UUIDs of the GPUs served through DRA instead (by GPU index): none of their devices is in `resources`.
    dra_gpus: tuple[str, ...] = ()
    #: (DRA device name, policy) of each DRA GPU published for MPS shares (`dra.sharing.mps`), by device name.
    dra_share_hosts: tuple[tuple[str, SharePolicy], ...] = ()

    def resource(self, name: str) -> Resource | None:
        for resource in self.resources:
            if resource.name == name:
                return resource
        return None
