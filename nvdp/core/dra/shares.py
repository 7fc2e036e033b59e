"""Dynamic MPS shares through DRA consumable capacity (KEP-5075): config, published capacities, accounting, limits.

A GPU selected by `dra.sharing.mps` is a *share host*: nvdp publishes it with `allowMultipleAllocations: true`
and two consumable capacities, `memory` (bytes) and a compute capacity (`computePercent`, or `multiprocessors`),
each with a `requestPolicy`. The scheduler hands out shares of it; each allocation result carries a `shareID` and
the `consumedCapacity` the scheduler booked. nvdp checks that booking rather than trusting it (`over_commit`: the
shares prepared on a GPU never add up to more than the GPU), and enforces each share with MPS: one control daemon
per GPU shared by every share on it, each share's client limits in its claim's CDI edits (`client_edits`), and the
daemon's default pinned-memory limit at the largest share prepared there (`daemon_defaults`), because a client's
own env can only lower the default it gets.

Pure: plain values in, plain values out. The shell is `nvdp.dra.mps_shares` (daemons) and `nvdp.dra.prepare`
(claims).

The config section (`dra.sharing.mps`), every key optional but `devices`:

    devices: all | <count> | ["0", "GPU-...", ...]   # whole GPUs only
    memory:  {minimum: 1Gi, step: 256Mi, default: 4Gi}  # default: minimum 1Mi, step 1Mi, default the whole GPU
    compute: {capacity: computePercent | multiprocessors, minimum: 0, step: 1, default: 0}
    keepWarm: 5m                                     # keep an idle daemon this long; default none (0)

A compute amount of 0 means "no compute cap" (the share's processes may use every SM); any other amount becomes
`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (a percentage directly, multiprocessors as their share of the GPU, rounded up).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import msgspec

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.sharing import device_ref_kind
from nvdp.core.dra.claims import ClaimPlan, DeviceEdits, DevicePlan, Mount
from nvdp.core.dra.config import GPU_CONFIG, MIB, MPS, DeviceConfig, MpsSettings, Sharing, parse_quantity
from nvdp.core.inventory import Gpu

GIB: Final = 1 << 30
MEMORY: Final = "memory"
COMPUTE_PERCENT: Final = "computePercent"
MULTIPROCESSORS: Final = "multiprocessors"
ComputeCapacity = Literal["computePercent", "multiprocessors"]
#: The API's bound on `validValues` (`CapacityRequestPolicyDiscreteMaxOptions`).
MAX_VALID_VALUES: Final = 10
#: Where a share's client finds its GPU's shm tmpfs (as in the device plugin's MPS slices).
SHM_CONTAINER_PATH: Final = "/dev/shm"
_BIND: Final = ("rw", "nosuid", "nodev", "bind")
#: The taint key a share host gets while its shares cannot be served (XID, dead daemon).
TAINT_KEY: Final = "gpu.nvidia.com/mps-shares"

Quantity = str | int


class _Strict(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class MemoryPolicySpec(_Strict):
    minimum: Quantity | None = None
    step: Quantity | None = None
    default: Quantity | None = None


class ComputePolicySpec(_Strict):
    capacity: str = COMPUTE_PERCENT
    minimum: int | None = None
    step: int | None = None
    default: int | None = None

    def __post_init__(self) -> None:
        if self.capacity not in (COMPUTE_PERCENT, MULTIPROCESSORS):
            raise ValueError(f"compute.capacity must be {COMPUTE_PERCENT} or {MULTIPROCESSORS}, "
                             f"not {self.capacity!r}")
        for key in ("minimum", "step", "default"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"compute.{key} must not be negative, got {value}")
        if self.step == 0:
            raise ValueError("compute.step must be at least 1")


class MpsSharesSpec(_Strict):
    """`dra.sharing.mps` as written; a struct the config schema can embed (every rule is checked on decoding, so
    msgspec reports a broken one with its path)."""

    devices: str | int | list[int | str]
    memory: MemoryPolicySpec | None = None
    compute: ComputePolicySpec | None = None
    keep_warm: str | int | float | None = None

    def __post_init__(self) -> None:
        _checked(self)

    def checked(self) -> MpsSharesConfig:
        """The section as a checked config (it was checked when decoded; this cannot fail)."""
        return _checked(self)


@dataclass(frozen=True, slots=True)
class MpsSharesConfig:
    """`dra.sharing.mps`, checked: which GPUs, and the request policies in bytes and compute units."""

    #: "all", a count of GPUs (the first N by index), or references (GPU index or UUID), in order.
    devices: str | int | tuple[str, ...]
    memory_minimum: int = MIB
    memory_step: int = MIB
    #: None: the whole (rounded) GPU.
    memory_default: int | None = None
    compute_capacity: ComputeCapacity = COMPUTE_PERCENT
    compute_minimum: int = 0
    compute_step: int = 1
    compute_default: int = 0
    #: How long an idle GPU's daemon is kept after its last share went; 0: stopped at once.
    keep_warm_s: float = 0.0


def decode_mps_shares(raw: object, where: str = "dra.sharing.mps") -> MpsSharesConfig:
    """The section as parsed from YAML/JSON into a checked config; `ConfigError` names the key and the rule."""
    try:
        return msgspec.convert(raw, MpsSharesSpec).checked()
    except msgspec.ValidationError as e:
        raise ConfigError(f"{where}: {e}") from None


def _checked(spec: MpsSharesSpec) -> MpsSharesConfig:
    devices = _devices(spec.devices)
    memory = spec.memory or MemoryPolicySpec()
    minimum = _bytes(memory.minimum, "memory.minimum", MIB)
    step = _bytes(memory.step, "memory.step", MIB)
    default = None if memory.default is None else _bytes(memory.default, "memory.default", 0)
    if minimum < 1:
        raise ValueError("memory.minimum must be at least 1 byte (MPS cannot limit a client to nothing)")
    if step < 1:
        raise ValueError("memory.step must be at least 1 byte")
    if minimum % MIB or step % MIB:
        # MPS limits are set in MiB (`<n>M`): a share that is not whole MiB could not be enforced as booked.
        raise ValueError(f"memory.minimum and memory.step must be whole MiB (multiples of {MIB}), got "
                         f"{minimum} and {step}")
    if default is not None:
        if default < minimum:
            raise ValueError(f"memory.default ({_size(default)}) is less than memory.minimum ({_size(minimum)})")
        if (default - minimum) % step:
            raise ValueError(f"memory.default ({_size(default)}) is not memory.minimum ({_size(minimum)}) plus a "
                             f"multiple of memory.step ({_size(step)})")
    compute = spec.compute or ComputePolicySpec()
    c_min = compute.minimum or 0
    c_step = compute.step or 1
    c_default = c_min if compute.default is None else compute.default
    if c_default < c_min or (c_default - c_min) % c_step:
        raise ValueError(f"compute.default ({c_default}) must be compute.minimum ({c_min}) plus a multiple of "
                         f"compute.step ({c_step})")
    if compute.capacity == COMPUTE_PERCENT and max(c_min, c_default) > 100:
        raise ValueError(f"compute.minimum and compute.default are percentages: at most 100, got {c_min} and "
                         f"{c_default}")
    keep_warm = _seconds(spec.keep_warm)
    capacity: ComputeCapacity = MULTIPROCESSORS if compute.capacity == MULTIPROCESSORS else COMPUTE_PERCENT
    return MpsSharesConfig(devices=devices, memory_minimum=minimum, memory_step=step, memory_default=default,
                           compute_capacity=capacity, compute_minimum=c_min, compute_step=c_step,
                           compute_default=c_default, keep_warm_s=keep_warm)


def _devices(devices: str | int | list[int | str]) -> str | int | tuple[str, ...]:
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices set as {devices!r} but the only valid string is 'all'")
        return devices
    if isinstance(devices, int):
        if devices <= 0:
            raise ValueError(f"devices set as {devices} but a count of GPUs must be > 0")
        return devices
    if not devices:
        raise ValueError("devices is an empty list: list the GPUs to share, or write 'all'")
    refs: list[str] = []
    for entry in devices:
        ref = str(entry)
        kind = device_ref_kind(ref)
        if kind in ("mig-index", "mig-uuid"):
            raise ValueError(f"devices: {ref!r} is a MIG device: MPS shares are of whole GPUs")
        if kind is None:
            raise ValueError(f"devices: unsupported device {entry!r}: expected a GPU index (0) or a GPU UUID "
                             "(GPU-...)")
        refs.append(ref)
    return tuple(dict.fromkeys(refs))


def _bytes(value: Quantity | None, key: str, default: int) -> int:
    if value is None:
        return default
    try:
        return parse_quantity(value)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h)?")


def _seconds(value: str | int | float | None) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        raise ValueError(f"keepWarm must be a duration (30s, 5m, 1h) or seconds, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"keepWarm must be a duration (30s, 5m, 1h) or seconds, not {value!r}")
        seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2] or "s"]
    if not 0 <= seconds <= 86400:
        raise ValueError(f"keepWarm must be between 0 and 24h, got {value!r}")
    return seconds


# --- per GPU ------------------------------------------------------------------------------------------------------


def selected_gpus(config: MpsSharesConfig, gpus: Sequence[Gpu]) -> tuple[Gpu, ...]:
    """The share hosts among the node's GPUs (by index order); `ConfigError` when a reference names no GPU or a GPU
    that cannot host shares (MIG enabled)."""
    ordered = sorted(gpus, key=lambda g: g.index)
    if config.devices == "all":
        chosen = [g for g in ordered if not g.mig_enabled]
    elif isinstance(config.devices, int):
        if config.devices > len(ordered):
            raise ConfigError(f"dra.sharing.mps.devices: {config.devices} GPUs requested, the node has "
                              f"{len(ordered)}")
        chosen = ordered[:config.devices]
    else:
        chosen = []
        for ref in config.devices:
            hits = [g for g in ordered if ref in (str(g.index), g.uuid)]
            if not hits:
                raise ConfigError(f"dra.sharing.mps.devices: {ref!r} names no GPU of this node")
            chosen.extend(h for h in hits if h not in chosen)
    for gpu in chosen:
        if gpu.mig_enabled:
            raise ConfigError(f"dra.sharing.mps.devices: GPU {gpu.index} ({gpu.uuid}) has MIG enabled: MPS shares "
                              "need a whole GPU")
    return tuple(chosen)


@dataclass(frozen=True, slots=True)
class SharePolicy:
    """What one share host publishes and enforces: its capacities and request policies, in bytes and units."""

    gpu_uuid: str
    gpu_index: int
    #: The published `memory` capacity: the GPU's memory rounded down to the step (from the minimum).
    memory_bytes: int
    memory_minimum: int
    memory_step: int
    memory_default: int
    compute_capacity: ComputeCapacity
    #: The published compute capacity: 100 (percent) or the GPU's multiprocessors.
    compute_total: int
    #: The largest request the policy allows: the total rounded down to the step (from the minimum).
    compute_maximum: int
    compute_minimum: int
    compute_step: int
    compute_default: int


def share_policy(gpu: Gpu, config: MpsSharesConfig) -> SharePolicy:
    """The policy of one share host; `ConfigError` when the config cannot fit this GPU."""
    label = f"GPU {gpu.index} ({gpu.uuid})"
    total = gpu.memory_mib * MIB
    minimum, step = config.memory_minimum, config.memory_step
    if minimum + step > total:
        raise ConfigError(f"dra.sharing.mps: {label} has {_size(total)} of memory: memory.minimum "
                          f"({_size(minimum)}) plus one memory.step ({_size(step)}) does not fit")
    memory = minimum + (total - minimum) // step * step
    default = memory if config.memory_default is None else config.memory_default
    if default > memory:
        raise ConfigError(f"dra.sharing.mps: memory.default ({_size(default)}) is more than {label} can share "
                          f"({_size(memory)})")
    if config.compute_capacity == MULTIPROCESSORS:
        if gpu.multiprocessors <= 0:
            raise ConfigError(f"dra.sharing.mps: compute.capacity is {MULTIPROCESSORS}, but the driver does not "
                              f"say how many {label} has; use {COMPUTE_PERCENT}")
        compute_total = gpu.multiprocessors
    else:
        compute_total = 100
    c_min, c_step, c_default = config.compute_minimum, config.compute_step, config.compute_default
    if c_min + c_step > compute_total:
        raise ConfigError(f"dra.sharing.mps: compute.minimum ({c_min}) plus one compute.step ({c_step}) is more than "
                          f"{label}'s {compute_total} {config.compute_capacity}")
    c_max = c_min + (compute_total - c_min) // c_step * c_step
    if c_default > c_max:
        raise ConfigError(f"dra.sharing.mps: compute.default ({c_default}) is more than {label} can share "
                          f"({c_max} {config.compute_capacity})")
    return SharePolicy(gpu_uuid=gpu.uuid, gpu_index=gpu.index, memory_bytes=memory, memory_minimum=minimum,
                       memory_step=step, memory_default=default, compute_capacity=config.compute_capacity,
                       compute_total=compute_total, compute_maximum=c_max, compute_minimum=c_min,
                       compute_step=c_step, compute_default=c_default)


def share_policies(config: MpsSharesConfig, gpus: Sequence[Gpu],
                   device_names: Mapping[str, str]) -> dict[str, SharePolicy]:
    """Device name -> policy of every share host; `device_names` maps GPU UUID -> its DRA device name (`gpu-0`)."""
    policies: dict[str, SharePolicy] = {}
    for gpu in selected_gpus(config, gpus):
        name = device_names.get(gpu.uuid)
        if name is None:
            raise ConfigError(f"dra.sharing.mps: GPU {gpu.index} ({gpu.uuid}) is not served through DRA "
                              "(dra.devices): it cannot host shares")
        policies[name] = share_policy(gpu, config)
    return policies


def format_quantity(value: int) -> str:
    """A Kubernetes quantity for an integer: binary suffix when exact (`40Gi`, `256Mi`), else the plain number."""
    for suffix, factor in (("Ti", 1 << 40), ("Gi", GIB), ("Mi", MIB), ("Ki", 1 << 10)):
        if value and value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)


def share_capacities(policy: SharePolicy) -> dict[str, dict[str, object]]:
    """The device's `capacity` map: `memory` and the compute capacity, each with its `requestPolicy`."""

    def entry(value: int, maximum: int, minimum: int, step: int, default: int,
              q: Callable[[int], str] = format_quantity) -> dict[str, object]:
        return {"value": q(value), "requestPolicy": {
            "default": q(default), "validRange": {"min": q(minimum), "max": q(maximum), "step": q(step)}}}

    return {
        MEMORY: entry(policy.memory_bytes, policy.memory_bytes, policy.memory_minimum, policy.memory_step,
                      policy.memory_default),
        policy.compute_capacity: entry(policy.compute_total, policy.compute_maximum, policy.compute_minimum,
                                       policy.compute_step, policy.compute_default, str),
    }


