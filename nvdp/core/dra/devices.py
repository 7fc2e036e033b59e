"""The devices nvdp publishes through DRA, named and attributed as NVIDIA's DRA driver publishes them.

A ResourceClaim, a DeviceClass or a CEL selector written for NVIDIA's driver (`gpu.nvidia.com`) must select the same
devices on an nvdp node, so names, attribute names and value formats follow that driver (docs/dra.md):

- a whole GPU is `gpu-<minor>`; a MIG device `gpu-<parent minor>-mig-<profile>-<GI profile id>-<placement start>`,
  the profile lower-cased with dots dropped and any other character outside `[a-z0-9-]` made `-`
  (`1g.10gb+me` -> `1g10gb-me`);
- a GPU with MIG on publishes its MIG devices only, never itself as well;
- versions are semver (`8.0` -> `8.0.0`, driver `580.82.07` -> `580.82.7`); a version that cannot be written so is
  left out rather than published wrong;
- `memory` is bytes as a Kubernetes quantity in canonical form (`40Gi`), so what the API server stores equals what
  was sent and an unchanged node never causes a write.

Everything the API limits (resource.k8s.io/v1, `ResourceSlice`) is enforced here: a device name is a DNS label,
string attribute values are cut to 64 characters, a device has at most 32 attributes and capacities together and
at most 16 taints. What cannot be published is reported in `DeviceSet.problems`, never raised.

Taints come from plain health facts (`HealthFact`), so the health loop's policy stays where it is: a fact on a whole
GPU taints every device on it, a fact on one MIG instance taints that MIG device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any

from nvdp.core.inventory import Gpu, MigDevice, NodeInventory

#: NVIDIA's DRA driver's name; DeviceClasses and CEL selectors written for it work unchanged.
DEFAULT_DRIVER = "gpu.nvidia.com"
#: The Kubernetes domain of the standard attributes (`k8s.io/dynamic-resource-allocation/deviceattribute`).
STANDARD_DOMAIN = "resource.kubernetes.io"

#: resource.k8s.io/v1 limits (`kubernetes/api:resource/v1/types.go`).
MAX_STRING_LENGTH = 64
MAX_VERSION_LENGTH = 64
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_TAINTS_PER_DEVICE = 16
MAX_DNS_LABEL = 63

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_PCI_BUS_ID = re.compile(r"^(?:[0-9a-fA-F]{4})?([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SEMVER_CORE = re.compile(r"^[0-9]+(\.[0-9]+){0,2}$")

#: A `HealthFact` on every GPU (the health tracker's node-wide scope uses the same value).
ALL_GPUS = "*"

#: Taint effects (`DeviceTaintEffect`): NoSchedule keeps new claims off a device; None only informs.
NO_SCHEDULE = "NoSchedule"
EFFECT_NONE = "None"


def is_dns_label(name: str) -> bool:
    return len(name) <= MAX_DNS_LABEL and bool(_DNS_LABEL.match(name))


def is_dns_subdomain(name: str, max_length: int = 253) -> bool:
    return len(name) <= max_length and bool(_DNS_SUBDOMAIN.match(name))


def semver(version: str) -> str | None:
    """`major[.minor[.patch]]` as semver with leading zeros dropped, or None when it is not such a version (a
    suffix such as `-beta`, four components, letters)."""
    version = version.strip()
    if not _SEMVER_CORE.match(version):
        return None
    parts = [str(int(p)) for p in version.split(".")]
    text = ".".join(parts + ["0"] * (3 - len(parts)))
    return text if len(text) <= MAX_VERSION_LENGTH else None


def cuda_version_text(cuda_driver_version: int) -> str:
    """NVML's integer CUDA driver version (`1000 * major + 10 * minor`) as semver: 12080 -> `12.8.0`."""
    return f"{cuda_driver_version // 1000}.{(cuda_driver_version % 1000) // 10}.0"


def pci_bus_id(nvml_bus_id: str) -> str | None:
    """NVML's `00000000:07:00.0` in the standard attribute's form `0000:07:00.0` (lower case, 4-digit domain)."""
    match = _PCI_BUS_ID.match(nvml_bus_id.strip())
    if match is None:
        return None
    domain, bus, device, function = match.groups()
    return f"{domain}:{bus}:{device}.{function}".lower()


