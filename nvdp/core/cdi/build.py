"""What nvdp puts in its CDI specs, from a plain description of the driver files found on the node.

`nvdp.cdi.discover` scans the driver root and the dev root into a `DriverFiles`; the functions here turn it into
container edits: `common_edits` (control nodes, libraries, firmware, binaries, IPC sockets, hooks, env; once per spec),
`gpu_edits` (one GPU's nodes), `mig_edits` (a MIG device's parent node and capability nodes), then
`device_plugin_specs` (the device plugin's spec files) and `claim_spec` (a DRA claim's). Every host path leaves here
already moved from where nvdp saw it (the container's view) to where the host has it (`transform_edits`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nvdp.core.cdi.spec import ContainerEdits, Device, DeviceNode, Hook, Mount, Spec, transform_edits
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory
from nvdp.core.plan.model import Device as PlanDevice
from nvdp.core.plan.model import Resource

#: The device plugin's CDI vendor and classes (upstream's names, so pods and policies written for it keep working).
VENDOR = "k8s.device-plugin.nvidia.com"
GPU_CLASS, IMEX_CLASS, GDS_CLASS, MOFED_CLASS, GDRCOPY_CLASS = "gpu", "imex-channel", "gds", "mofed", "gdrcopy"
#: NVIDIA's DRA driver's per-claim kind (its vendor differs from the device plugin's: names never collide).
CLAIM_VENDOR = "k8s.gpu.nvidia.com"
CLAIM_KIND = f"{CLAIM_VENDOR}/claim"

HOOK_CREATE_SYMLINKS = "create-symlinks"
HOOK_ENABLE_CUDA_COMPAT = "enable-cuda-compat"
HOOK_UPDATE_LDCACHE = "update-ldcache"
HOOK_DISABLE_DEVICE_NODE_MODIFICATION = "disable-device-node-modification"
HOOKS = (HOOK_CREATE_SYMLINKS, HOOK_ENABLE_CUDA_COMPAT, HOOK_UPDATE_LDCACHE, HOOK_DISABLE_DEVICE_NODE_MODIFICATION)
#: `--cdi-feature-flags` values nvdp knows.
FEATURE_DISABLE_IPC = "disable-ipc-discoverer"
FEATURE_FLAGS = (FEATURE_DISABLE_IPC,)

LIBRARY_MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "rbind", "rprivate")
IPC_MOUNT_OPTIONS = ("nosuid", "nodev", "rbind", "rprivate", "noexec")
IMEX_CHANNEL_DIR = "/dev/nvidia-caps-imex-channels"
#: What the driver gives a MIG access capability node when nvidia-modprobe creates it (DeviceFileMode 0444).
MIG_CAP_MODE = 0o444


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A character device found under the dev root, as `stat` described it. `path` is the container path."""

    path: str
    major: int
    minor: int
    #: Permission bits only.
    mode: int
    gid: int = 0


