"""The simulated node: its YAML schema, validation, and the state file the fake `libnvidia-ml.so.1` reads.

The YAML is what people write (docs/simulation.md); the state file is a line format simple enough for C's `sscanf`.
Every check that the fake library would otherwise trip over at `nvmlInit` time is done here, where the error can
name the file and the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec

DEFAULT_CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")

#: NVML's `nvmlGpuTopologyLevel_t` values.
TOPOLOGY_LEVELS = (0, 10, 20, 30, 40, 50)

#: NVML allows at most this many NVLinks per GPU (`NVML_NVLINK_MAX_LINKS`).
MAX_NVLINKS_PER_GPU = 36

_PROFILE = re.compile(r"^(?P<slices>[1-8])g\.(?P<gb>\d+)gb(?P<attrs>[+-][a-z]+(?:\.[a-z]+)*)?$")
_PCI_BUS_ID = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_COMPUTE_CAPABILITY = re.compile(r"^\d+\.\d+$")
_NO_SPACE = re.compile(r"^\S+$")

# NVML GPU-instance profile ids (`NVML_GPU_INSTANCE_PROFILE_*`), keyed by (slices, attribute suffix). The fake
# serves each profile's name under its id, so the adapter reads profiles the way it does on real hardware.
_PROFILE_IDS: dict[tuple[int, str], int] = {
    (1, ""): 0x0,
    (2, ""): 0x1,
    (3, ""): 0x2,
    (4, ""): 0x3,
    (7, ""): 0x4,
    (8, ""): 0x5,
    (6, ""): 0x6,
    (1, "+me"): 0x7,
    (2, "+me"): 0x8,
    (1, "+gfx"): 0xA,
    (2, "+gfx"): 0xB,
    (4, "+gfx"): 0xC,
    (1, "-me"): 0xD,
    (2, "-me"): 0xE,
    (1, "+me.all"): 0xF,
    (2, "+me.all"): 0x10,
    (3, "+gfx"): 0x11,
}
#: The 1-slice profile with twice the memory (`1g.10gb` next to `1g.5gb` on an A100 80GB is `1g.10gb` vs `1g.20gb`).
_PROFILE_1_SLICE_REV2 = 0x9


class SimNodeError(ValueError):
    """The simulated-node YAML is invalid; the message names the file, the key path and the offending value."""


class SimMigDevice(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, frozen=True):
    uuid: str
    #: `<slices>g.<GB>gb[+attr|-attr]`, e.g. `1g.5gb`, `1g.10gb+me`.
    profile: str
    memory_mib: int = msgspec.field(name="memoryMiB")
    gi: int
    ci: int
    #: Slot in the parent's MIG index space (`GetMigDeviceHandleByIndex`); defaults to the list position, set it
    #: to leave holes like a destroyed instance does.
    index: int | None = None
    #: What NVML reports for the device's profile (`nvmlDeviceGetAttributes`); unset: the parent product's real
    #: values (`mig_defaults`), e.g. an A100's 1g.5gb has 14 SMs, 1 copy engine, no decoder.
    multiprocessors: int | None = None
    compute_slices: int | None = None
    copy_engines: int | None = None
    decoders: int | None = None
    encoders: int | None = None
    jpeg_engines: int | None = None
    ofa_engines: int | None = None
    #: GPU-instance placement (memory slices); unset: packed in list order, each aligned to its size.
    placement_start: int | None = None


class SimGpu(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, frozen=True):
    uuid: str
    name: str
    memory_mib: int = msgspec.field(name="memoryMiB")
    compute_capability: str
    pci_bus_id: str
    minor_number: int
    #: None: NVML answers NOT_SUPPORTED and sysfs says -1, as on single-socket or virtualised hosts.
    numa_node: int | None = None
    mig_enabled: bool = False
    mig_devices: tuple[SimMigDevice, ...] = ()
    # Extras for fault and edge-case tests.
    mig_capable: bool = True
    max_mig_devices: int = 7
    events_supported: bool = True
    compute_mode: int = 0
    #: Lost from the start: every query on it answers GPU_IS_LOST.
    lost: bool = False
    #: NVML brand and architecture names (`Nvidia`, `Ampere`: NVML_BRAND_*, NVML_DEVICE_ARCH_* in words) and SMs;
    #: unset: derived from the name and compute capability (`gpu_defaults`). `none` for brand makes NVML answer
    #: NOT_SUPPORTED for brand, architecture and SMs, as an old driver does.
    brand: str | None = None
    architecture: str | None = None
    multiprocessors: int | None = None
    #: PCI class in sysfs: 0x030200 (3D controller, compute) or 0x030000 (VGA, graphics).
    pci_class: int = 0x030200


class SimNode(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, frozen=True):
    driver_version: str
    cuda_driver_version: int
    events_file: str | None = None
    control_devices: tuple[str, ...] = DEFAULT_CONTROL_DEVICES
    #: IMEX channels whose device node exists (`/dev/nvidia-caps-imex-channels/channel<N>`); upstream uses 0 only.
    imex_channels: tuple[int, ...] = ()
    gpus: tuple[SimGpu, ...] = ()
    #: `[gpu index, gpu index, number of NVLinks]`.
    nvlinks: tuple[tuple[int, int, int], ...] = ()
    #: `[gpu index, gpu index, NVML topology level or null for NOT_SUPPORTED]`; unlisted pairs get 40 (same NUMA
    #: node) or 50 (across CPUs).
    topology: tuple[tuple[int, int, int | None], ...] = ()
    #: Make `nvmlInit` fail with this NVML return code.
    init_error: int | None = None
    #: DMI product name (`/sys/class/dmi/id/product_name`): GFD's `nvidia.com/gpu.machine`; null: no such file.
    machine: str | None = "Simulated GPU Node"


#: NVML_BRAND_* and NVML_DEVICE_ARCH_* by the names NVIDIA's DRA driver and nvdp's inventory use.
BRANDS = {"Unknown": 0, "Quadro": 1, "Tesla": 2, "NVS": 3, "GRID": 4, "GeForce": 5, "Titan": 6, "VApps": 7, "VPC": 8,
          "VCS": 9, "VWS": 10, "CloudGaming": 11, "QuadroRTX": 12, "NvidiaRTX": 13, "Nvidia": 14, "GeForceRTX": 15,
          "TitanRTX": 16}
ARCHITECTURES = {"Kepler": 2, "Maxwell": 3, "Pascal": 4, "Volta": 5, "Turing": 6, "Ampere": 7, "Ada": 8, "Hopper": 9,
                 "Blackwell": 10, "Rubin": 13}

#: Streaming multiprocessors of whole GPUs by a word of their product name, and per MIG slice (7-slice profiles
#: use fewer than 7 slices' worth: some SMs are kept back).
_PRODUCT_SMS = (("A100", 108), ("A30", 56), ("H100 PCIe", 114), ("H100", 132), ("H200", 132), ("H20", 78),
                ("GH200", 132), ("B200", 148), ("V100", 80), ("T4", 40), ("L40S", 142), ("L40", 142), ("L4", 58),
                ("A10", 72))
_SLICE_SMS = (("A100", 14, 98), ("A30", 14, 56), ("H100", 16, 132), ("H200", 16, 132), ("H20", 10, 78),
              ("GH200", 16, 132), ("B200", 18, 148))


def architecture_of(compute_capability: str) -> str:
    major, _, minor = compute_capability.partition(".")
    if major == "7":
        return "Volta" if int(minor or 0) < 5 else "Turing"
    if major == "8":
        return "Ada" if int(minor or 0) >= 9 else "Ampere"
    return {"3": "Kepler", "5": "Maxwell", "6": "Pascal", "9": "Hopper", "10": "Blackwell", "12": "Blackwell",
            "13": "Rubin"}.get(major, "Unknown")


def gpu_defaults(gpu: SimGpu) -> tuple[str, str, int]:
    """(brand, architecture, SMs) as NVML reports them for this product, unless the YAML says otherwise."""
    sms = next((n for word, n in _PRODUCT_SMS if word in gpu.name), 0)
    return (gpu.brand or "Nvidia", gpu.architecture or architecture_of(gpu.compute_capability),
            gpu.multiprocessors if gpu.multiprocessors is not None else sms)


def mig_defaults(gpu: SimGpu, mig: SimMigDevice) -> tuple[int, ...]:
    """(SMs, compute slices, copy engines, decoders, encoders, JPEG, OFA) of a MIG device, from its profile on its
    product as NVIDIA documents them (A100 1g.5gb: 14 SMs, 1 CE; `+me` adds the media engines)."""
    match = _PROFILE.match(mig.profile)
    assert match is not None  # validated
    slices, attrs = int(match["slices"]), match["attrs"] or ""
    per_slice, full = next(((s, f) for word, s, f in _SLICE_SMS if word in gpu.name), (14, 98))
    sms = full if slices >= 7 else per_slice * slices
    media = slices >= 7 or "+me" in attrs
    decoders = 5 if slices >= 7 else (1 if "+me" in attrs else slices // 2 + (slices == 3))
    given = (mig.multiprocessors, mig.compute_slices, mig.copy_engines, mig.decoders, mig.encoders, mig.jpeg_engines,
             mig.ofa_engines)
    derived = (sms, slices, slices, decoders, 0, int(media), int(media))
    return tuple(d if g is None else g for g, d in zip(given, derived, strict=True))


def _placement_size(profile: str) -> int:
    """Memory slices a GPU instance of this profile occupies (3 and 7 compute slices round up to 4 and 8)."""
    match = _PROFILE.match(profile)
    assert match is not None  # validated
    return {3: 4, 7: 8}.get(int(match["slices"]), int(match["slices"]))


def placements(gpu: SimGpu) -> dict[int, tuple[int, int]]:
    """GI id -> (placement start, size): as given, else packed in list order, each aligned to its size."""
    cursor = 0
    found: dict[int, tuple[int, int]] = {}
    for mig in gpu.mig_devices:
        if mig.gi in found:
            continue
        size = _placement_size(mig.profile)
        start = mig.placement_start if mig.placement_start is not None else -(-cursor // size) * size
        found[mig.gi] = (start, size)
        cursor = max(cursor, start + size)
    return found


def _lookup(raw: Any, path: str) -> Any:
    """Follows a msgspec error path like `$.gpus[0].minorNumber` through the raw YAML data."""
    value = raw
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path.removeprefix("$")):
        try:
            value = value[name] if name else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _fail(source: str, path: str, value: Any, problem: str) -> SimNodeError:
    return SimNodeError(f"{source}: {path}: {problem} (value: {value!r})")


def _json_or_none(text: str) -> Any:
    """The document, if it is a JSON object (the benchmark writes its nodes so); None to parse it as YAML."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None  # YAML's flow style is not always JSON: let the YAML parser judge it


