"""What a GPU node has, as plain data.

The NVML adapter (`nvdp.nvml.adapter`) reads the driver once into a `NodeInventory`; everything above it (the
resource plan, Allocate responses, preferred allocation) works on these values and never imports pynvml. The
simulated node produces the same values through the same adapter, so tests exercise the real code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Device nodes a container may need besides the GPU's own `/dev/nvidia<minor>`, in the order upstream lists them.
CONTROL_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
#: IMEX channels nvdp looks for (upstream passes channel 0 only) and the directory of their device nodes.
IMEX_CHANNEL_IDS = (0,)
IMEX_CHANNELS_DIR = "/dev/nvidia-caps-imex-channels"


def imex_channel_path(channel: int) -> str:
    """The device node of IMEX channel `channel`, as the container sees it."""
    return f"{IMEX_CHANNELS_DIR}/channel{channel}"


@dataclass(frozen=True, slots=True)
class MigDevice:
    """One MIG device (a GPU instance + compute instance) carved out of a physical GPU."""

    uuid: str
    #: Enumeration index among the parent's MIG devices (NVML `GetMigDeviceHandleByIndex`); may have holes.
    index: int
    #: Profile name as NVML reports it without the `<n>c.` prefix, e.g. `1g.5gb`, `1g.10gb+me`.
    profile: str
    memory_mib: int
    gi: int
    ci: int
    #: NVML GPU-instance profile ID (`nvmlGpuInstanceProfileInfo_t.id`) and the instance's placement start and size
    #: (memory slices); NVIDIA's DRA driver names MIG devices by the first two.
    gi_profile_id: int = 0
    placement_start: int = 0
    placement_size: int = 0
    #: What the profile gives the device: streaming multiprocessors, GPU slices of its GPU instance and compute slices
    #: of its compute instance, and engines (GFD's `.multiprocessors`, `.slices.gi/.ci`, `.engines.*`; DRA capacities).
    multiprocessors: int = 0
    slices_gi: int = 0
    slices_ci: int = 0
    copy_engines: int = 0
    decoders: int = 0
    encoders: int = 0
    jpeg_engines: int = 0
    ofa_engines: int = 0


@dataclass(frozen=True, slots=True)
class Gpu:
    """One physical GPU."""

    #: NVML enumeration index: what `deviceIDStrategy: index` advertises.
    index: int
    uuid: str
    name: str
    memory_mib: int
    #: Minor number of `/dev/nvidia<minor>`; not the same as `index` on every node.
    minor: int
    #: PCI bus id as NVML reports it, e.g. `00000000:10:00.0`.
    pci_bus_id: str
    #: `"<major>.<minor>"`, e.g. `"8.0"`.
    compute_capability: str
    numa_node: int | None = None
    mig_enabled: bool = False
    #: Whether MIG mode can be switched on (NVML answers the MIG-mode query rather than NOT_SUPPORTED).
    mig_capable: bool = False
    #: NVML brand (`nvmlDeviceGetBrand`) and architecture (`nvmlDeviceGetArchitecture`) in NVIDIA's DRA driver's words,
    #: e.g. `Nvidia`, `Ampere`; "" when the driver does not say.
    brand: str = ""
    architecture: str = ""
    #: Streaming multiprocessors of the whole GPU (0 when unknown).
    multiprocessors: int = 0
    mig_devices: tuple[MigDevice, ...] = ()


@dataclass(frozen=True, slots=True)
class Link:
    """How two GPUs are connected, from NVML topology queries."""

    #: Number of active NVLinks between the two GPUs (0 when none).
    nvlinks: int = 0
    #: NVML `nvmlGpuTopologyLevel_t` of their closest common ancestor: 0 internal, 10 single switch,
    #: 20 multiple switches, 30 host bridge, 40 same NUMA node, 50 across CPUs. None when unknown.
    pcie_level: int | None = None


@dataclass(frozen=True, slots=True)
class NodeInventory:
    """A snapshot of the node: driver, GPUs (ordered by index), links between them and host device nodes."""

    driver_version: str
    cuda_driver_version: int
    gpus: tuple[Gpu, ...]
    #: Keyed by (lower index, higher index); pairs with no entry are unknown.
    links: dict[tuple[int, int], Link] = field(default_factory=dict)
    #: Those of `CONTROL_DEVICE_NODES` that exist on this node, in that order.
    control_devices: tuple[str, ...] = ()
    #: MIG capability minors from `/proc/driver/nvidia-caps/mig-minors`: `gpu0/gi1/access` -> 12, ...
    mig_minors: dict[str, int] = field(default_factory=dict)
    #: Those of `IMEX_CHANNEL_IDS` whose node exists as a character device under the dev root (or at the plain
    #: path), in that order.
    imex_channels: tuple[int, ...] = ()

    def gpu_by_uuid(self, uuid: str) -> Gpu | None:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        return None

    def link(self, a: int, b: int) -> Link:
        return self.links.get((min(a, b), max(a, b)), Link())