@dataclass(frozen=True, slots=True)
class Library:
    """A driver library (container path) and the symlinks beside it on the host that point at it: (link, target)
    file names, e.g. ("libcuda.so.1", "libcuda.so.580.95.05"), recreated in the container by `create-symlinks`."""

    path: str
    links: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DriverFiles:
    """What `nvdp.cdi.discover` found. Paths are container paths (as under `/`); `driver_root` and `dev_root` are
    where nvdp found them, which `CdiOptions.host_driver_root` / `host_dev_root` replace in host paths."""

    driver_root: str = "/"
    dev_root: str = "/"
    driver_version: str = ""
    #: Of /dev/nvidia-modeset, /dev/nvidia-uvm-tools, /dev/nvidia-uvm, /dev/nvidiactl, those that exist.
    control_nodes: tuple[NodeInfo, ...] = ()
    #: `/dev/nvidia<minor>` by minor.
    gpu_nodes: Mapping[int, NodeInfo] = field(default_factory=dict)
    #: `/dev/nvidia-caps/nvidia-cap<minor>` by minor, those that exist.
    cap_nodes: Mapping[int, NodeInfo] = field(default_factory=dict)
    #: The `nvidia-caps` character major (/proc/devices), to describe capability nodes not created yet.
    caps_major: int | None = None
    #: `/proc/driver/nvidia-caps/mig-minors`: `gpu0/gi1/access` -> minor.
    mig_minors: Mapping[str, int] = field(default_factory=dict)
    libraries: tuple[Library, ...] = ()
    #: Directories holding `lib*.so.<driver version>`, in the order found (NVIDIA_CTK_LIBCUDA_DIR, update-ldcache).
    library_dirs: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()
    ipc_sockets: tuple[str, ...] = ()
    #: DRM nodes (`/dev/dri/cardN`, `renderDN`) by lower-case sysfs PCI address (`0000:07:00.0`).
    drm_nodes: Mapping[str, tuple[NodeInfo, ...]] = field(default_factory=dict)
    #: `/dev/dri/by-path` links by PCI address: (target as the link holds it, link path).
    drm_links: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    imex_channels: Mapping[int, NodeInfo] = field(default_factory=dict)
    gds_nodes: tuple[NodeInfo, ...] = ()
    #: /run/udev and /etc/cufile.json where they exist (mounted with the GDS device).
    gds_mounts: tuple[str, ...] = ()
    mofed_nodes: tuple[NodeInfo, ...] = ()
    gdrcopy_nodes: tuple[NodeInfo, ...] = ()
    #: What the scan could not find or read, each with where it looked (logged by the caller).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CdiOptions:
    """The settings that shape the specs (`--nvidia-cdi-hook-path`, `--cdi-disable-hooks`, ...)."""

    hook_path: str = "/usr/bin/nvidia-ctk"
    #: Hook names, or "all".
    disabled_hooks: frozenset[str] = frozenset()
    feature_flags: frozenset[str] = frozenset()
    #: The host's driver root and dev root (`--nvidia-driver-root`, `--nvidia-dev-root`).
    host_driver_root: str = "/"
    host_dev_root: str = "/"
    device_id_strategy: str = "uuid"
    imex_channel_ids: tuple[int, ...] = ()
    gds_enabled: bool = False
    mofed_enabled: bool = False
    gdrcopy_enabled: bool = False


class CdiBuildError(ValueError):
    """A device cannot be described (e.g. its MIG capability minors are unknown); the message says which and why."""


# -- pieces -----------------------------------------------------------------------------------------------------------


def _join(root: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(root or "/", path.lstrip("/")))


def _node(info: NodeInfo, dev_root: str) -> tuple[DeviceNode, tuple[int, ...]]:
    """A found node, described fully from its stat; a group that is the only way in (not world read-write) becomes
    an additional GID of the container (what NVIDIA's toolkit does; it needs CDI 0.7.0)."""
    node = DeviceNode(path=info.path, host_path=_join(dev_root, info.path), major=info.major, minor=info.minor,
                      file_mode=info.mode or None, permissions="rwm", gid=info.gid or None)
    world_rw = info.mode & 0o006 == 0o006
    return node, (() if world_rw or not info.gid else (info.gid,))


def _nodes(infos: Sequence[NodeInfo], dev_root: str) -> ContainerEdits:
    nodes: list[DeviceNode] = []
    gids: list[int] = []
    for info in infos:
        node, extra = _node(info, dev_root)
        nodes.append(node)
        gids.extend(extra)
    return ContainerEdits(device_nodes=tuple(nodes), additional_gids=tuple(dict.fromkeys(gids)))


def _host(edits: ContainerEdits, files: DriverFiles, options: CdiOptions) -> ContainerEdits:
    return transform_edits(edits, driver=(files.driver_root, options.host_driver_root),
                           dev=(files.dev_root, options.host_dev_root))


def hook_args(name: str, args: Sequence[str], hook_path: str) -> tuple[str, ...]:
    """argv of a CDI hook: `nvidia-ctk hook <name> ...` for nvidia-ctk, else `<basename> <name> ...`
    (nvidia-cdi-hook has the hooks as top-level commands)."""
    base = posixpath.basename(hook_path)
    fixed = (base, "hook") if base == "nvidia-ctk" else (base,)
    return (*fixed, name, *args)


