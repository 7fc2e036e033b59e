"""Opaque device configs of NVIDIA's DRA driver (`resource.nvidia.com/v1beta1` `GpuConfig`, `MigDeviceConfig`).

A ResourceClaim (or its DeviceClass) may carry `opaque.parameters` for driver `gpu.nvidia.com`; nvdp reads the same
objects NVIDIA's driver reads, so claims written for it work unchanged. Three steps, as there:

* `decode_config`: the raw parameters into a msgspec struct, **strictly** (an unknown or misspelt key is an error
  that names its path, e.g. ``Object contains unknown field `interval` - at `$.sharing.mpsConfig```);
* `normalize_config`: implied defaults filled in (TimeSlicing without `timeSlicingConfig` means interval `Default`,
  MPS without `mpsConfig` means `{}`) and every rule checked, giving a `DeviceConfig` of plain values;
* `pinned_limits`: an MPS config's memory limits resolved against the devices they apply to.

Differences from NVIDIA's driver, on purpose: no feature gates (TimeSlicing and MPS are always understood; what
cannot be *applied* on the node is the preparer's per-claim error), a `timeSlicingConfig` under MPS or an
`mpsConfig` under TimeSlicing is refused here rather than when applied, an absent `interval` means `Default`
(NVIDIA's driver fails on it), and `VfioDeviceConfig` is refused by name (nvdp does no passthrough).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Final, Literal

import msgspec

API_VERSION = "resource.nvidia.com/v1beta1"
GPU_CONFIG: Final = "GpuConfig"
MIG_DEVICE_CONFIG: Final = "MigDeviceConfig"
TIME_SLICING: Final = "TimeSlicing"
MPS: Final = "MPS"
#: Time-slice intervals and the value `nvidia-smi compute-policy --set-timeslice` takes for each.
INTERVALS = {"Default": 0, "Short": 1, "Medium": 2, "Long": 3}
#: The smallest pinned-memory limit NVIDIA's driver accepts: anything below 1 MiB renders as `0M`.
MIB = 1 << 20

ConfigKind = Literal["GpuConfig", "MigDeviceConfig"]


class DeviceConfigError(Exception):
    """A claim's opaque config cannot be used; the message says where and why, and is shown to the user."""


# Quantities arrive as JSON strings ("1Gi") or numbers (1073741824), as Kubernetes accepts both.
Quantity = str | int | float


