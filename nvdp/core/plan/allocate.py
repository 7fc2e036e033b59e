"""Build the kubelet's Allocate response for one container, as plain data.

`allocate(resource, ids, options)` validates the requested device IDs against the resource, translates them into
what the NVIDIA container runtime understands (UUIDs or indices) and runs one small "add X to the response" step
per enabled feature (MPS slices add their control daemon's pipe directory, the shared `/dev/shm` and their
limits). The gRPC layer turns the returned `ContainerAllocation` into protobuf; nothing here imports
trio, grpclib or pynvml.

CDI strategies (`cdi-annotations`, `cdi-cri`) name the devices as CDI devices, in upstream's order: the GPUs
(`k8s.device-plugin.nvidia.com/gpu=<id>`), the IMEX channels (`.../imex-channel=<n>`), then `.../gdrcopy=all`,
`.../gds=all`, `.../mofed=all` for the features enabled. When every strategy is a CDI one, the runtime learns
nothing else from the response: no NVIDIA_VISIBLE_DEVICES, no volume mounts, no device specs (feature and MPS env
vars and MPS mounts are still returned, as upstream does).

Cost: every step is O(number of requested IDs). Device lookup goes through `Resource.device`, a dict, so Allocate
latency does not grow with the number of devices the resource advertises.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

from nvdp.core.cdi.names import GDRCOPY_CLASS, GDS_CLASS, GPU_CLASS, IMEX_CLASS, MOFED_CLASS, VENDOR, qualified_name
from nvdp.core.inventory import imex_channel_path
from nvdp.core.plan.model import Device, MpsSlice, Resource

#: The device-list strategies this module knows, in the order their steps run. The order matters: volume-mounts
#: overwrites the env var that envvar set, whichever order the config lists them in (as upstream does).
DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
CDI_STRATEGIES = ("cdi-annotations", "cdi-cri")
DEVICE_ID_STRATEGIES = ("uuid", "index")

#: The env var the NVIDIA container runtime reads to decide which GPUs to inject.
VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
#: Where the volume-mounts strategy lists devices: one empty mount per device under this directory. The runtime
#: reads the file names, which unprivileged pods cannot forge (unlike an env var they set themselves).
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
#: MPS clients and their control daemon exchange data through POSIX shared memory: nvdp mounts one dedicated tmpfs
#: here in every client (and the daemon), so client pods need no hostIPC.
MPS_SHM_CONTAINER_PATH = "/dev/shm"
#: The env var that tells the runtime which IMEX channels to inject (envvar strategy), as upstream names it.
IMEX_CHANNELS_ENV = "NVIDIA_IMEX_CHANNELS"
#: Upstream's CDI vendor for the device plugin's specs (pods and admission policies written for upstream name it),
#: the same names the spec writer defines.
CDI_VENDOR = VENDOR
cdi_name = qualified_name
#: Feature classes with one `all` device each, in upstream's order, with the option that enables each.
CDI_FEATURE_CLASSES = ((GDRCOPY_CLASS, "gdrcopy_enabled"), (GDS_CLASS, "gds_enabled"), (MOFED_CLASS, "mofed_enabled"))


@dataclass(frozen=True, slots=True)
class AllocateOptions:
    """How Allocate responses are built; one value per resource server, derived from the config."""

    #: Any of "envvar", "volume-mounts", "cdi-annotations", "cdi-cri".
    device_list_strategy: tuple[str, ...] = ("envvar",)
    #: "uuid" or "index".
    device_id_strategy: str = "uuid"
    #: Also hand the kubelet the device nodes (needed with the static CPU manager, which re-creates containers).
    pass_device_specs: bool = False
    #: Host root under which the device nodes of `DeviceSpec.host_path` live, e.g. `/run/nvidia/driver`.
    dev_root: str = "/"
    #: Those of /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools, /dev/nvidia-modeset that exist, in that order.
    control_devices: tuple[str, ...] = ()
    #: Set NVIDIA_GDRCOPY / NVIDIA_GDS / NVIDIA_MOFED to "enabled".
    gdrcopy_enabled: bool = False
    gds_enabled: bool = False
    mofed_enabled: bool = False
    #: Key prefix of the `cdi-annotations` annotation (`--cdi-annotation-prefix`).
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    #: IMEX channels every container gets (requested and present on the node: `Plan.imex_channels`).
    imex_channels: tuple[int, ...] = ()
    #: Feature classes (`gdrcopy`, `gds`, `mofed`) enabled but without a CDI spec (nothing of theirs on the node):
    #: left out of the CDI names, as upstream leaves out a class whose spec would be empty.
    cdi_classes_without_spec: tuple[str, ...] = ()

    @property
    def any_cdi(self) -> bool:
        return any(s in CDI_STRATEGIES for s in self.device_list_strategy)

    @property
    def all_cdi(self) -> bool:
        return all(s in CDI_STRATEGIES for s in self.device_list_strategy)


@dataclass(frozen=True, slots=True)
class Mount:
    container_path: str
    host_path: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    container_path: str
    host_path: str
    permissions: str = "rw"


@dataclass(frozen=True, slots=True)
class ContainerAllocation:
    """One `ContainerAllocateResponse`. Dict and tuple orders are deterministic: they are the wire order."""

    envs: dict[str, str]
    mounts: tuple[Mount, ...]
    device_specs: tuple[DeviceSpec, ...]
    annotations: dict[str, str]
    #: Fully-qualified CDI device names for the `cdi-cri` strategy (`ContainerAllocateResponse.cdi_devices`).
    cdi_devices: tuple[str, ...] = ()
    #: Fully-qualified CDI device names for the `cdi-annotations` strategy. The gRPC layer puts them in one annotation
    #: `<cdi_annotation_prefix>nvidia-device-plugin_<uuid4>`, a fresh uuid4 per response (as upstream), so this
    #: value stays cacheable and the key does not.
    cdi_annotation_names: tuple[str, ...] = ()
    cdi_annotation_prefix: str = "cdi.k8s.io/"


class AllocationError(Exception):
    """The request cannot be served. The message is shown to users by the kubelet, so it names the resource."""


def allocate(resource: Resource, device_ids: Sequence[str], options: AllocateOptions) -> ContainerAllocation:
    """Validate `device_ids` for `resource` and build the container's Allocate response."""
    devices = _validate_request(resource, device_ids)
    _check_options(resource, options)
    _check_mps(resource, devices)
    ids = _translate(devices, options.device_id_strategy, resource)

    response = _ResponseBuilder()
    # One step per feature, each independent of the others except where noted; a new feature is one more step.
    if options.any_cdi:
        _add_cdi_devices(response, ids, options)
    _add_feature_envs(response, options)
    if not options.all_cdi:
        # With CDI alone the runtime takes every device from the CDI names; anything below would inject them twice.
        if "envvar" in options.device_list_strategy:
            _add_visible_devices_env(response, ids, options.imex_channels)
        if "volume-mounts" in options.device_list_strategy:
            # Runs after envvar on purpose: its NVIDIA_VISIBLE_DEVICES value must win when both are enabled.
            _add_volume_mounts(response, ids, options.imex_channels)
    _add_mps(response, devices)
    if options.pass_device_specs and not options.all_cdi:
        _add_device_specs(response, devices, options)
    return response.build()