def make_hook(name: str, args: Sequence[str], options: CdiOptions) -> Hook | None:
    """One createContainer hook through `--nvidia-cdi-hook-path`, or None when disabled (`--cdi-disable-hooks`
    names it or says `all`) or pointless (create-symlinks with no link). `args` of create-symlinks are
    `target::link` values and of update-ldcache folders: each gets its flag (`--link`, `--folder`)."""
    if name in options.disabled_hooks or "all" in options.disabled_hooks:
        return None
    if name == HOOK_CREATE_SYMLINKS and not args:
        return None
    # The hooks take their list arguments one flag each, as nvidia-ctk's CLI wants.
    if name == HOOK_CREATE_SYMLINKS:
        args = [a for link in args for a in ("--link", link)]
    elif name == HOOK_UPDATE_LDCACHE:
        args = [a for folder in args for a in ("--folder", folder)]
    return Hook(hook_name="createContainer", path=options.hook_path, args=hook_args(name, args, options.hook_path),
                env=("NVIDIA_CTK_DEBUG=false",))


def _hooks(*hooks: Hook | None) -> tuple[Hook, ...]:
    return tuple(h for h in hooks if h is not None)


def _symlinks(files: DriverFiles) -> list[str]:
    links: list[str] = []
    for lib in files.libraries:
        directory, name = posixpath.split(lib.path)
        if name.startswith("libcuda.so.") and name != "libcuda.so.1":
            # Applications dlopen("libcuda.so") although only the driver's soname link is standard.
            links.append(f"libcuda.so.1::{posixpath.join(directory, 'libcuda.so')}")
        links.extend(f"{target}::{posixpath.join(directory, link)}" for link, target in lib.links)
    return list(dict.fromkeys(links))


# -- edits ------------------------------------------------------------------------------------------------------------


def common_edits(files: DriverFiles, options: CdiOptions) -> ContainerEdits:
    """What every container given any of these devices needs once: control nodes, the driver's libraries, firmware,
    binaries, IPC sockets, the hooks, `NVIDIA_CTK_LIBCUDA_DIR` and `NVIDIA_VISIBLE_DEVICES=void` (so that a legacy
    NVIDIA hook in the same runtime does not inject GPUs a second time)."""
    nodes = _nodes(files.control_nodes, files.dev_root)
    env = []
    if files.library_dirs:
        env.append("NVIDIA_CTK_LIBCUDA_DIR=" + ":".join(files.library_dirs))
    env.append("NVIDIA_VISIBLE_DEVICES=void")
    mounts = [Mount(_join(files.driver_root, p), p, LIBRARY_MOUNT_OPTIONS)
              for p in (*(lib.path for lib in files.libraries), *files.firmware, *files.binaries)]
    if FEATURE_DISABLE_IPC not in options.feature_flags:
        mounts.extend(Mount(_join(files.driver_root, p), p, IPC_MOUNT_OPTIONS) for p in files.ipc_sockets)
    version = files.driver_version
    hooks = _hooks(
        make_hook(HOOK_CREATE_SYMLINKS, _symlinks(files), options),
        make_hook(HOOK_ENABLE_CUDA_COMPAT, [f"--host-driver-version={version}"] if version else [], options),
        make_hook(HOOK_UPDATE_LDCACHE, files.library_dirs, options) if files.library_dirs else None,
        make_hook(HOOK_DISABLE_DEVICE_NODE_MODIFICATION, [], options),
    )
    edits = ContainerEdits(env=tuple(env), device_nodes=nodes.device_nodes, mounts=tuple(dict.fromkeys(mounts)),
                           hooks=hooks, additional_gids=nodes.additional_gids)
    return _host(edits, files, options)


def _gpu_node(gpu: Gpu, files: DriverFiles) -> ContainerEdits:
    info = files.gpu_nodes.get(gpu.minor)
    if info is None:
        # Not visible to nvdp (no /dev under its dev root): the runtime stats the host's node itself.
        path = f"/dev/nvidia{gpu.minor}"
        return ContainerEdits(device_nodes=(DeviceNode(path=path, host_path=_join(files.dev_root, path)),))
    return _nodes([info], files.dev_root)


def _drm(gpu: Gpu, files: DriverFiles, options: CdiOptions) -> ContainerEdits:
    bus = sysfs_pci_address(gpu.pci_bus_id)
    edits = _nodes(files.drm_nodes.get(bus, ()), files.dev_root)
    links = [f"{target}::{link}" for target, link in files.drm_links.get(bus, ())]
    return ContainerEdits(device_nodes=edits.device_nodes, additional_gids=edits.additional_gids,
                          hooks=_hooks(make_hook(HOOK_CREATE_SYMLINKS, links, options)))