def share_device_overrides(gpu: Gpu, policy: SharePolicy) -> dict[str, object]:
    """What the slice builder puts over a share host's device dict: `allowMultipleAllocations` and the whole
    `capacity` map. The map is replaced, not merged: with multiple allocations every capacity is consumable, and
    one without a request policy would make each share consume all of it by default (one share per GPU)."""
    if gpu.uuid != policy.gpu_uuid:
        raise ValueError(f"policy of {policy.gpu_uuid} applied to {gpu.uuid}")
    return {"allowMultipleAllocations": True, "capacity": share_capacities(policy)}


def apply_share_overrides(device: Mapping[str, object], gpu: Gpu, policy: SharePolicy) -> dict[str, object]:
    """A copy of a ResourceSlice device dict with the overrides applied."""
    return {**device, **share_device_overrides(gpu, policy)}


def validate_request_policy(capacity_value: Quantity, policy: Mapping[str, object]) -> list[str]:
    """The API server's checks of one capacity's `requestPolicy` (resource/v1 validation: validValues xor validRange,
    a default inside it, min/max/default within the capacity, one step fitting, default and max aligned to the step
    from min). Returns the errors, [] when valid."""
    errors: list[str] = []
    value = parse_quantity(capacity_value)
    default_raw = policy.get("default")
    default = None if default_raw is None else parse_quantity(_quantity(default_raw))
    values = policy.get("validValues")
    valid_range = policy.get("validRange")
    if values and valid_range is not None:
        return ['exactly one policy can be specified, cannot specify "validValues" and "validRange" at the same time']
    if values:
        if not isinstance(values, list):
            return ["validValues must be a list"]
        if default is None:
            return ["default: required when validValues is defined"]
        options = [parse_quantity(_quantity(v)) for v in values]
        if len(options) > MAX_VALID_VALUES:
            return [f"validValues: must have at most {MAX_VALID_VALUES} items, has {len(options)}"]
        for i in range(len(options) - 1):
            if options[i] > options[i + 1]:
                errors.append(f"validValues[{i + 1}]: values must be sorted in ascending order")
        if len(set(options)) != len(options):
            errors.append("validValues: duplicate values")
        errors += [f"validValues[{i}]: option is larger than capacity value: {value}"
                   for i, option in enumerate(options) if option > value]
        if default not in options:
            errors.append("validValues: default value is not valid according to the requestPolicy")
        return errors
    if valid_range is not None:
        if not isinstance(valid_range, Mapping):
            return ["validRange must be an object"]
        if default is None:
            return ["default: required when validRange is defined"]
        if valid_range.get("min") is None:
            return ["validRange.min: required when validRange is defined"]
        minimum = parse_quantity(_quantity(valid_range["min"]))
        maximum = None if valid_range.get("max") is None else parse_quantity(_quantity(valid_range["max"]))
        step = None if valid_range.get("step") is None else parse_quantity(_quantity(valid_range["step"]))
        if minimum > value:
            errors.append(f"validRange.min: min is larger than capacity value: {value}")
        if default < minimum:
            errors.append(f"validRange.min: default is less than min: {minimum}")
        if maximum is not None:
            if minimum > maximum:
                errors.append(f"validRange.max: min is larger than max: {maximum}")
            if maximum > value:
                errors.append(f"validRange.max: max is larger than capacity value: {value}")
            if default > maximum:
                errors.append(f"validRange.max: default is more than max: {maximum}")
        if step is not None:
            if step <= 0:
                return [*errors, "validRange.step: must be positive"]
            if minimum + step > value:
                errors.append(f"validRange.step: one step {minimum + step} is larger than capacity value: {value}")
            for what, amount in (("default", default), ("max", maximum)):
                if amount is not None and (amount - minimum) % step:
                    errors.append(f"validRange.step: {what} {amount} is not a multiple of a given step ({step}) "
                                  f"from ({minimum})")
    return errors