def translate_ids(resource: Resource, device_ids: Sequence[str], strategy: str) -> list[str]:
    """The IDs the container runtime sees for `device_ids`: request order kept, duplicates dropped.

    Two replicas of one GPU (`GPU-x::0`, `GPU-x::1`) become a single `GPU-x` (or a single index), because the
    runtime injects a GPU once however many replicas of it a container holds.
    """
    return _translate(_lookup(resource, device_ids), strategy, resource)


# --- validation -------------------------------------------------------------------------------------------------


def _prefix(resource: Resource) -> str:
    return f'invalid allocation request for "{resource.name}": '


#: At most this many IDs are named in an error: a request of thousands of unknown IDs must not make a message of
#: hundreds of kB (grpcio clients refuse trailers over 16 kB, and encoding them stalls the server).
MAX_IDS_NAMED = 10
#: An ID named in an error or a log is cut to this many characters (real IDs are under 60: `GPU-<uuid>::<n>`).
MAX_ID_CHARS = 64
#: Characters an ID may show as they are; anything else (a newline, a quote, a comma, non-ASCII) gets it quoted.
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/@+=")


def show_id(device_id: str) -> str:
    """`device_id` as it may appear in an error or a log line: at most MAX_ID_CHARS of it, escaped.

    A plain ID shows as it is; any other is quoted with every control, quote, backslash and non-ASCII character
    escaped, so that an ID can neither forge a log line nor pass for two IDs. Costs O(MAX_ID_CHARS), whatever the
    ID's length.
    """
    head = device_id[:MAX_ID_CHARS]
    cut = f"... ({len(device_id)} characters)" if len(device_id) > MAX_ID_CHARS else ""
    if head and _PLAIN.issuperset(head):
        return head + cut
    escaped = head.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"{cut}'


def describe_ids(ids: Sequence[str]) -> str:
    """`a, b, c` for the first MAX_IDS_NAMED distinct IDs, then `and N more`; each as `show_id` shows it.

    The text is bounded (about MAX_IDS_NAMED x (4 x MAX_ID_CHARS + 30) characters) and the cost is linear in the
    IDs' total length (one hash each).
    """
    unique = list(dict.fromkeys(ids))
    shown = ", ".join(show_id(i) for i in unique[:MAX_IDS_NAMED])
    rest = len(unique) - MAX_IDS_NAMED
    return f"{shown} and {rest} more" if rest > 0 else shown


