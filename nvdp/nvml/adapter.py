"""The one place nvdp talks to NVML.

Everything here blocks (NVML calls, sysfs reads): trio code calls it through `trio.to_thread.run_sync`. pynvml's
errors are translated into `NvmlError` at this edge, and results come out as the plain types of `nvdp.core.inventory`,
so nothing above this module imports pynvml.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pynvml

from nvdp.core.health.events import XidEvent
from nvdp.core.inventory import (
    CONTROL_DEVICE_NODES,
    IMEX_CHANNEL_IDS,
    Gpu,
    Link,
    MigDevice,
    NodeInventory,
    imex_channel_path,
)
from nvdp.core.plan.labels import HostFacts

T = TypeVar("T")

# NVML return codes callers branch on.
ERROR_UNINITIALIZED: int = pynvml.NVML_ERROR_UNINITIALIZED
ERROR_INVALID_ARGUMENT: int = pynvml.NVML_ERROR_INVALID_ARGUMENT
ERROR_NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
ERROR_NOT_FOUND: int = pynvml.NVML_ERROR_NOT_FOUND
ERROR_DRIVER_NOT_LOADED: int = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
ERROR_TIMEOUT: int = pynvml.NVML_ERROR_TIMEOUT
ERROR_LIBRARY_NOT_FOUND: int = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
ERROR_FUNCTION_NOT_FOUND: int = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
ERROR_GPU_IS_LOST: int = pynvml.NVML_ERROR_GPU_IS_LOST
ERROR_UNKNOWN: int = pynvml.NVML_ERROR_UNKNOWN

EVENT_DOUBLE_BIT_ECC: int = pynvml.nvmlEventTypeDoubleBitEccError
EVENT_XID_CRITICAL: int = pynvml.nvmlEventTypeXidCriticalError
#: What the health loop listens for; masked by what each GPU supports.
HEALTH_EVENTS: int = EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC

_NO_INSTANCE = 0xFFFFFFFF
_MIG_PROFILE = re.compile(r"(?:\d+c\.)?(\d+g\.\d+gb\S*)")

# Own wording for the codes people meet; pynvml's str() of an unknown code gives "b'...'" on some versions.
_MESSAGES = {
    pynvml.NVML_ERROR_UNINITIALIZED: "NVML is not initialized",
    pynvml.NVML_ERROR_INVALID_ARGUMENT: "invalid argument",
    pynvml.NVML_ERROR_NOT_SUPPORTED: "not supported by this GPU or driver",
    pynvml.NVML_ERROR_NO_PERMISSION: "insufficient permissions",
    pynvml.NVML_ERROR_NOT_FOUND: "not found",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA driver is not loaded",
    pynvml.NVML_ERROR_TIMEOUT: "timed out",
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 not found (is the driver installed and mounted?)",
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "function not found in libnvidia-ml.so.1 (driver too old?)",
    pynvml.NVML_ERROR_GPU_IS_LOST: "the GPU is lost (fell off the bus or is otherwise inaccessible)",
    pynvml.NVML_ERROR_RESET_REQUIRED: "the GPU needs a reset",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "NVML and kernel driver versions differ",
    pynvml.NVML_ERROR_UNKNOWN: "unknown NVML error",
}

log = logging.getLogger(__name__)


class NvmlError(Exception):
    """An NVML call failed. `code` is the NVML return code (compare with the `ERROR_*` constants)."""

    def __init__(self, code: int, message: str, operation: str = "") -> None:
        self.code = code
        self.message = message
        self.operation = operation
        where = f"{operation}: " if operation else ""
        super().__init__(f"{where}{message} (NVML error {code})")

    @property
    def not_supported(self) -> bool:
        return self.code == ERROR_NOT_SUPPORTED

    @property
    def gpu_lost(self) -> bool:
        return self.code == ERROR_GPU_IS_LOST


def _message(code: int) -> str:
    if code in _MESSAGES:
        return _MESSAGES[code]
    try:
        text = pynvml.nvmlErrorString(code)
    except Exception:  # the library may be missing: the code alone must still make a message
        return f"NVML error {code}"
    return text.decode() if isinstance(text, bytes) else str(text)


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    try:
        yield
    except pynvml.NVMLError as exc:
        # pynvml's errors are unhashable and compare badly; only the code crosses this edge.
        raise NvmlError(int(exc.value), _message(int(exc.value)), operation) from None
    except NvmlError:
        raise
    except Exception as exc:
        # Not an NVML return code: ctypes or pynvml itself failed (a struct or symbol a driver lays out differently,
        # a library that went away). Callers handle NVML failures, never these types: translate them here.
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise NvmlError(ERROR_UNKNOWN, f"unexpected failure in the NVML binding ({detail})", operation) from exc


def _call(operation: str, fn: Callable[..., T], *args: Any) -> T:
    with _translated(operation):
        return fn(*args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_state_lock = threading.Lock()
_initialized = False
#: Event waits running in worker threads right now (`EventSet.wait`), counted under `_state_lock`. The health loop
#: does not wait for a wait it was cancelled during (NVML's wait is interruptible only by its timeout), so one may
#: still be inside `nvmlEventSetWait` when the daemon shuts NVML down.
_waits_in_flight = 0
#: `shutdown()` was called while a wait was in flight: the last wait to return shuts NVML down (`_wait_ended`).
_shutdown_pending = False


#: Notified when the last wait in flight returns (and so a deferred shutdown is done).
_waits_done = threading.Condition(_state_lock)


def init() -> None:
    """Initializes NVML for this process; a no-op when already initialized by this module. If a shutdown is still
    deferred behind an abandoned wait (an in-process restart: tests, the demo), it first lets that finish (at most
    the wait's timeout), so the new session starts from a real `nvmlInit` (the simulated node re-reads its state)."""
    global _initialized
    with _state_lock:
        _waits_done.wait_for(lambda: not _shutdown_pending)
        if not _initialized:
            _call("nvmlInit", pynvml.nvmlInit)
            _initialized = True


def shutdown() -> None:
    """Releases NVML; safe to call when not initialized, or twice. Never blocks on an event wait: while one is
    inside `nvmlEventSetWait` (at most its timeout), `nvmlShutdown` is left to the thread running it, which calls it
    as soon as the wait returns, so the two never overlap. If the process exits first, the driver releases
    everything with the process."""
    global _shutdown_pending
    with _state_lock:
        if _waits_in_flight:
            _shutdown_pending = True
            return
        _shutdown_locked()


def _shutdown_locked() -> None:
    global _initialized, _shutdown_pending
    _shutdown_pending = False
    if _initialized:
        _initialized = False
        # Shutting down is best effort: there is nothing useful to do about a failure.
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def waits_in_flight() -> int:
    """Event waits inside NVML right now (tests and the shutdown log line read it)."""
    with _state_lock:
        return _waits_in_flight


def _wait_started(event_set: EventSet) -> bool:
    """Counts a wait in; False when NVML is not initialized (or going away) or the set is freed: no wait starts."""
    global _waits_in_flight
    with _state_lock:
        if not _initialized or _shutdown_pending or event_set._set is None:
            return False
        _waits_in_flight += 1
        event_set._waiting = True
        return True


def _wait_ended(event_set: EventSet) -> None:
    """Counts a wait out; frees its set if it was closed meanwhile, then shuts NVML down if that was deferred."""
    global _waits_in_flight
    with _state_lock:
        _waits_in_flight -= 1
        event_set._waiting = False
        if event_set._free_pending:
            event_set._free_pending = False
            with contextlib.suppress(NvmlError):
                event_set._free_now()
        if _shutdown_pending and not _waits_in_flight:
            _shutdown_locked()
        if not _waits_in_flight:
            _waits_done.notify_all()


# ------------------------------------------------------------------------------------------------------- inventory


def sysfs_bus_id(pci_bus_id: str) -> str:
    """NVML's `00000000:0F:00.0` as sysfs names it: `0000:0f:00.0`."""
    bus_id = pci_bus_id.lower()
    domain, _, rest = bus_id.partition(":")
    return f"{domain[-4:]}:{rest}"


def _bus_key(pci_bus_id: str) -> tuple[int, ...]:
    """Comparable form of a PCI bus id, whatever its domain width or case."""
    return tuple(int(part, 16) for part in re.split(r"[:.]", pci_bus_id.strip()))


def _numa_node(handle: Any, pci_bus_id: str, host_root: Path) -> int | None:
    try:
        node = int(pynvml.nvmlDeviceGetNumaNodeId(handle))
        if node >= 0:
            return node
    except pynvml.NVMLError as exc:
        if exc.value == ERROR_GPU_IS_LOST:
            raise NvmlError(exc.value, _message(exc.value), "nvmlDeviceGetNumaNodeId") from None
        # Older drivers lack the call and VMs answer NOT_SUPPORTED: fall back to what the kernel says.
    try:
        node = int((host_root / "sys/bus/pci/devices" / sysfs_bus_id(pci_bus_id) / "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


_BRANDS = {
    pynvml.NVML_BRAND_UNKNOWN: "Unknown", pynvml.NVML_BRAND_QUADRO: "Quadro", pynvml.NVML_BRAND_TESLA: "Tesla",
    pynvml.NVML_BRAND_NVS: "NVS", pynvml.NVML_BRAND_GRID: "GRID", pynvml.NVML_BRAND_GEFORCE: "GeForce",
    pynvml.NVML_BRAND_TITAN: "Titan", pynvml.NVML_BRAND_NVIDIA_VAPPS: "VApps", pynvml.NVML_BRAND_NVIDIA_VPC: "VPC",
    pynvml.NVML_BRAND_NVIDIA_VCS: "VCS", pynvml.NVML_BRAND_NVIDIA_VWS: "VWS",
    pynvml.NVML_BRAND_NVIDIA_CLOUD_GAMING: "CloudGaming", pynvml.NVML_BRAND_QUADRO_RTX: "QuadroRTX",
    pynvml.NVML_BRAND_NVIDIA_RTX: "NvidiaRTX", pynvml.NVML_BRAND_NVIDIA: "Nvidia",
    pynvml.NVML_BRAND_GEFORCE_RTX: "GeForceRTX", pynvml.NVML_BRAND_TITAN_RTX: "TitanRTX",
}
_ARCHITECTURES = {
    pynvml.NVML_DEVICE_ARCH_KEPLER: "Kepler", pynvml.NVML_DEVICE_ARCH_MAXWELL: "Maxwell",
    pynvml.NVML_DEVICE_ARCH_PASCAL: "Pascal", pynvml.NVML_DEVICE_ARCH_VOLTA: "Volta",
    pynvml.NVML_DEVICE_ARCH_TURING: "Turing", pynvml.NVML_DEVICE_ARCH_AMPERE: "Ampere",
    pynvml.NVML_DEVICE_ARCH_ADA: "Ada", pynvml.NVML_DEVICE_ARCH_HOPPER: "Hopper",
    pynvml.NVML_DEVICE_ARCH_BLACKWELL: "Blackwell", pynvml.NVML_DEVICE_ARCH_RUBIN: "Rubin",
}


def _optional(operation: str, fn: Callable[..., T], *args: Any) -> T | None:
    """A query whose answer is a nicety (labels, DRA attributes): None when the driver refuses it (old drivers lack
    the call, VMs answer NOT_SUPPORTED, a binding lays a struct out differently). A lost GPU still raises."""
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        if exc.value == ERROR_GPU_IS_LOST:
            raise NvmlError(exc.value, _message(exc.value), operation) from None
        log.debug("%s: %s (NVML error %s); using the default", operation, _message(int(exc.value)), exc.value)
    except Exception as exc:  # a ctypes or binding failure: translated at this edge like every other
        log.debug("%s failed in the NVML binding (%s: %s); using the default", operation, type(exc).__name__, exc)
    return None


def _gpu_facts(handle: Any) -> tuple[str, str, int]:
    """(brand, architecture, SMs) in NVIDIA's DRA driver's words; "" and 0 where the driver does not say."""
    brand = _optional("nvmlDeviceGetBrand", pynvml.nvmlDeviceGetBrand, handle)
    arch = _optional("nvmlDeviceGetArchitecture", pynvml.nvmlDeviceGetArchitecture, handle)
    # nvml.h documents nvmlDeviceGetAttributes for MIG handles only; drivers that answer for a GPU give its SMs.
    attrs = _optional("nvmlDeviceGetAttributes", pynvml.nvmlDeviceGetAttributes_v2, handle)
    return (_BRANDS.get(int(brand), "Unknown") if brand is not None else "",
            _ARCHITECTURES.get(int(arch), "Unknown") if arch is not None else "",
            int(attrs.multiprocessorCount) if attrs is not None else 0)


def _gpu_instance(parent: Any, gi: int) -> tuple[str | None, int, int, int]:
    """(profile name as NVML's profile info reports it without `MIG `/`<n>c.`, GI profile id, placement start,
    placement size) of GPU instance `gi`; None and zeros where the driver cannot answer."""
    instance = _optional("nvmlDeviceGetGpuInstanceById", pynvml.nvmlDeviceGetGpuInstanceById, parent, gi)
    info = _optional("nvmlGpuInstanceGetInfo", pynvml.nvmlGpuInstanceGetInfo, instance) if instance else None
    if info is None:
        return None, 0, 0, 0
    profile_id, start, size = int(info.profileId), int(info.placement.start), int(info.placement.size)
    profile = _optional("nvmlDeviceGetGpuInstanceProfileInfo", pynvml.nvmlDeviceGetGpuInstanceProfileInfo, parent,
                        profile_id, 2)
    match = _MIG_PROFILE.search(_text(profile.name)) if profile is not None else None
    return (match.group(1) if match else None), profile_id, start, size


def _mig_devices(handle: Any) -> tuple[bool, bool, tuple[MigDevice, ...]]:
    """(MIG capable, MIG enabled, MIG devices). NOT_SUPPORTED for the MIG mode: not a MIG-capable part."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError as exc:
        if exc.value in (ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND):
            return False, False, ()  # a part (or a driver older than MIG) with no MIG mode at all
        raise NvmlError(exc.value, _message(exc.value), "nvmlDeviceGetMigMode") from None
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return True, False, ()
    devices = []
    for index in range(_call("nvmlDeviceGetMaxMigDeviceCount", pynvml.nvmlDeviceGetMaxMigDeviceCount, handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except pynvml.NVMLError as exc:
            if exc.value == ERROR_NOT_FOUND:
                continue  # a hole left by a destroyed instance
            raise NvmlError(exc.value, _message(exc.value), "nvmlDeviceGetMigDeviceHandleByIndex") from None
        with _translated("MIG device query"):
            gi = int(pynvml.nvmlDeviceGetGpuInstanceId(mig))
            ci = int(pynvml.nvmlDeviceGetComputeInstanceId(mig))
            attrs = pynvml.nvmlDeviceGetAttributes_v2(mig)
            uuid = _text(pynvml.nvmlDeviceGetUUID(mig))
        profile, profile_id, start, size = _gpu_instance(handle, gi)
        if profile is None:
            # go-nvlib's derivation from the attributes (`<slices>g.<GB>gb`, no attribute suffix).
            profile = f"{attrs.gpuInstanceSliceCount}g.{round(attrs.memorySizeMB / 1024)}gb"
        devices.append(
            MigDevice(
                uuid=uuid,
                index=index,
                profile=profile,
                memory_mib=int(attrs.memorySizeMB),
                gi=gi,
                ci=ci,
                gi_profile_id=profile_id,
                placement_start=start,
                placement_size=size,
                multiprocessors=int(attrs.multiprocessorCount),
                slices_gi=int(attrs.gpuInstanceSliceCount),
                slices_ci=int(attrs.computeInstanceSliceCount),
                copy_engines=int(attrs.sharedCopyEngineCount),
                decoders=int(attrs.sharedDecoderCount),
                encoders=int(attrs.sharedEncoderCount),
                jpeg_engines=int(attrs.sharedJpegCount),
                ofa_engines=int(attrs.sharedOfaCount),
            )
        )
    return True, True, tuple(devices)


def _nvlinks(handle: Any, index_by_bus: dict[tuple[int, ...], int]) -> dict[int, int]:
    """Active NVLinks from one GPU, counted per peer GPU index (links to NVSwitches or unknown devices skipped)."""
    counts: dict[int, int] = {}
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                continue
            remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
        except pynvml.NVMLError as exc:
            if exc.value in (ERROR_NOT_SUPPORTED, ERROR_INVALID_ARGUMENT, ERROR_FUNCTION_NOT_FOUND):
                continue  # this part has fewer links, or no NVLink at all
            raise NvmlError(exc.value, _message(exc.value), "NVLink query") from None
        peer = index_by_bus.get(_bus_key(_text(remote.busId)))
        if peer is not None:
            counts[peer] = counts.get(peer, 0) + 1
    return counts


def _topology_level(a: Any, b: Any) -> int | None:
    try:
        return int(pynvml.nvmlDeviceGetTopologyCommonAncestor(a, b))
    except pynvml.NVMLError as exc:
        if exc.value in (ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND):
            return None
        raise NvmlError(exc.value, _message(exc.value), "nvmlDeviceGetTopologyCommonAncestor") from None


def find_imex_channels(roots: tuple[Path, ...]) -> tuple[int, ...]:
    """The IMEX channels whose device node is a character device under one of `roots` (upstream looks under the dev
    root, then at the plain path: a channel injected into nvdp's own container is there)."""
    found = []
    for channel in IMEX_CHANNEL_IDS:
        for root in dict.fromkeys(roots):
            path = root / imex_channel_path(channel).lstrip("/")
            try:
                # stat, not lstat: a symlink to the node counts, as it does for the container runtime.
                mode = os.stat(path).st_mode
            except OSError:
                continue
            if stat.S_ISCHR(mode):
                found.append(channel)
                break
            log.debug("IMEX channel %d: %s is not a character device", channel, path)
    return tuple(found)


def read_mig_minors(driver_root: Path) -> dict[str, int]:
    """`/proc/driver/nvidia-caps/mig-minors` as `{"gpu0/gi1/access": 12, ...}`; empty when absent."""
    try:
        text = (driver_root / "proc/driver/nvidia-caps/mig-minors").read_text()
    except OSError:
        return {}
    minors = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            minors[parts[0]] = int(parts[1])
    return minors


def read_host_facts(host_root: Path, machine_type_file: Path | None, gpus: Sequence[Gpu]) -> HostFacts:
    """What GFD reads besides NVML: the DMI product name (`--machine-type-file`, under `host_root`) and each GPU's
    PCI class from sysfs. Whatever cannot be read is left out (the labels say `unknown`)."""
    machine = None
    if machine_type_file is not None:
        try:
            machine = (host_root / str(machine_type_file).lstrip("/")).read_text(errors="replace").strip()
        except OSError as exc:
            log.debug("machine type file %s: %s", machine_type_file, exc.strerror or exc)
    classes = {}
    for gpu in gpus:
        try:
            text = (host_root / "sys/bus/pci/devices" / sysfs_bus_id(gpu.pci_bus_id) / "class").read_text()
            classes[gpu.uuid] = int(text.strip(), 16)
        except (OSError, ValueError):
            continue
    return HostFacts(machine=machine, pci_classes=classes)


def read_inventory(host_root: Path = Path("/"), driver_root: Path = Path("/"),
                   dev_root: Path | None = None) -> NodeInventory:
    """Reads the whole node from NVML (and a few host files). Needs `init()` first. `dev_root`: where the host's
    device nodes are seen besides `host_root` (the dev root, mounted at its host path)."""
    with _translated("system query"):
        driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda_version = int(pynvml.nvmlSystemGetCudaDriverVersion())
        count = int(pynvml.nvmlDeviceGetCount())
    handles = []
    gpus = []
    for index in range(count):
        try:
            with _translated(f"GPU {index}"):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                pci_bus_id = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                name = _text(pynvml.nvmlDeviceGetName(handle))
                memory_mib = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024)
                minor_number = int(pynvml.nvmlDeviceGetMinorNumber(handle))
            mig_capable, mig_enabled, mig_devices = _mig_devices(handle)
            brand, architecture, multiprocessors = _gpu_facts(handle)
        except NvmlError as exc:
            if not exc.gpu_lost:
                raise
            # A GPU that fell off the bus cannot even tell its UUID: leave it out (nothing can use it until the
            # node is rebooted) and serve the others, instead of failing the whole node.
            log.error("GPU %d is lost (%s): it is not advertised; the node needs a reboot to use it", index, exc)
            continue
        handles.append(handle)
        gpus.append(
            Gpu(
                index=index,
                uuid=uuid,
                name=name,
                memory_mib=memory_mib,
                minor=minor_number,
                pci_bus_id=pci_bus_id,
                compute_capability=f"{major}.{minor}",
                numa_node=_numa_node(handle, pci_bus_id, host_root),
                mig_enabled=mig_enabled,
                mig_capable=mig_capable,
                brand=brand,
                architecture=architecture,
                multiprocessors=multiprocessors,
                mig_devices=mig_devices,
            )
        )
    index_by_bus = {_bus_key(gpu.pci_bus_id): gpu.index for gpu in gpus}
    nvlinks = [_nvlinks(handle, index_by_bus) for handle in handles]
    links = {}
    for i, first in enumerate(gpus):
        for j in range(i + 1, len(gpus)):
            second = gpus[j]
            # Both ends report each link; take the larger count in case one side cannot see its remote.
            links[(first.index, second.index)] = Link(
                nvlinks=max(nvlinks[i].get(second.index, 0), nvlinks[j].get(first.index, 0)),
                pcie_level=_topology_level(handles[i], handles[j]),
            )
    control_devices = tuple(dev for dev in CONTROL_DEVICE_NODES if (host_root / dev.lstrip("/")).exists())
    return NodeInventory(
        driver_version=driver_version,
        cuda_driver_version=cuda_version,
        gpus=tuple(gpus),
        links=links,
        control_devices=control_devices,
        mig_minors=read_mig_minors(driver_root),
        imex_channels=find_imex_channels((*((dev_root,) if dev_root is not None else ()), host_root)),
    )


# ---------------------------------------------------------------------------------------------- per-GPU control


def _handle(uuid: str) -> Any:
    return _call("nvmlDeviceGetHandleByUUID", pynvml.nvmlDeviceGetHandleByUUID, uuid)


def get_compute_mode(uuid: str) -> int:
    return int(_call("nvmlDeviceGetComputeMode", pynvml.nvmlDeviceGetComputeMode, _handle(uuid)))


def set_compute_mode(uuid: str, mode: int) -> None:
    """Sets `NVML_COMPUTEMODE_*` (0 default, 2 prohibited, 3 exclusive process); needs root on a real node."""
    _call("nvmlDeviceSetComputeMode", pynvml.nvmlDeviceSetComputeMode, _handle(uuid), mode)


def probe(uuid: str) -> None:
    """Raises NvmlError unless the GPU answers a cheap query: the recovery check for an unhealthy GPU."""
    handle = _handle(uuid)
    _call("nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo, handle)


# ---------------------------------------------------------------------------------------------------------- events


class EventSet:
    """An NVML event set. `wait` blocks up to its timeout, so run it in a thread; NVML lets another thread
    register or query meanwhile. Not safe to `free` while a `wait` is in progress."""

    def __init__(self) -> None:
        self._set: Any = _call("nvmlEventSetCreate", pynvml.nvmlEventSetCreate)
        # The event carries a device handle; map it back to the UUID without querying a GPU that may be lost.
        self._uuids: dict[int | None, str] = {}
        #: A wait on this set is inside NVML; `free` then only marks it (`_free_pending`). Both under `_state_lock`.
        self._waiting = False
        self._free_pending = False

    def register(self, gpu_uuid: str, event_types: int = HEALTH_EVENTS) -> None:
        """Registers a physical GPU (not a MIG device: its events arrive on the parent) for the supported subset
        of `event_types`. Raises NvmlError with `not_supported` when the GPU supports none of them."""
        handle = _handle(gpu_uuid)
        supported = _call("nvmlDeviceGetSupportedEventTypes", pynvml.nvmlDeviceGetSupportedEventTypes, handle)
        wanted = event_types & supported
        if wanted == 0:
            raise NvmlError(ERROR_NOT_SUPPORTED, _message(ERROR_NOT_SUPPORTED), f"health events on {gpu_uuid}")
        _call("nvmlDeviceRegisterEvents", pynvml.nvmlDeviceRegisterEvents, handle, wanted, self._set)
        self._uuids[ctypes.cast(handle, ctypes.c_void_p).value] = gpu_uuid

    def wait(self, timeout_ms: int) -> XidEvent | None:
        """The next event, or None when `timeout_ms` passes without one. Safe to abandon (see `shutdown`): a `free`
        or `shutdown` that comes while it runs is carried out by this thread when NVML returns."""
        if not _wait_started(self):
            raise NvmlError(ERROR_UNINITIALIZED, _message(ERROR_UNINITIALIZED), "nvmlEventSetWait")
        try:
            data = pynvml.nvmlEventSetWait_v2(self._set, timeout_ms)
        except pynvml.NVMLError as exc:
            if exc.value == ERROR_TIMEOUT:
                return None
            raise NvmlError(exc.value, _message(exc.value), "nvmlEventSetWait") from None
        except Exception as exc:
            raise NvmlError(ERROR_UNKNOWN, f"unexpected failure in the NVML binding ({type(exc).__name__}: {exc})",
                            "nvmlEventSetWait") from exc
        finally:
            _wait_ended(self)
        key = ctypes.cast(data.device, ctypes.c_void_p).value
        uuid = self._uuids.get(key)
        if uuid is None:
            uuid = _text(_call("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, data.device))
        return XidEvent(
            gpu_uuid=uuid,
            event_type=int(data.eventType),
            xid=int(data.eventData),
            gi=None if data.gpuInstanceId == _NO_INSTANCE else int(data.gpuInstanceId),
            ci=None if data.computeInstanceId == _NO_INSTANCE else int(data.computeInstanceId),
        )

    def free(self) -> None:
        """Releases the set; safe to call twice and after NVML was shut down (which frees it anyway). While a wait
        on it is in progress the set is freed by the waiting thread when NVML returns (never under its feet)."""
        with _state_lock:
            if self._waiting:
                self._free_pending = True
                return
            self._free_now()

    def _free_now(self) -> None:
        if self._set is None:
            return
        event_set, self._set = self._set, None
        try:
            pynvml.nvmlEventSetFree(event_set)
        except pynvml.NVMLError as exc:
            if exc.value != ERROR_UNINITIALIZED:
                raise NvmlError(exc.value, _message(exc.value), "nvmlEventSetFree") from None

    def __enter__(self) -> EventSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.free()