def _quantity(value: object) -> Quantity:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return value
    raise ValueError(f"not a quantity: {value!r}")


# --- shares of a claim ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShareAmount:
    """What one share consumes: bytes of memory and units of the compute capacity."""

    memory_bytes: int
    compute: int = 0


@dataclass(frozen=True, slots=True)
class ShareLimits:
    """The MPS limits of one share's clients."""

    #: CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, in MiB.
    pinned_mib: int
    #: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; None: no cap.
    active_thread_percentage: int | None


def consumed_amount(consumed: Iterable[tuple[str, str]], policy: SharePolicy) -> ShareAmount:
    """A share's amounts from its allocation's `consumedCapacity` (names as published; an absent one consumed the
    policy's default, as the scheduler books it). ValueError says what is wrong with it."""
    amounts = dict(consumed)
    unknown = sorted(set(amounts) - {MEMORY, policy.compute_capacity})
    if unknown:
        raise ValueError(f"consumedCapacity names {', '.join(unknown)}, which this device does not publish "
                         f"(it publishes {MEMORY} and {policy.compute_capacity})")
    memory = parse_quantity(amounts[MEMORY]) if MEMORY in amounts else policy.memory_default
    compute_text = amounts.get(policy.compute_capacity)
    compute = parse_quantity(compute_text) if compute_text is not None else policy.compute_default
    if memory < MIB:
        raise ValueError(f"consumedCapacity memory {_size(memory)} is less than 1 MiB, the least MPS can enforce")
    if compute < 0:
        raise ValueError(f"consumedCapacity {policy.compute_capacity} is negative: {compute}")
    return ShareAmount(memory, compute)