def sysfs_pci_address(pci_bus_id: str) -> str:
    """NVML's `00000000:07:00.0` as sysfs names it: `0000:07:00.0`."""
    return pci_bus_id.lower()[-12:]


def gpu_edits(gpu: Gpu, files: DriverFiles, options: CdiOptions) -> ContainerEdits:
    """One whole GPU: `/dev/nvidia<minor>`, its DRM nodes and their `/dev/dri/by-path` links."""
    return _host(_gpu_node(gpu, files).merged(_drm(gpu, files, options)), files, options)


def _cap_node(minor: int, files: DriverFiles) -> ContainerEdits:
    info = files.cap_nodes.get(minor)
    if info is not None:
        return _nodes([info], files.dev_root)
    if files.caps_major is None:
        raise CdiBuildError(f"capability node /dev/nvidia-caps/nvidia-cap{minor} does not exist and the nvidia-caps "
                            "major is unknown (/proc/devices)")
    # Fully specified, so the runtime creates it in the container without finding it on the host (the driver makes
    # the host's nodes only when something asks for them).
    path = f"/dev/nvidia-caps/nvidia-cap{minor}"
    return ContainerEdits(device_nodes=(DeviceNode(path=path, host_path=_join(files.dev_root, path), type="c",
                                                   major=files.caps_major, minor=minor, file_mode=MIG_CAP_MODE),))


def mig_edits(gpu: Gpu, mig: MigDevice, files: DriverFiles, options: CdiOptions) -> ContainerEdits:
    """A MIG device: its parent's `/dev/nvidia<minor>` and the GPU-instance and compute-instance access capability
    nodes whose minors the driver lists in mig-minors (keyed by the parent's minor). DRM nodes only for `+gfx`
    profiles."""
    parts = [_gpu_node(gpu, files)]
    for key in (f"gpu{gpu.minor}/gi{mig.gi}/access", f"gpu{gpu.minor}/gi{mig.gi}/ci{mig.ci}/access"):
        minor = files.mig_minors.get(key)
        if minor is None:
            raise CdiBuildError(f"MIG device {mig.uuid}: {key} is not in /proc/driver/nvidia-caps/mig-minors")
        parts.append(_cap_node(minor, files))
    if "gfx" in mig.profile:
        parts.append(_drm(gpu, files, options))
    return _host(parts[0].merged(*parts[1:]), files, options)


# -- the device plugin's specs ----------------------------------------------------------------------------------------


def spec_filename(kind: str) -> str:
    """`vendor-class.json`, the file name NVIDIA's tools give a spec of that kind."""
    vendor, _, cls = kind.partition("/")
    return f"{vendor}-{cls}.json"


def device_name(device: PlanDevice, device_id_strategy: str) -> str:
    """A plan device's CDI device name: its GPU or MIG UUID, or its index (`0`, `0:1`) with the index strategy.
    Replicas share their GPU's name."""
    return device.index if device_id_strategy == "index" else device.physical_id


def qualified_name(device_class: str, name: str) -> str:
    return f"{VENDOR}/{device_class}={name}"


@dataclass(frozen=True, slots=True)
class DevicePluginSpecs:
    #: File name (in the CDI root) -> spec.
    specs: dict[str, Spec]
    #: Devices or classes left out, each with why (logged by the caller).
    notes: tuple[str, ...] = ()


def _find_mig(gpu: Gpu, uuid: str) -> MigDevice | None:
    return next((m for m in gpu.mig_devices if m.uuid == uuid), None)


def _gated(cls: str, nodes: Sequence[NodeInfo], mounts: Sequence[str], files: DriverFiles, options: CdiOptions,
           what: str) -> tuple[Spec | None, str | None]:
    if not nodes:
        return None, f"{cls}: enabled but {what} not found under the dev root {files.dev_root}: no {cls} spec written"
    edits = _nodes(nodes, files.dev_root)
    edits = ContainerEdits(device_nodes=edits.device_nodes, additional_gids=edits.additional_gids,
                           mounts=tuple(Mount(_join(files.driver_root, p), p, LIBRARY_MOUNT_OPTIONS) for p in mounts))
    spec = Spec(kind=f"{VENDOR}/{cls}", devices=(Device("all", _host(edits, files, options)),),
                container_edits=ContainerEdits(env=("NVIDIA_VISIBLE_DEVICES=void",)))
    return spec, None


