"""The `sharing` section of the config file: time-slicing and MPS, as msgspec structs.

One schema serves both dialects users bring:

* upstream NVIDIA (`name`, `rename`, `replicas`, `devices`, `renameByDefault`, `failRequestsGreaterThanOne`): an
  MPS resource without `memoryGB` splits each selected GPU equally;
* the nebuly fork, as nos writes it (`rename: gpu-10gb`, `memoryGB: 10`, `replicas`, `devices: ["0"]`): a
  resource with `memoryGB` is a fixed-size slice, and several such resources may slice one GPU.

Checks that need only the file live here (the `__post_init__` hooks, which msgspec reports with the key path);
checks that need the node (does GPU 0 exist, do the slices fit its memory) live in `nvdp.core.plan.sharing`.

The structs follow `nvdp.core.config.schema`'s conventions (camelCase keys, unknown keys refused, every leaf optional).
They cannot import its `_Struct` base: `schema` imports this module for its `sharing` field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import msgspec

RESOURCE_DOMAIN = "nvidia.com/"
#: Kubernetes limits a qualified extended-resource name to 63 characters.
MAX_RESOURCE_NAME = 63

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*\Z")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
#: The most replicas one resource entry may ask for per device.
MAX_REPLICAS = 4096
_GPU_INDEX = re.compile(r"^[0-9]+\Z")
_MIG_INDEX = re.compile(r"^[0-9]+:[0-9]+\Z")
_GPU_UUID = re.compile(rf"^GPU-{_UUID}\Z")
# Current drivers name MIG devices `MIG-<uuid>`; older ones `MIG-GPU-<gpu uuid>/<gi>/<ci>`.
_MIG_UUID = re.compile(rf"^MIG-({_UUID}|GPU-{_UUID}/[0-9]+/[0-9]+)\Z")


class _Struct(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


def resource_name(text: str) -> str:
    """The fully qualified name of `text` (`gpu-10gb` -> `nvidia.com/gpu-10gb`), or ValueError saying why not.

    As upstream, a name without the `nvidia.com/` prefix gets it: nos writes `rename: gpu-10gb`.
    """
    full = text if text.startswith(RESOURCE_DOMAIN) else RESOURCE_DOMAIN + text
    if len(full) > MAX_RESOURCE_NAME:
        raise ValueError(f"fully-qualified resource name must be {MAX_RESOURCE_NAME} characters or less: {full}")
    short = full.removeprefix(RESOURCE_DOMAIN)
    if "/" in short:
        # Upstream prepends the prefix to `example.com/x` too and then fails on the format; say what is wrong.
        raise ValueError(f"incorrect format for resource name '{text}': only the {RESOURCE_DOMAIN} domain is served")
    if not _DNS_SUBDOMAIN.match(short):
        raise ValueError(
            f"incorrect format for resource name '{text}': '{short}' must be lower-case letters, digits, '-' "
            "and '.', starting and ending with a letter or digit")
    return full


def device_ref_kind(ref: str) -> str | None:
    """`gpu-index`, `mig-index`, `gpu-uuid`, `mig-uuid`, or None when `ref` is none of them."""
    for kind, pattern in (("gpu-index", _GPU_INDEX), ("mig-index", _MIG_INDEX), ("gpu-uuid", _GPU_UUID),
                          ("mig-uuid", _MIG_UUID)):
        if pattern.match(ref):
            return kind
    return None


@dataclass(frozen=True, slots=True)
class DeviceSelection:
    """Which devices of a resource a sharing entry takes: all (neither set), the first `count`, or `refs`."""

    count: int | None = None
    refs: tuple[str, ...] = ()

    @property
    def is_all(self) -> bool:
        return self.count is None and not self.refs

    @classmethod
    def of(cls, devices: str | int | list[int | str] | None) -> DeviceSelection:
        """The selection a checked `devices` value makes (`all` or None: every device)."""
        if isinstance(devices, int):
            return cls(count=devices)
        if isinstance(devices, list):
            # dict.fromkeys: a reference listed twice selects its device once.
            return cls(refs=tuple(dict.fromkeys(str(d) for d in devices)))
        return cls()


def _check_devices(devices: str | int | list[int | str] | None) -> str | int | list[int | str] | None:
    """Normalise `devices` (list entries become strings, as upstream keeps them) or raise ValueError."""
    if devices is None:
        return None
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices set as '{devices}' but the only valid string input is 'all'")
        return devices
    if isinstance(devices, int):
        if devices <= 0:
            raise ValueError(f"devices set as '{devices}' but a count of devices must be > 0")
        return devices
    if not devices:
        # An empty list would select nothing and advertise nothing: almost certainly a mistake.
        raise ValueError("devices is an empty list: leave it out (all devices) or list the devices to share")
    refs: list[int | str] = []
    for entry in devices:
        ref = str(entry)
        if device_ref_kind(ref) is None:
            raise ValueError(
                f"unsupported device in devices list: {entry!r}: expected a GPU index (0), a MIG index (0:1), "
                "a GPU UUID (GPU-...) or a MIG UUID (MIG-...)")
        refs.append(ref)
    return refs


class ReplicatedResource(_Struct):
    """One entry of `sharing.<timeSlicing|mps>.resources`."""

    #: The resource to share, e.g. `nvidia.com/gpu` or `nvidia.com/mig-1g.5gb`; qualified after decoding.
    name: str | None = None
    #: The name the shared devices are advertised under; qualified after decoding. Upstream ignores it; nvdp not.
    rename: str | None = None
    #: `all` (the default), a count (the first N by index) or a list of references.
    devices: str | int | list[int | str] | None = None
    replicas: int | None = None
    #: Fork dialect, MPS only: the slice's memory in GB (read as GiB, as the CUDA `G` suffix means).
    memory_gb: int | None = msgspec.field(default=None, name="memoryGB")
    #: MPS only: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of each replica. Default: the slice's share of the GPU memory.
    compute_percent: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("no resource name specified")
        self.name = resource_name(self.name)
        if self.rename is not None:
            self.rename = resource_name(self.rename)
        self.devices = _check_devices(self.devices)
        if self.replicas is None:
            raise ValueError("no replicas specified")
        if self.min_replicas is not None and self.replicas < self.min_replicas:
            raise ValueError(f"number of replicas must be >= {self.min_replicas}, got {self.replicas}")
        if self.replicas > MAX_REPLICAS:
            # The kubelet receives ListAndWatch with gRPC's 4 MiB limit (~79 000 devices): thousands of replicas
            # per GPU could never be advertised, and building them would stall the daemon.
            raise ValueError(f"number of replicas must be <= {MAX_REPLICAS}, got {self.replicas}")
        if self.memory_gb is not None and self.memory_gb < 1:
            raise ValueError(f"memoryGB must be >= 1, got {self.memory_gb}")
        if self.compute_percent is not None and not 1 <= self.compute_percent <= 100:
            raise ValueError(f"computePercent must be between 1 and 100, got {self.compute_percent}")

    #: MPS (and upstream's shared type): 1. None: the section checks it (time-slicing's floor is 2, `TimeSlicing`).
    min_replicas: ClassVar[int | None] = 1

    def selection(self) -> DeviceSelection:
        return DeviceSelection.of(self.devices)


class _ReplicatedResources(_Struct):
    rename_by_default: bool | None = None
    fail_requests_greater_than_one: bool | None = None
    resources: list[ReplicatedResource] | None = None

    def __post_init__(self) -> None:
        if not self.resources:
            raise ValueError("no resources specified")

    def output_name(self, resource: ReplicatedResource) -> str:
        """Where the shared devices of `resource` are advertised."""
        assert resource.name is not None  # checked by ReplicatedResource.__post_init__
        if resource.rename:
            return resource.rename
        if self.rename_by_default:
            return resource.name + ".shared"
        return resource.name


class TimeSlicedResource(ReplicatedResource):
    """A `sharing.timeSlicing.resources` entry: one time-sliced replica would be the GPU itself under another ID."""

    min_replicas: ClassVar[int | None] = None


class TimeSlicing(_ReplicatedResources):
    resources: list[TimeSlicedResource] | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, resource in enumerate(self.resources or ()):
            where = f"resources[{i}] ({resource.name})"
            if resource.replicas is not None and resource.replicas < 2:
                # One time-sliced replica would be the GPU itself under another ID.
                raise ValueError(f"{where}: number of replicas must be >= 2, got {resource.replicas}")
            for key, value in (("memoryGB", resource.memory_gb), ("computePercent", resource.compute_percent)):
                if value is not None:
                    raise ValueError(f"{where}: {key} applies to sharing.mps only: time-slicing enforces no limits")

    @property
    def fails_requests_greater_than_one(self) -> bool:
        return bool(self.fail_requests_greater_than_one)


class Mps(_ReplicatedResources):
    @property
    def fails_requests_greater_than_one(self) -> bool:
        # Defaults to true for MPS (as upstream and the fork): a client talks to one daemon with one set of limits.
        return True if self.fail_requests_greater_than_one is None else self.fail_requests_greater_than_one


class Sharing(_Struct):
    time_slicing: TimeSlicing | None = None
    mps: Mps | None = None