def share_limits(policy: SharePolicy, amount: ShareAmount) -> ShareLimits:
    """The MPS limits that enforce `amount`: memory in whole MiB (rounded down, so never above the booking) and the
    compute amount as a thread percentage (rounded up: MPS allots whole SMs)."""
    percentage: int | None = None
    if amount.compute > 0:
        if policy.compute_capacity == MULTIPROCESSORS:
            percentage = min(100, -(-amount.compute * 100 // policy.compute_total))
        else:
            percentage = min(100, amount.compute)
    return ShareLimits(pinned_mib=amount.memory_bytes // MIB, active_thread_percentage=percentage)


def over_commit(device: str, policy: SharePolicy, held: Sequence[ShareAmount], new: ShareAmount) -> str | None:
    """Why `new` does not fit beside the shares `held` on this GPU (the per-claim error), or None."""
    shares = [*held, new]
    memory = sum(s.memory_bytes for s in shares)
    if memory > policy.memory_bytes:
        return (f"device {device} (GPU {policy.gpu_index}) cannot take a share of {_size(new.memory_bytes)} of "
                f"memory: {_size(memory)} requested in total, GPU has {_size(policy.memory_bytes)} "
                f"({len(held)} share(s) prepared: {_size(memory - new.memory_bytes)})")
    compute = sum(s.compute for s in shares)
    if compute > policy.compute_total:
        return (f"device {device} (GPU {policy.gpu_index}) cannot take a share of {new.compute} "
                f"{policy.compute_capacity}: {compute} requested in total, GPU has {policy.compute_total} "
                f"({len(held)} share(s) prepared: {compute - new.compute})")
    return None


def plan_shares(plan: ClaimPlan, hosts: Mapping[str, SharePolicy]) -> ClaimPlan | str:
    """The claim's devices on share hosts turned into MPS shares (config, limits and amounts set), or the per-claim
    error. Devices elsewhere are left as they are."""
    where = f"claim {plan.ref.namespace}/{plan.ref.name}"
    devices: list[DevicePlan] = []
    shared: set[str] = set()
    for device in plan.devices:
        policy = hosts.get(device.device)
        if policy is None:
            devices.append(device)
            continue
        if device.admin_access:
            devices.append(device)
            continue
        if not device.share_id:
            return (f"{where}: device {device.device} is published for MPS shares, but its allocation has no "
                    "shareID (allocated before it became a share host?): delete the claim to allocate it again")
        if device.config.sharing is not None:
            return (f"{where}: device {device.device} is an MPS share sized by the claim's capacity request; a "
                    f"{device.config.sharing.strategy} sharing config cannot apply to it")
        if device.device in shared:
            # One container environment holds one limit per GPU: two shares of a GPU in one claim would need their
            # sum, which the scheduler did not book as one share.
            return (f"{where}: two shares of device {device.device} in one claim: request one share of the total "
                    "instead")
        shared.add(device.device)
        try:
            amount = consumed_amount(device.consumed_capacity, policy)
        except ValueError as e:
            return f"{where}: share {device.share_id} of device {device.device}: {e}"
        limits = share_limits(policy, amount)
        sharing = Sharing(MPS, mps=MpsSettings(active_thread_percentage=limits.active_thread_percentage,
                                               pinned_memory_limit_mib=limits.pinned_mib))
        devices.append(replace(device, config=DeviceConfig(GPU_CONFIG, sharing), mps_pinned_mib=limits.pinned_mib,
                               share_memory_bytes=amount.memory_bytes, share_compute=amount.compute))
    return ClaimPlan(plan.ref, tuple(devices))


# --- MPS ----------------------------------------------------------------------------------------------------------


def client_edits(pipe_dir: str, shm_dir: str, pinned_mib: int | None, active_thread_percentage: int | None,
                 ) -> DeviceEdits:
    """What an MPS client container of one GPU's daemon gets: its pipe directory (same path inside), the shm tmpfs
    at /dev/shm, and its limits. Device ordinal 0: the container sees its one GPU as device 0."""
    env = [f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}"]
    if pinned_mib is not None:
        env.append(f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={pinned_mib}M")
    if active_thread_percentage is not None:
        env.append(f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={active_thread_percentage}")
    mounts = (Mount(host_path=pipe_dir, container_path=pipe_dir, options=_BIND),
              Mount(host_path=shm_dir, container_path=SHM_CONTAINER_PATH, options=_BIND))
    return DeviceEdits(env=tuple(env), mounts=mounts)


def daemon_defaults(limits: Iterable[tuple[int | None, int | None]], gpu_memory_mib: int) -> tuple[int, int]:
    """A GPU daemon's default (pinned MiB, active thread percentage) for its clients' (pinned MiB, percentage): the
    largest of each, since a client's env can only lower the default; a client without a limit needs none (the
    whole GPU, 100 %)."""
    pinned = percentage = 0
    seen = False
    for client_pinned, client_percentage in limits:
        seen = True
        pinned = max(pinned, gpu_memory_mib if client_pinned is None else client_pinned)
        percentage = max(percentage, 100 if client_percentage is None else client_percentage)
    if not seen:
        return gpu_memory_mib, 100
    return pinned, percentage


def share_host_transition(current: Mapping[str, SharePolicy], wanted: Mapping[str, SharePolicy],
                          prepared: Mapping[str, int]) -> tuple[dict[str, SharePolicy], dict[str, str]]:
    """A config reload's new share hosts, as far as they may apply now. A device whose mode changes (it becomes a
    share host, or stops being one) while claims are prepared on it keeps its current mode until they are gone;
    a share host that stays one takes its new policy at once. `prepared`: device name -> claims prepared on it.
    Returns (share hosts to use now, device -> why it waits), for the log, a metric, an Event and status; call
    again after each unprepare."""
    now: dict[str, SharePolicy] = {}
    waiting: dict[str, str] = {}
    for device in sorted(set(current) | set(wanted)):
        count = prepared.get(device, 0)
        if device in current and device in wanted:
            now[device] = wanted[device]
        elif device in current:
            if count:
                now[device] = current[device]
                waiting[device] = (f"{device} stays an MPS share host until its {count} prepared claim(s) are "
                                   "unprepared")
        elif count:
            waiting[device] = (f"{device} becomes an MPS share host once its {count} prepared claim(s) are "
                               "unprepared")
        else:
            now[device] = wanted[device]
    return now, waiting


def unhealthy_share_hosts(hosts: Mapping[str, SharePolicy], daemon_healthy: Mapping[str, bool]) -> dict[str, str]:
    """Device name -> reason for each share host whose MPS daemon runs but does not answer, or is between lives
    (`MpsDaemons.healthy`, by GPU UUID): every share on it is Unhealthy. A host without a daemon (no share
    prepared) is not: the next share starts one."""
    return {device: f"the MPS control daemon of GPU {policy.gpu_index} does not answer"
            for device, policy in hosts.items() if daemon_healthy.get(policy.gpu_uuid) is False}


# --- health -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShareHealth:
    claim_uid: str
    device: str
    share_id: str
    healthy: bool
    #: Why not healthy ("" when healthy).
    reason: str = ""


def share_health(shares: Iterable[tuple[str, str, str, str]], problems: Mapping[str, str]) -> tuple[ShareHealth, ...]:
    """The health of every prepared share: (claim UID, device, share ID, GPU UUID) in, Unhealthy for each share on a
    GPU in `problems` (GPU UUID -> reason: an XID, its MPS daemon dead), in input order."""
    return tuple(ShareHealth(uid, device, share_id, gpu not in problems, problems.get(gpu, ""))
                 for uid, device, share_id, gpu in shares)


def share_host_taints(xid: int | None, daemon_down: bool) -> list[dict[str, str]]:
    """The taints a share host gets so that no new share lands on it: one per problem, NoSchedule (running shares
    stay: their pods see the health stream)."""
    taints = []
    if xid is not None:
        taints.append({"key": TAINT_KEY, "value": f"xid-{xid}", "effect": "NoSchedule"})
    if daemon_down:
        taints.append({"key": TAINT_KEY, "value": "mps-daemon-down", "effect": "NoSchedule"})
    return taints


def _size(value: int) -> str:
    """Bytes in the unit people read (`41 GiB`, `512 MiB`, `40.5 GiB`)."""
    if value >= GIB:
        gib = value / GIB
        return f"{gib:.0f} GiB" if value % GIB == 0 else f"{gib:.2f}".rstrip("0").rstrip(".") + " GiB"
    if value >= MIB:
        mib = value / MIB
        return f"{mib:.0f} MiB" if value % MIB == 0 else f"{mib:.2f}".rstrip("0").rstrip(".") + " MiB"
    return f"{value} B"