def device_plugin_specs(
    inventory: NodeInventory, resources: Sequence[Resource], files: DriverFiles, options: CdiOptions
) -> DevicePluginSpecs:
    """Every spec file the device plugin wants: `gpu` with each advertised GPU and MIG device once (replicas and MPS
    slices resolve to their GPU), `imex-channel` when a channel is configured and present, and `gds`, `mofed`,
    `gdrcopy` (device `all`) when enabled and their nodes exist."""
    notes: list[str] = []
    devices: dict[str, Device] = {}
    order: dict[str, tuple[int, int]] = {}
    for resource in resources:
        for planned in resource.devices:
            name = device_name(planned, options.device_id_strategy)
            if name in devices:
                continue
            gpu = inventory.gpu_by_uuid(planned.gpu_uuid)
            if gpu is None:
                notes.append(f"{name}: its GPU {planned.gpu_uuid} is not in the inventory: left out")
                continue
            try:
                if planned.mig_placement is None:
                    edits, key = gpu_edits(gpu, files, options), (gpu.index, -1)
                else:
                    mig = _find_mig(gpu, planned.physical_id)
                    if mig is None:
                        notes.append(f"{name}: MIG device {planned.physical_id} is not in the inventory: left out")
                        continue
                    edits, key = mig_edits(gpu, mig, files, options), (gpu.index, mig.index)
            except CdiBuildError as exc:
                notes.append(f"{name}: {exc}: left out")
                continue
            devices[name] = Device(name, edits)
            order[name] = key
    specs: dict[str, Spec] = {}
    if devices:
        # GPU index, then MIG index (a whole GPU, -1, first): the order of nvidia-smi and of the plan.
        ordered = tuple(devices[n] for n in sorted(devices, key=lambda n: order[n]))
        spec = Spec(kind=f"{VENDOR}/{GPU_CLASS}", devices=ordered, container_edits=common_edits(files, options))
        specs[spec_filename(spec.kind)] = spec
    if 0 in options.imex_channel_ids:
        channel = files.imex_channels.get(0)
        if channel is None:
            notes.append(f"{IMEX_CLASS}: channel 0 ({IMEX_CHANNEL_DIR}/channel0) is not a character device under the "
                         f"dev root {files.dev_root}: no {IMEX_CLASS} spec written")
        else:
            edits = _host(_nodes([channel], files.dev_root), files, options)
            spec = Spec(kind=f"{VENDOR}/{IMEX_CLASS}", devices=(Device("0", edits),),
                        container_edits=ContainerEdits(env=("NVIDIA_VISIBLE_DEVICES=void",)))
            specs[spec_filename(spec.kind)] = spec
    gated = (
        (options.gdrcopy_enabled, GDRCOPY_CLASS, files.gdrcopy_nodes, (), "/dev/gdrdrv"),
        (options.gds_enabled, GDS_CLASS, files.gds_nodes, files.gds_mounts, "/dev/nvidia-fs*"),
        (options.mofed_enabled, MOFED_CLASS, files.mofed_nodes, (), "/dev/infiniband/uverbs* or rdma_cm"),
    )
    for enabled, cls, nodes, mounts, what in gated:
        if not enabled:
            continue
        gated_spec, note = _gated(cls, nodes, mounts, files, options, what)
        if gated_spec is not None:
            specs[spec_filename(gated_spec.kind)] = gated_spec
        if note is not None:
            notes.append(note)
    return DevicePluginSpecs(specs=specs, notes=tuple(notes))


# -- DRA ---------------------------------------------------------------------------------------------------------------


def claim_spec_filename(claim_uid: str) -> str:
    """`k8s.gpu.nvidia.com-claim_<uid>.json`: a transient spec named by a never-reused id."""
    return f"{CLAIM_VENDOR}-claim_{claim_uid.replace('/', '_')}.json"


def claim_spec(claim_uid: str, devices: Sequence[tuple[str, ContainerEdits]], common: ContainerEdits) -> Spec:
    """A DRA claim's spec: one device `<claim uid>-<device name>` per prepared device, `common` once (usually
    `common_edits(...)`). The claim UID makes every name unique in the CDI root for the claim's life."""
    return Spec(kind=CLAIM_KIND, devices=tuple(Device(f"{claim_uid}-{name}", edits) for name, edits in devices),
                container_edits=common)