def parse_node(text: str, source: str = "<string>") -> SimNode:
    """Parses and validates simulated-node YAML; `source` names it in errors."""
    raw = _json_or_none(text)
    if raw is None:
        import yaml  # only for a node that is not written as JSON (JSON is YAML too): it costs ~10 ms to import

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SimNodeError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise _fail(source, "$", raw, "expected a mapping at the top level")
    try:
        node = msgspec.convert(raw, SimNode)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r" - at `(\$[^`]*)`$", message)
        path = match.group(1) if match else "$"
        problem = message[: match.start()] if match else message
        hint = ""
        if isinstance(_lookup(raw, path), float):
            # YAML 1.1 reads 8.0 and 00000000:10:00.0 (base 60!) as floats.
            hint = "; quote it"
        raise _fail(source, path, _lookup(raw, path), problem + hint) from None
    _validate(node, source)
    return node


def load_node(path: Path) -> SimNode:
    """Reads and validates a simulated-node YAML file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SimNodeError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_node(text, str(path))


def profile_id(profile: str, memory_mib: int, siblings: dict[str, int]) -> int:
    """NVML's GPU-instance profile id for a profile name; `siblings` maps this GPU's profile names to memory."""
    match = _PROFILE.match(profile)
    if match is None:
        raise ValueError("not a MIG profile name like 1g.5gb or 1g.10gb+me")
    slices, attrs = int(match["slices"]), match["attrs"] or ""
    if slices == 1 and not attrs:
        plain_1g = [mem for name, mem in siblings.items() if re.fullmatch(r"1g\.\d+gb", name) and name != profile]
        if any(mem < memory_mib for mem in plain_1g):
            return _PROFILE_1_SLICE_REV2
    try:
        return _PROFILE_IDS[(slices, attrs)]
    except KeyError:
        raise ValueError(f"NVML has no {slices}-slice profile with attributes {attrs!r}") from None


def _validate(node: SimNode, source: str) -> None:
    def check(ok: bool, path: str, value: Any, problem: str) -> None:
        if not ok:
            raise _fail(source, path, value, problem)

    check(bool(_NO_SPACE.match(node.driver_version)), "$.driverVersion", node.driver_version, "must be one word")
    check(node.cuda_driver_version > 0, "$.cudaDriverVersion", node.cuda_driver_version, "must be positive")
    check(
        node.init_error is None or 0 < node.init_error <= 999,
        "$.initError",
        node.init_error,
        "must be a non-zero NVML return code",
    )
    for i, dev in enumerate(node.control_devices):
        check(dev.startswith("/dev/") and " " not in dev, f"$.controlDevices[{i}]", dev, "must be a /dev path")
    for i, channel in enumerate(node.imex_channels):
        # The driver creates at most 2048 channels (NVreg_ImexChannelCount); 0 is the one upstream passes.
        check(0 <= channel < 2048, f"$.imexChannels[{i}]", channel, "must be a channel number, 0 to 2047")

    seen_uuids: dict[str, str] = {}
    seen_minors: dict[int, str] = {}
    for g, gpu in enumerate(node.gpus):
        at = f"$.gpus[{g}]"
        check(bool(_NO_SPACE.match(gpu.uuid)), f"{at}.uuid", gpu.uuid, "must be one word")
        check(gpu.uuid not in seen_uuids, f"{at}.uuid", gpu.uuid, f"duplicate of {seen_uuids.get(gpu.uuid)}")
        seen_uuids[gpu.uuid] = f"{at}.uuid"
        check(gpu.name.strip() != "" and "\n" not in gpu.name, f"{at}.name", gpu.name, "must be one non-empty line")
        check(gpu.memory_mib > 0, f"{at}.memoryMiB", gpu.memory_mib, "must be positive")
        check(
            bool(_COMPUTE_CAPABILITY.match(gpu.compute_capability)),
            f"{at}.computeCapability",
            gpu.compute_capability,
            'must look like "8.0"',
        )
        check(
            bool(_PCI_BUS_ID.match(gpu.pci_bus_id)),
            f"{at}.pciBusId",
            gpu.pci_bus_id,
            'must look like "00000000:10:00.0"',
        )
        check(gpu.minor_number >= 0, f"{at}.minorNumber", gpu.minor_number, "must not be negative")
        check(
            gpu.minor_number not in seen_minors,
            f"{at}.minorNumber",
            gpu.minor_number,
            f"duplicate of {seen_minors.get(gpu.minor_number)}",
        )
        seen_minors[gpu.minor_number] = f"{at}.minorNumber"
        check(gpu.numa_node is None or gpu.numa_node >= 0, f"{at}.numaNode", gpu.numa_node, "must not be negative")
        check(1 <= gpu.max_mig_devices <= 8, f"{at}.maxMigDevices", gpu.max_mig_devices, "must be 1 to 8")
        check(0 <= gpu.compute_mode <= 3, f"{at}.computeMode", gpu.compute_mode, "must be an NVML compute mode 0-3")
        check(gpu.mig_capable or not gpu.mig_enabled, f"{at}.migEnabled", gpu.mig_enabled, "needs migCapable")
        check(gpu.brand is None or gpu.brand in BRANDS or gpu.brand == "none", f"{at}.brand", gpu.brand,
              f"must be one of {', '.join(BRANDS)} or none")
        check(gpu.architecture is None or gpu.architecture in ARCHITECTURES, f"{at}.architecture", gpu.architecture,
              f"must be one of {', '.join(ARCHITECTURES)}")
        check(gpu.multiprocessors is None or gpu.multiprocessors >= 0, f"{at}.multiprocessors", gpu.multiprocessors,
              "must not be negative")
        check(
            gpu.mig_enabled or not gpu.mig_devices,
            f"{at}.migDevices",
            [m.uuid for m in gpu.mig_devices],
            "MIG devices need migEnabled: true",
        )
        siblings = {m.profile: m.memory_mib for m in gpu.mig_devices}
        seen_slots: set[int] = set()
        seen_instances: set[tuple[int, int]] = set()
        seen_ids: dict[int, str] = {}
        for m, mig in enumerate(gpu.mig_devices):
            mat = f"{at}.migDevices[{m}]"
            check(bool(_NO_SPACE.match(mig.uuid)), f"{mat}.uuid", mig.uuid, "must be one word")
            check(mig.uuid not in seen_uuids, f"{mat}.uuid", mig.uuid, f"duplicate of {seen_uuids.get(mig.uuid)}")
            seen_uuids[mig.uuid] = f"{mat}.uuid"
            try:
                pid = profile_id(mig.profile, mig.memory_mib, siblings)
            except ValueError as exc:
                raise _fail(source, f"{mat}.profile", mig.profile, str(exc)) from None
            check(
                seen_ids.get(pid, mig.profile) == mig.profile,
                f"{mat}.profile",
                mig.profile,
                f"maps to the same NVML profile id as {seen_ids.get(pid)}",
            )
            seen_ids[pid] = mig.profile
            check(mig.memory_mib > 0, f"{mat}.memoryMiB", mig.memory_mib, "must be positive")
            check(mig.gi >= 0 and mig.ci >= 0, f"{mat}.gi", (mig.gi, mig.ci), "gi and ci must not be negative")
            check((mig.gi, mig.ci) not in seen_instances, f"{mat}.ci", (mig.gi, mig.ci), "duplicate (gi, ci)")
            seen_instances.add((mig.gi, mig.ci))
            slot = m if mig.index is None else mig.index
            check(
                0 <= slot < gpu.max_mig_devices,
                f"{mat}.index",
                slot,
                f"must be below maxMigDevices ({gpu.max_mig_devices})",
            )
            check(slot not in seen_slots, f"{mat}.index", slot, "duplicate MIG index")
            seen_slots.add(slot)

    n = len(node.gpus)
    links_per_gpu = [0] * n
    for k, (a, b, count) in enumerate(node.nvlinks):
        at = f"$.nvlinks[{k}]"
        check(0 <= a < n and 0 <= b < n, at, [a, b, count], f"GPU index out of range (node has {n} GPUs)")
        check(a != b, at, [a, b, count], "a GPU cannot link to itself")
        check(count >= 1, at, [a, b, count], "link count must be at least 1")
        links_per_gpu[a] += count
        links_per_gpu[b] += count
        for g in (a, b):
            check(
                links_per_gpu[g] <= MAX_NVLINKS_PER_GPU,
                at,
                [a, b, count],
                f"GPU {g} would have more than {MAX_NVLINKS_PER_GPU} NVLinks",
            )
    for k, (a, b, level) in enumerate(node.topology):
        at = f"$.topology[{k}]"
        check(0 <= a < n and 0 <= b < n and a != b, at, [a, b, level], "needs two different existing GPU indices")
        check(level is None or level in TOPOLOGY_LEVELS, at, [a, b, level], f"level must be one of {TOPOLOGY_LEVELS}")


def mig_slots(gpu: SimGpu) -> list[tuple[int, SimMigDevice]]:
    """(MIG index, device) pairs of a GPU, in index order."""
    return sorted(
        ((m if mig.index is None else mig.index, mig) for m, mig in enumerate(gpu.mig_devices)), key=lambda p: p[0]
    )


def render_state(node: SimNode, events_file: Path, compute_mode_log: Path) -> str:
    """The state file for the fake library (format in docs/simulation.md)."""
    lines = [
        "# nvdp simulated node: written by nvdp.sim, read by the fake libnvidia-ml.so.1 at every nvmlInit",
        f"driver {node.driver_version}",
        f"cuda {node.cuda_driver_version}",
        f"events {events_file}",
        f"computemodelog {compute_mode_log}",
    ]
    if node.init_error is not None:
        lines.append(f"fail init {node.init_error}")
    for g, gpu in enumerate(node.gpus):
        major, minor = gpu.compute_capability.split(".")
        numa = -1 if gpu.numa_node is None else gpu.numa_node
        lines.append(
            f"gpu {gpu.uuid} {gpu.minor_number} {gpu.memory_mib} {major} {minor} {gpu.pci_bus_id} {numa} "
            f"{int(gpu.mig_capable)} {int(gpu.mig_enabled)} {gpu.max_mig_devices} {int(gpu.events_supported)} "
            f"{gpu.compute_mode} {gpu.name}"
        )
        if gpu.brand != "none":
            brand, arch, sms = gpu_defaults(gpu)
            lines.append(f"gpuinfo {g} {BRANDS[brand]} {ARCHITECTURES.get(arch, 0xFFFFFFFF)} {sms}")
        siblings = {m.profile: m.memory_mib for m in gpu.mig_devices}
        placed = placements(gpu)
        for slot, mig in mig_slots(gpu):
            match = _PROFILE.match(mig.profile)
            assert match is not None  # validated
            pid = profile_id(mig.profile, mig.memory_mib, siblings)
            lines.append(
                f"mig {g} {slot} {mig.uuid} {mig.gi} {mig.ci} {mig.memory_mib} {pid} {match['slices']} {mig.profile}"
            )
            start, size = placed[mig.gi]
            lines.append(f"miginfo {g} {slot} {' '.join(map(str, mig_defaults(gpu, mig)))} {start} {size}")
        if gpu.lost:
            lines.append(f"lost {gpu.uuid}")
    lines.extend(f"nvlink {a} {b} {count}" for a, b, count in node.nvlinks)
    lines.extend(f"topo {a} {b} {-1 if level is None else level}" for a, b, level in node.topology)
    return "\n".join(lines) + "\n"