def _binary_quantity(value: int) -> str:
    """A byte count in the API server's canonical form: the largest binary suffix that divides it exactly."""
    for suffix, power in (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if value and value % (1 << power) == 0:
            return f"{value >> power}{suffix}"
    return str(value)


def _decimal_quantity(value: int) -> str:
    """A count in canonical decimal form (`98`, `1k`), as the API server writes it back."""
    for suffix, power in (("E", 18), ("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3)):
        if value and value % (10**power) == 0:
            return f"{value // 10**power}{suffix}"
    return str(value)


def mig_profile_label(profile: str) -> str:
    """The profile as it appears in a MIG device's name: `1g.10gb+me` -> `1g10gb-me`."""
    lowered = profile.lower().replace(".", "")
    return re.sub(r"[^a-z0-9-]", "-", lowered)


def gpu_device_name(gpu: Gpu) -> str:
    return f"gpu-{gpu.minor}"


def mig_device_name(gpu: Gpu, mig: MigDevice) -> str:
    return f"gpu-{gpu.minor}-mig-{mig_profile_label(mig.profile)}-{mig.gi_profile_id}-{mig.placement_start}"


@dataclass(frozen=True, slots=True)
class HealthFact:
    """One thing wrong with a GPU or one MIG instance of it, as the health loop knows it."""

    #: The GPU, or `ALL_GPUS` for what concerns every GPU of the node (the health watch itself failing).
    gpu_uuid: str
    #: `(gi, ci)` of the MIG instance it concerns; None for the whole GPU (and so every device on it).
    placement: tuple[int, int] | None = None
    #: The XID that made the device unhealthy, if one did.
    xid: int | None = None
    #: The GPU fell off the bus (XID 79, or NVML says GPU_IS_LOST).
    lost: bool = False
    #: Nothing watches this GPU's health (the event set could not be registered).
    unmonitored: bool = False
    #: A fatal fault keeps new claims off the device (NoSchedule); a non-fatal one only informs (effect None).
    fatal: bool = True


@dataclass(frozen=True, slots=True)
class DraDevice:
    """One published device: its API form and what ties it to the hardware."""

    name: str
    gpu_uuid: str
    #: `(gi, ci)` for a MIG device, None for a whole GPU.
    placement: tuple[int, int] | None
    #: The `devices[]` entry of a ResourceSlice, JSON-ready.
    api: Mapping[str, Any]

    @property
    def tainted(self) -> bool:
        return bool(self.api.get("taints"))


@dataclass(frozen=True, slots=True)
class DeviceSet:
    """The devices to publish, in publishing order (GPU minor, then MIG placement), and what was left out."""

    devices: tuple[DraDevice, ...]
    #: One line per thing that could not be published as NVML reported it (a device, an attribute).
    problems: tuple[str, ...] = ()


def _string(value: str) -> dict[str, str]:
    return {"string": value[:MAX_STRING_LENGTH]}


class _Builder:
    """Collects one device's attributes and capacities, checking names and the count limit."""

    def __init__(self, device: str, problems: list[str]) -> None:
        self.device = device
        self.problems = problems
        self.attributes: dict[str, dict[str, Any]] = {}
        self.capacity: dict[str, dict[str, str]] = {}

    def _room(self, name: str) -> bool:
        if len(self.attributes) + len(self.capacity) >= MAX_ATTRIBUTES_AND_CAPACITIES:
            self.problems.append(f"{self.device}: {name} left out (at most {MAX_ATTRIBUTES_AND_CAPACITIES} "
                                 "attributes and capacities per device)")
            return False
        return True

    def string(self, name: str, value: str) -> None:
        if value and self._room(name):
            self.attributes[name] = _string(value)

    def version(self, name: str, raw: str) -> None:
        value = semver(raw)
        if value is None:
            if raw:
                self.problems.append(f"{self.device}: {name} {raw!r} is not a version; left out")
            return
        if self._room(name):
            self.attributes[name] = {"version": value}

    def integer(self, name: str, value: int | None) -> None:
        if value is not None and value >= 0 and self._room(name):
            self.attributes[name] = {"int": value}

    def quantity(self, name: str, text: str) -> None:
        if self._room(name):
            self.capacity[name] = {"value": text}

    def common(self, gpu: Gpu, inventory: NodeInventory, pcie_roots: Mapping[str, str]) -> None:
        """What a GPU and each MIG device on it share: NVIDIA's driver gives MIG devices their parent's values."""
        self.string("productName", gpu.name)
        self.string("brand", gpu.brand)
        self.string("architecture", gpu.architecture)
        self.version("cudaComputeCapability", gpu.compute_capability)
        self.version("driverVersion", inventory.driver_version)
        if inventory.cuda_driver_version > 0:
            self.version("cudaDriverVersion", cuda_version_text(inventory.cuda_driver_version))
        bus = pci_bus_id(gpu.pci_bus_id)
        if bus is None:
            self.problems.append(f"{self.device}: PCI bus ID {gpu.pci_bus_id!r} not understood; left out")
        else:
            self.string(f"{STANDARD_DOMAIN}/pciBusID", bus)
            root = pcie_roots.get(bus)
            if root:
                self.string(f"{STANDARD_DOMAIN}/pcieRoot", root)
        self.integer(f"{STANDARD_DOMAIN}/numaNode", gpu.numa_node)

    def entry(self, name: str, taints: list[dict[str, str]]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "attributes": dict(sorted(self.attributes.items()))}
        if self.capacity:
            out["capacity"] = dict(sorted(self.capacity.items()))
        if taints:
            out["taints"] = taints
        return out


def _taints(
    driver: str, facts: Iterable[HealthFact], gpu_uuid: str, placement: tuple[int, int] | None,
    problems: list[str], device: str,
) -> list[dict[str, str]]:
    """The device's taints from the facts on its GPU: a GPU-wide fact always applies, a MIG fact to its own MIG
    device and to a whole GPU (the instance is part of it)."""
    found: dict[tuple[str, str], str] = {}
    for fact in facts:
        if fact.gpu_uuid not in (gpu_uuid, ALL_GPUS):
            continue
        if fact.placement is not None and placement is not None and fact.placement != placement:
            continue
        effect = NO_SCHEDULE if fact.fatal else EFFECT_NONE
        if fact.xid is not None:
            found[(f"{driver}/xid", str(fact.xid))] = effect
        if fact.lost:
            found[(f"{driver}/gpu-lost", "")] = NO_SCHEDULE
        if fact.unmonitored:
            found[(f"{driver}/unmonitored", "")] = EFFECT_NONE
    taints = []
    for (key, value), effect in sorted(found.items(), key=lambda kv: (kv[0][0], _xid_order(kv[0][1]))):
        taint = {"key": key, "effect": effect}
        if value:
            taint["value"] = value
        taints.append(taint)
    if len(taints) > MAX_TAINTS_PER_DEVICE:
        problems.append(f"{device}: {len(taints)} taints, only {MAX_TAINTS_PER_DEVICE} published")
        # gpu-lost and unmonitored say the most; then the lowest XIDs.
        keep = [t for t in taints if not t["key"].endswith("/xid")]
        taints = keep + [t for t in taints if t["key"].endswith("/xid")][: MAX_TAINTS_PER_DEVICE - len(keep)]
    return taints


def _xid_order(value: str) -> tuple[int, str]:
    return (int(value), "") if value.isdigit() else (-1, value)


def build_devices(
    inventory: NodeInventory,
    served: Set[str],
    *,
    driver: str = DEFAULT_DRIVER,
    facts: Iterable[HealthFact] = (),
    pcie_roots: Mapping[str, str] | None = None,
) -> DeviceSet:
    """The devices of the GPUs whose UUIDs are in `served`, with taints from `facts`.

    `pcie_roots` maps a standard PCI bus ID (`0000:07:00.0`) to its PCIe root (`pci0000:00`), which only sysfs
    knows; GPUs without an entry get no `pcieRoot` attribute.
    """
    if not is_dns_subdomain(driver, MAX_DNS_LABEL):
        raise ValueError(f"DRA driver name {driver!r} is not a DNS subdomain of at most {MAX_DNS_LABEL} characters")
    roots = pcie_roots or {}
    facts = tuple(facts)
    problems: list[str] = []
    devices: list[DraDevice] = []
    seen: set[str] = set()

    def add(name: str, gpu: Gpu, placement: tuple[int, int] | None, builder: _Builder) -> None:
        if not is_dns_label(name):
            problems.append(f"{name!r} (GPU {gpu.uuid}) is not a DNS label; device not published")
            return
        if name in seen:
            problems.append(f"{name} (GPU {gpu.uuid}) named twice; only the first published")
            return
        seen.add(name)
        taints = _taints(driver, facts, gpu.uuid, placement, problems, name)
        devices.append(DraDevice(name, gpu.uuid, placement, builder.entry(name, taints)))

    for gpu in sorted(inventory.gpus, key=lambda g: (g.minor, g.index)):
        if gpu.uuid not in served:
            continue
        if not gpu.mig_enabled:
            name = gpu_device_name(gpu)
            b = _Builder(name, problems)
            b.string("type", "gpu")
            b.string("uuid", gpu.uuid)
            b.common(gpu, inventory, roots)
            b.quantity("memory", _binary_quantity(gpu.memory_mib << 20))
            add(name, gpu, None, b)
            continue
        for mig in sorted(gpu.mig_devices, key=lambda m: (m.placement_start, m.gi_profile_id, m.gi, m.ci)):
            name = mig_device_name(gpu, mig)
            b = _Builder(name, problems)
            b.string("type", "mig")
            b.string("uuid", mig.uuid)
            b.string("parentUUID", gpu.uuid)
            b.string("profile", mig.profile)
            b.common(gpu, inventory, roots)
            b.quantity("memory", _binary_quantity(mig.memory_mib << 20))
            for cap, count in (("multiprocessors", mig.multiprocessors), ("copyEngines", mig.copy_engines),
                               ("decoders", mig.decoders), ("encoders", mig.encoders),
                               ("jpegEngines", mig.jpeg_engines), ("ofaEngines", mig.ofa_engines)):
                b.quantity(cap, _decimal_quantity(count))
            # One capacity per memory slice the placement covers, so two devices on overlapping slices are told
            # apart (NVIDIA's static-MIG capacities).
            for i in range(mig.placement_start, mig.placement_start + mig.placement_size):
                b.quantity(f"memorySlice{i}", "1")
            add(name, gpu, (mig.gi, mig.ci), b)
    return DeviceSet(tuple(devices), tuple(problems))


def check_device(device: Mapping[str, Any]) -> list[str]:
    """What is wrong with one `devices[]` entry against resource.k8s.io/v1's validation (empty when nothing):
    the tests hold every built device to it."""
    problems = []
    name = str(device.get("name", ""))
    if not is_dns_label(name):
        problems.append(f"name {name!r} is not a DNS label")
    attributes = device.get("attributes") or {}
    capacity = device.get("capacity") or {}
    if len(attributes) + len(capacity) > MAX_ATTRIBUTES_AND_CAPACITIES:
        problems.append(f"{len(attributes) + len(capacity)} attributes and capacities")
    for key in [*attributes, *capacity]:
        domain, _, short = key.rpartition("/")
        if not _C_IDENTIFIER.match(short) or (domain and not is_dns_subdomain(domain, MAX_DNS_LABEL)):
            problems.append(f"attribute or capacity name {key!r}")
    for key, value in attributes.items():
        if len(value) != 1 or next(iter(value)) not in ("int", "bool", "string", "version"):
            problems.append(f"attribute {key}: exactly one of int, bool, string, version")
        elif "string" in value and len(value["string"]) > MAX_STRING_LENGTH:
            problems.append(f"attribute {key}: string longer than {MAX_STRING_LENGTH}")
        elif "version" in value and (len(value["version"]) > MAX_VERSION_LENGTH
                                     or semver(value["version"]) != value["version"]):
            problems.append(f"attribute {key}: not a semver version")
    taints = device.get("taints") or []
    if len(taints) > MAX_TAINTS_PER_DEVICE:
        problems.append(f"{len(taints)} taints")
    for taint in taints:
        domain, _, short = str(taint.get("key", "")).rpartition("/")
        if not (domain and is_dns_subdomain(domain) and _LABEL_NAME.match(short)):
            problems.append(f"taint key {taint.get('key')!r}")
        if len(str(taint.get("value", ""))) > MAX_DNS_LABEL:
            problems.append(f"taint value {taint.get('value')!r}")
        if taint.get("effect") not in (NO_SCHEDULE, EFFECT_NONE, "NoExecute"):
            problems.append(f"taint effect {taint.get('effect')!r}")
    return problems