class _Strict(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class MpsConfigSpec(_Strict):
    default_active_thread_percentage: int | None = None
    default_pinned_device_memory_limit: Quantity | None = None
    default_per_device_pinned_memory_limit: dict[str, Quantity] | None = None
    multi_user: bool | None = None


class TimeSlicingConfigSpec(_Strict):
    interval: str | None = None


class GpuSharingSpec(_Strict):
    strategy: str
    time_slicing_config: TimeSlicingConfigSpec | None = None
    mps_config: MpsConfigSpec | None = None


class MigDeviceSharingSpec(_Strict):
    strategy: str
    mps_config: MpsConfigSpec | None = None


class GpuConfigSpec(_Strict):
    api_version: str
    kind: str
    sharing: GpuSharingSpec | None = None


class MigDeviceConfigSpec(_Strict):
    api_version: str
    kind: str
    sharing: MigDeviceSharingSpec | None = None


class _TypeMeta(msgspec.Struct, rename="camel", kw_only=True):
    api_version: str = ""
    kind: str = ""


ConfigSpec = GpuConfigSpec | MigDeviceConfigSpec


@dataclass(frozen=True, slots=True)
class MpsSettings:
    """An MPS config after normalisation: limits as numbers, per-device keys still as the user wrote them."""

    active_thread_percentage: int | None = None
    #: The default pinned device-memory limit in MiB (applied to every device of the group), or None.
    pinned_memory_limit_mib: int | None = None
    #: (UUID or index within the group's devices, limit in MiB), in key order.
    per_device_pinned_mib: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Sharing:
    """How a group of devices is shared: TimeSlicing (with its interval) or MPS (with its settings)."""

    strategy: Literal["TimeSlicing", "MPS"]
    #: TimeSlicing only: one of `INTERVALS`.
    interval: str = ""
    mps: MpsSettings | None = None


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A normalised, valid config: which kind of device it is for, and its sharing (None: exclusive)."""

    kind: ConfigKind
    sharing: Sharing | None = None


#: The built-in defaults NVIDIA's driver puts first (lowest precedence): whole GPUs and MIG devices exclusive.
DEFAULT_GPU_CONFIG = DeviceConfig(GPU_CONFIG)
DEFAULT_MIG_CONFIG = DeviceConfig(MIG_DEVICE_CONFIG)


def decode_config(parameters: object) -> ConfigSpec:
    """Decode `opaque.parameters` (a JSON object, as the API returns it) strictly into its struct."""
    if not isinstance(parameters, Mapping):
        raise DeviceConfigError(
            f"parameters must be an object with apiVersion and kind, not {type(parameters).__name__}")
    try:
        meta = msgspec.convert(parameters, _TypeMeta)
    except msgspec.ValidationError as e:
        raise DeviceConfigError(f"invalid config: {e}") from None
    if meta.api_version != API_VERSION:
        raise DeviceConfigError(f"unsupported apiVersion {meta.api_version!r}: nvdp understands {API_VERSION}")
    spec_type: type[GpuConfigSpec] | type[MigDeviceConfigSpec]
    if meta.kind == GPU_CONFIG:
        spec_type = GpuConfigSpec
    elif meta.kind == MIG_DEVICE_CONFIG:
        spec_type = MigDeviceConfigSpec
    elif meta.kind == "VfioDeviceConfig":
        raise DeviceConfigError("VfioDeviceConfig is not supported: nvdp does not pass GPUs through to VMs")
    else:
        raise DeviceConfigError(
            f"unknown kind {meta.kind!r} in {API_VERSION}: expected {GPU_CONFIG} or {MIG_DEVICE_CONFIG}")
    try:
        return msgspec.convert(parameters, spec_type, strict=True)
    except msgspec.ValidationError as e:
        raise DeviceConfigError(f"invalid {meta.kind}: {e}") from None


def normalize_config(spec: ConfigSpec) -> DeviceConfig:
    """Fill in implied defaults and check every rule; `DeviceConfigError` says which rule a config breaks."""
    kind: ConfigKind = GPU_CONFIG if isinstance(spec, GpuConfigSpec) else MIG_DEVICE_CONFIG
    if spec.sharing is None:
        return DeviceConfig(kind)
    strategy = spec.sharing.strategy
    time_slicing = spec.sharing.time_slicing_config if isinstance(spec.sharing, GpuSharingSpec) else None
    if strategy == TIME_SLICING:
        if spec.sharing.mps_config is not None:
            raise DeviceConfigError("cannot use mpsConfig with the 'TimeSlicing' strategy")
        interval = "Default" if time_slicing is None or time_slicing.interval is None else time_slicing.interval
        if interval not in INTERVALS:
            raise DeviceConfigError(
                f"unknown time-slice interval: {interval}, supported time-slice intervals: {', '.join(INTERVALS)}")
        return DeviceConfig(kind, Sharing(TIME_SLICING, interval=interval))
    if strategy == MPS:
        if time_slicing is not None:
            raise DeviceConfigError("cannot use timeSlicingConfig with the 'MPS' strategy")
        return DeviceConfig(kind, Sharing(MPS, mps=_mps_settings(spec.sharing.mps_config or MpsConfigSpec())))
    raise DeviceConfigError(
        f"unknown GPU sharing strategy: {strategy}, supported GPU sharing strategies: {TIME_SLICING}, {MPS}")


def _mps_settings(spec: MpsConfigSpec) -> MpsSettings:
    percentage = spec.default_active_thread_percentage
    if percentage is not None and percentage < 0:
        raise DeviceConfigError("active thread percentage must not be negative")
    if percentage is not None and percentage > 100:
        raise DeviceConfigError("active thread percentage must not be greater than 100")
    if spec.multi_user:
        # nvdp runs one control daemon per GPU for every claim on it; a multi-user (-M) daemon would change what
        # every other claim on that GPU gets.
        raise DeviceConfigError("mpsConfig.multiUser is not supported: nvdp's MPS control daemons serve one user")
    default = None
    if spec.default_pinned_device_memory_limit is not None:
        default = _limit_mib(spec.default_pinned_device_memory_limit, "defaultPinnedDeviceMemoryLimit")
    per_device = tuple(
        (key, _limit_mib(value, f"defaultPerDevicePinnedMemoryLimit[{key}]"))
        for key, value in (spec.default_per_device_pinned_memory_limit or {}).items())
    return MpsSettings(percentage, default, per_device)


def _limit_mib(value: Quantity, where: str) -> int:
    try:
        size = parse_quantity(value)
    except ValueError as e:
        raise DeviceConfigError(f"invalid limit: {where}: {e}") from None
    mib = size // MIB
    if mib <= 0:
        raise DeviceConfigError(f"invalid limit: {where}: value set too low: {value} (at least 1Mi)")
    return mib


def pinned_limits(mps: MpsSettings, uuids: Sequence[str]) -> dict[str, int]:
    """The pinned device-memory limit (MiB) of each device of a config group that has one.

    `uuids` are the group's device UUIDs; as in NVIDIA's driver, a per-device key is a UUID of the group or an
    index into the group's UUIDs in sorted order, and overrides the default.
    """
    ordered = sorted(uuids)
    limits = {uuid: mps.pinned_memory_limit_mib for uuid in ordered if mps.pinned_memory_limit_mib is not None}
    for key, mib in mps.per_device_pinned_mib:
        if key in ordered:
            limits[key] = mib
            continue
        if not re.fullmatch(r"[0-9]+", key):
            raise DeviceConfigError(
                f"invalid device: defaultPerDevicePinnedMemoryLimit key {key!r} is neither a UUID of the config's "
                f"devices ({', '.join(ordered)}) nor an index")
        index = int(key)
        if index >= len(ordered):
            raise DeviceConfigError(
                f"invalid device: defaultPerDevicePinnedMemoryLimit index {index}: the config applies to "
                f"{len(ordered)} device(s)")
        limits[ordered[index]] = mib
    return limits


_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<exp>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?")
_SUFFIXES = {
    "": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "k": Fraction(10**3),
    "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12), "P": Fraction(10**15), "E": Fraction(10**18),
    "Ki": Fraction(1 << 10), "Mi": Fraction(1 << 20), "Gi": Fraction(1 << 30), "Ti": Fraction(1 << 40),
    "Pi": Fraction(1 << 50), "Ei": Fraction(1 << 60),
}
#: Kubernetes refuses quantities with more digits than this; so does nvdp (it also bounds the arithmetic).
_MAX_QUANTITY_CHARS = 64


def parse_quantity(value: Quantity) -> int:
    """A Kubernetes resource quantity (`512Mi`, `1G`, `1.5Gi`, `2e9`, 1073741824) as an integer, rounded up as
    `resource.Quantity.Value()` does; ValueError for anything Kubernetes would refuse."""
    if isinstance(value, bool):
        raise ValueError(f"quantity must be a string or a number, not {value!r}")
    text = repr(value) if isinstance(value, float) else str(value)
    text = text.strip()
    if len(text) > _MAX_QUANTITY_CHARS:
        raise ValueError(f"quantity is too long ({len(text)} characters)")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"quantities must match the regular expression "
                         f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {text!r}")
    try:
        number = Fraction(Decimal(match["number"]))
    except InvalidOperation:
        raise ValueError(f"invalid quantity {text!r}") from None
    if match["exp"]:
        exponent = int(match["exp"][1:])
        if abs(exponent) > 30:
            raise ValueError(f"quantity exponent out of range: {text!r}")
        number *= Fraction(10) ** exponent
    else:
        number *= _SUFFIXES[match["suffix"] or ""]
    if match["sign"] == "-":
        number = -number
    return -((-number.numerator) // number.denominator)