def split_known(resource: Resource, device_ids: Sequence[str]) -> tuple[list[Device], list[str]]:
    """(the devices of the IDs the resource has, in request order; the IDs it does not have), in one pass."""
    devices: list[Device] = []
    unknown: list[str] = []
    for device_id in device_ids:
        device = resource.device(device_id)
        if device is None:
            unknown.append(device_id)
        else:
            devices.append(device)
    return devices, unknown


def _lookup(resource: Resource, device_ids: Sequence[str]) -> list[Device]:
    """The devices for `device_ids`, in request order; names every unknown ID, not just the first."""
    devices, unknown = split_known(resource, device_ids)
    if unknown:
        noun = "unknown device" if len(unknown) == 1 else "unknown devices"
        raise AllocationError(_prefix(resource) + f"{noun}: {describe_ids(unknown)}")
    return devices


def _validate_request(resource: Resource, device_ids: Sequence[str]) -> list[Device]:
    if not device_ids:
        # The kubelet never sends this; if something does, an empty env var would silently hide every GPU.
        raise AllocationError(_prefix(resource) + "no devices requested")
    devices = _lookup(resource, device_ids)
    if resource.fail_requests_greater_than_one and len(device_ids) > 1 and any(d.is_replica for d in devices):
        # Worded as the upstream README documents it, since users search for that text.
        raise AllocationError(
            f"request for '{resource.name}: {len(device_ids)}' too large: "
            "maximum request size for shared resources is 1"
        )
    return devices


def _check_options(resource: Resource, options: AllocateOptions) -> None:
    # The config layer rejects these long before an Allocate; reaching here is a bug, so fail loudly rather than
    # hand a container an empty or partial GPU list.
    unknown = [s for s in options.device_list_strategy if s not in DEVICE_LIST_STRATEGIES]
    if unknown:
        raise AllocationError(_prefix(resource) + f"unsupported device list strategy: {', '.join(unknown)}")
    if not options.device_list_strategy:
        raise AllocationError(_prefix(resource) + "no device list strategy configured")
    if options.device_id_strategy not in DEVICE_ID_STRATEGIES:
        raise AllocationError(_prefix(resource) + f"unsupported device ID strategy: {options.device_id_strategy!r}")


def _check_mps(resource: Resource, devices: Sequence[Device]) -> None:
    if not any(d.mps is not None for d in devices):
        return
    gpus = sorted({d.gpu_index for d in devices})
    if len(gpus) > 1:
        # Always, whatever failRequestsGreaterThanOne says: a CUDA process reaches exactly one MPS control daemon
        # (one CUDA_MPS_PIPE_DIRECTORY), and nvdp runs one daemon per GPU.
        raise AllocationError(
            _prefix(resource) + f"MPS slices of several GPUs ({', '.join(f'GPU {g}' for g in gpus)}) cannot go "
            "to one container: an MPS client talks to one GPU's control daemon; request slices of one GPU")


def _translate(devices: Sequence[Device], strategy: str, resource: Resource) -> list[str]:
    if strategy == "uuid":
        ids = (d.physical_id for d in devices)
    elif strategy == "index":
        ids = (d.index for d in devices)
    else:
        raise AllocationError(_prefix(resource) + f"unsupported device ID strategy: {strategy!r}")
    # dict.fromkeys de-duplicates and keeps first-seen order.
    return list(dict.fromkeys(ids))


# --- response steps ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _ResponseBuilder:
    """Mutable while the steps run; frozen into a `ContainerAllocation` at the end."""

    envs: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    device_specs: list[DeviceSpec] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    cdi_devices: tuple[str, ...] = ()
    cdi_annotation_names: tuple[str, ...] = ()
    cdi_annotation_prefix: str = "cdi.k8s.io/"

    def build(self) -> ContainerAllocation:
        return ContainerAllocation(
            envs=dict(self.envs),
            mounts=tuple(self.mounts),
            device_specs=tuple(self.device_specs),
            annotations=dict(self.annotations),
            cdi_devices=self.cdi_devices,
            cdi_annotation_names=self.cdi_annotation_names,
            cdi_annotation_prefix=self.cdi_annotation_prefix,
        )


def cdi_device_names(ids: Sequence[str], options: AllocateOptions) -> tuple[str, ...]:
    """The CDI devices for a container holding `ids` (translated IDs), in upstream's order."""
    names = [cdi_name(GPU_CLASS, device_id) for device_id in ids]
    if IMEX_CLASS not in options.cdi_classes_without_spec:
        names += [cdi_name(IMEX_CLASS, str(channel)) for channel in options.imex_channels]
    names += [cdi_name(cdi_class, "all") for cdi_class, enabled in CDI_FEATURE_CLASSES
              if getattr(options, enabled) and cdi_class not in options.cdi_classes_without_spec]
    return tuple(names)


def _add_cdi_devices(response: _ResponseBuilder, ids: Sequence[str], options: AllocateOptions) -> None:
    names = cdi_device_names(ids, options)
    # Both strategies listed: both fields, as upstream does (a runtime that reads both injects each device once).
    if "cdi-annotations" in options.device_list_strategy:
        response.cdi_annotation_names = names
        response.cdi_annotation_prefix = options.cdi_annotation_prefix
    if "cdi-cri" in options.device_list_strategy:
        response.cdi_devices = names


def _add_feature_envs(response: _ResponseBuilder, options: AllocateOptions) -> None:
    """Ask the runtime to add GPUDirect RDMA / Storage pieces; fixed order so the env map is deterministic."""
    if options.gdrcopy_enabled:
        response.envs["NVIDIA_GDRCOPY"] = "enabled"
    if options.gds_enabled:
        response.envs["NVIDIA_GDS"] = "enabled"
    if options.mofed_enabled:
        response.envs["NVIDIA_MOFED"] = "enabled"


def _add_visible_devices_env(response: _ResponseBuilder, ids: Sequence[str], imex_channels: Sequence[int]) -> None:
    response.envs[VISIBLE_DEVICES_ENV] = ",".join(ids)
    if imex_channels:
        response.envs[IMEX_CHANNELS_ENV] = ",".join(str(c) for c in imex_channels)


def _add_volume_mounts(response: _ResponseBuilder, ids: Sequence[str], imex_channels: Sequence[int]) -> None:
    # The env var now points the runtime at the directory; the device list is the set of file names in it.
    response.envs[VISIBLE_DEVICES_ENV] = VOLUME_MOUNTS_ROOT
    for device_id in ids:
        response.mounts.append(Mount(container_path=f"{VOLUME_MOUNTS_ROOT}/{device_id}", host_path="/dev/null"))
    # IMEX channels are listed the same way, in their own subdirectory.
    for channel in imex_channels:
        response.mounts.append(Mount(container_path=f"{VOLUME_MOUNTS_ROOT}/imex/{channel}", host_path="/dev/null"))


def _add_mps(response: _ResponseBuilder, devices: Sequence[Device]) -> None:
    """Point the container at its GPU's control daemon and set its limits; a no-op for devices without MPS."""
    # De-duplicated by ID: a repeated ID must not double the limits.
    slices: list[MpsSlice] = [d.mps for d in {d.id: d for d in devices}.values() if d.mps is not None]
    if not slices:
        return
    # _check_mps made sure every slice is of one GPU: one pipe directory, one shm.
    pipe_dir, shm_dir = slices[0].pipe_dir, slices[0].shm_dir
    response.envs["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
    # Ordinal 0: the container sees its one GPU as device 0, whatever the host index (the fork writes the host
    # index, which leaves every GPU but 0 unlimited). Several slices of one GPU in one request add up.
    gb = [s.memory_gb for s in slices]
    if all(g is not None for g in gb):
        limit = f"0={sum(g for g in gb if g is not None)}G"
    else:
        limit = f"0={sum(s.memory_limit_mib for s in slices)}M"
    response.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = limit
    response.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(min(100, sum(s.active_thread_percentage
                                                                          for s in slices)))
    # The same host path inside the container: the daemon and every client agree on one path.
    response.mounts.append(Mount(container_path=pipe_dir, host_path=pipe_dir))
    response.mounts.append(Mount(container_path=MPS_SHM_CONTAINER_PATH, host_path=shm_dir))


def _add_device_specs(response: _ResponseBuilder, devices: Sequence[Device], options: AllocateOptions) -> None:
    paths = [*options.control_devices, *(p for d in devices for p in d.paths),
             *(imex_channel_path(c) for c in options.imex_channels)]
    # Deliberate fix over upstream: de-duplicate (keeping first-seen order). Upstream repeats /dev/nvidia<N> once
    # per replica, so a container holding two replicas of one GPU would get the same device node twice; it buys
    # nothing and some runtimes reject or warn about duplicate device entries.
    for path in dict.fromkeys(paths):
        response.device_specs.append(
            DeviceSpec(container_path=path, host_path=host_device_path(options.dev_root, path), permissions="rw")
        )


def host_device_path(dev_root: str, path: str) -> str:
    """`path` (absolute, as seen in the container) under the host's `dev_root`, like Go's `filepath.Join`.

    `os.path.join` would discard `dev_root` because `path` is absolute, so the leading slash is stripped first.
    """
    return posixpath.normpath(posixpath.join(dev_root or "/", path.lstrip("/")))
