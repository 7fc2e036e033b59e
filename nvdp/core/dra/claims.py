"""From a ResourceClaim (resource.k8s.io/v1, as the API returns it) to what nvdp must prepare on this node.

`plan_claim` does what the Go kubelet-plugin helper and NVIDIA's driver do before touching anything: the claim's
UID must be the one the kubelet asked for (else the claim was deleted and re-created under the same name), it
must be allocated, only this driver's results count, each of them must be a device nvdp serves in this node's pool,
and each gets its config by NVIDIA's precedence:

* the candidates are, in order of rising precedence, the built-in defaults (whole GPU and MIG device exclusive),
  the DeviceClass's configs (`source: FromClass`) and the claim's own (`FromClaim`), each in list order; entries of
  other drivers are skipped, every entry of this driver is decoded strictly (`nvdp.core.dra.config`);
* for each result the list is scanned **backwards**: the first entry whose `requests` names the result's request
  wins (and must suit the device: a `GpuConfig` for a whole GPU, a `MigDeviceConfig` for a MIG device, else an
  error), otherwise the first entry with no `requests` whose kind suits the device. `requests: [main]` also covers
  the subrequests `main/<sub>` (the API's rule; NVIDIA's driver matches names exactly).

Results with the same winning entry form a config group: NVIDIA's driver applies a config once per group, and an
MPS config's per-device limits index the group's devices. Only configs that win for some result are normalised
and checked, as there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from nvdp.core.dra.config import (
    DEFAULT_GPU_CONFIG,
    DEFAULT_MIG_CONFIG,
    GPU_CONFIG,
    MIG_DEVICE_CONFIG,
    MPS,
    ConfigSpec,
    DeviceConfig,
    DeviceConfigError,
    GpuConfigSpec,
    decode_config,
    normalize_config,
    pinned_limits,
)
from nvdp.core.dra.types import ClaimRef
from nvdp.core.inventory import Gpu, MigDevice, NodeInventory


class ClaimError(Exception):
    """The claim cannot be prepared on this node; the message is the per-claim error the kubelet shows."""


@dataclass(frozen=True, slots=True)
class NodeDevice:
    """A device nvdp serves through DRA: a whole GPU, or a MIG device with the GPU it is carved from."""

    gpu: Gpu
    mig: MigDevice | None = None

    @property
    def uuid(self) -> str:
        return self.mig.uuid if self.mig is not None else self.gpu.uuid

    @property
    def kind(self) -> str:
        """`gpu` or `mig`, the `type` attribute NVIDIA's driver publishes."""
        return "mig" if self.mig is not None else "gpu"

    @classmethod
    def of(cls, inventory: NodeInventory, device: Gpu | MigDevice) -> NodeDevice:
        """The node device of an inventory GPU or MIG device (a MIG device's parent is looked up)."""
        if isinstance(device, Gpu):
            return cls(device)
        for gpu in inventory.gpus:
            if any(mig.uuid == device.uuid for mig in gpu.mig_devices):
                return cls(gpu, device)
        raise ValueError(f"MIG device {device.uuid} is on no GPU of the inventory")


class Mount(msgspec.Struct, frozen=True, rename="camel", kw_only=True):
    """A bind mount a claim's device adds to the container (MPS pipe and shm directories)."""

    host_path: str
    container_path: str
    options: tuple[str, ...] = ()


class DeviceEdits(msgspec.Struct, frozen=True, rename="camel", kw_only=True):
    """Container edits one prepared device adds besides its device nodes: `KEY=VALUE` env entries and mounts."""

    env: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device of a claim to prepare: where it was allocated, its node device and its config."""

    #: The request as allocated: `main`, or `main/sub` for a subrequest.
    request: str
    pool: str
    device: str
    node_device: NodeDevice
    config: DeviceConfig
    #: The config entry that won for this device: its index in the candidate list (-2 and -1: the built-in GPU and
    #: MIG defaults). Devices with the same group share one application of the config.
    group: int
    admin_access: bool = False
    #: Consumable capacity: the share this allocation got, and what it consumes (name -> quantity as written).
    share_id: str = ""
    consumed_capacity: tuple[tuple[str, str], ...] = ()
    #: MPS only: this device's pinned device-memory limit in MiB, or None.
    mps_pinned_mib: int | None = None
    #: An MPS share of a share host (`nvdp.core.dra.shares.plan_shares`): the memory (bytes, > 0) and compute units
    #: it consumes; 0 for anything else.
    share_memory_bytes: int = 0
    share_compute: int = 0

    @property
    def request_name(self) -> str:
        """The name the kubelet matches against `container.resources.claims[].request` (`main/sub` -> `main`)."""
        return self.request.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class ClaimPlan:
    ref: ClaimRef
    devices: tuple[DevicePlan, ...]


class _Lenient(msgspec.Struct, rename="camel", kw_only=True):
    pass


class _Opaque(_Lenient):
    driver: str = ""
    parameters: object = None


class _ConfigEntry(_Lenient):
    source: str = ""
    requests: list[str] = msgspec.field(default_factory=list)
    opaque: _Opaque | None = None


class _Result(_Lenient):
    request: str = ""
    driver: str = ""
    pool: str = ""
    device: str = ""
    admin_access: bool | None = None
    share_id: str | None = msgspec.field(default=None, name="shareID")
    consumed_capacity: dict[str, str | int | float] | None = None


class _DeviceAllocation(_Lenient):
    results: list[_Result] = msgspec.field(default_factory=list)
    config: list[_ConfigEntry] = msgspec.field(default_factory=list)


class _Allocation(_Lenient):
    devices: _DeviceAllocation | None = None


class _Status(_Lenient):
    allocation: _Allocation | None = None


class _Meta(_Lenient):
    name: str = ""
    namespace: str = ""
    uid: str = ""


class _Claim(_Lenient):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    status: _Status = msgspec.field(default_factory=_Status)


@dataclass(frozen=True, slots=True)
class _Candidate:
    requests: tuple[str, ...]
    spec: ConfigSpec | None
    #: For the built-in defaults (spec None): the config itself.
    default: DeviceConfig | None = None

    @property
    def kind(self) -> str:
        if self.default is not None:
            return self.default.kind
        return GPU_CONFIG if isinstance(self.spec, GpuConfigSpec) else MIG_DEVICE_CONFIG


def plan_claim(
    claim: object, ref: ClaimRef, driver: str, pool: str, devices: Mapping[str, NodeDevice],
) -> ClaimPlan | str:
    """The devices of `claim` (the API's JSON as a dict, or a msgspec struct encoding to it) this driver prepares on
    this node, or the per-claim error saying why it cannot."""
    try:
        return _plan(claim, ref, driver, pool, devices)
    except ClaimError as e:
        return str(e)


def _plan(claim: object, ref: ClaimRef, driver: str, pool: str, devices: Mapping[str, NodeDevice]) -> ClaimPlan:
    where = f"claim {ref.namespace}/{ref.name}"
    if isinstance(claim, msgspec.Struct):
        # A caller's own typed claim: read it through its wire names, like the JSON it came from.
        claim = msgspec.to_builtins(claim)
    try:
        decoded = msgspec.convert(claim, _Claim)
    except msgspec.ValidationError as e:
        raise ClaimError(f"{where}: unreadable ResourceClaim: {e}") from None
    if decoded.metadata.uid != ref.uid:
        raise ClaimError(f"{where} got replaced: its UID is {decoded.metadata.uid or '(none)'}, the kubelet asked "
                         f"for {ref.uid}")
    allocation = decoded.status.allocation
    if allocation is None or allocation.devices is None:
        raise ClaimError(f"{where} not allocated")
    results = [r for r in allocation.devices.results if r.driver == driver]
    candidates = _candidates(allocation.devices.config, driver, where)

    chosen: list[tuple[_Result, NodeDevice, int]] = []
    for result in results:
        if result.pool != pool:
            raise ClaimError(f"{where}: device {result.device} was allocated from pool {result.pool!r}, but this "
                             f"node's pool is {pool!r}")
        node_device = devices.get(result.device)
        if node_device is None:
            raise ClaimError(f"{where}: device {result.device} is not served through DRA on this node")
        chosen.append((result, node_device, _winner(candidates, result, node_device, where)))

    configs: dict[int, DeviceConfig] = {}
    for _, _, index in chosen:
        if index not in configs:
            configs[index] = _normalized(candidates[index + 2], where)
    limits: dict[int, dict[str, int]] = {}
    for index, config in configs.items():
        if config.sharing is not None and config.sharing.strategy == MPS and config.sharing.mps is not None:
            uuids = [node_device.uuid for _, node_device, i in chosen if i == index]
            try:
                limits[index] = pinned_limits(config.sharing.mps, uuids)
            except DeviceConfigError as e:
                raise ClaimError(f"{where}: {e}") from None

    plans = []
    for result, node_device, index in chosen:
        capacity = tuple(sorted((name, str(value)) for name, value in (result.consumed_capacity or {}).items()))
        plans.append(DevicePlan(
            request=result.request, pool=result.pool, device=result.device, node_device=node_device,
            config=configs[index], group=index, admin_access=bool(result.admin_access),
            share_id=result.share_id or "", consumed_capacity=capacity,
            mps_pinned_mib=limits.get(index, {}).get(node_device.uuid)))
    return ClaimPlan(ref, tuple(plans))


def _candidates(entries: list[_ConfigEntry], driver: str, where: str) -> list[_Candidate]:
    """The built-in defaults, then class configs, then claim configs, of this driver, decoded."""
    by_source: dict[str, list[_Candidate]] = {"FromClass": [], "FromClaim": []}
    for position, entry in enumerate(entries):
        if entry.source not in by_source:
            raise ClaimError(f"{where}: config[{position}] has an invalid source {entry.source!r}")
        if entry.opaque is None:
            raise ClaimError(f"{where}: config[{position}] is not opaque: only opaque parameters are supported")
        if entry.opaque.driver != driver:
            continue
        try:
            spec = decode_config(entry.opaque.parameters)
        except DeviceConfigError as e:
            raise ClaimError(f"{where}: config[{position}]: {e}") from None
        by_source[entry.source].append(_Candidate(tuple(entry.requests), spec))
    defaults = [_Candidate((), None, DEFAULT_GPU_CONFIG), _Candidate((), None, DEFAULT_MIG_CONFIG)]
    return defaults + by_source["FromClass"] + by_source["FromClaim"]


def _winner(candidates: list[_Candidate], result: _Result, device: NodeDevice, where: str) -> int:
    """The index (minus the two defaults) of the config that applies to `result`."""
    main = result.request.split("/", 1)[0]
    wanted = GPU_CONFIG if device.kind == "gpu" else MIG_DEVICE_CONFIG
    for position in range(len(candidates) - 1, -1, -1):
        candidate = candidates[position]
        if result.request in candidate.requests or main in candidate.requests:
            if candidate.kind != wanted:
                raise ClaimError(f"{where}: cannot apply {candidate.kind} to device {result.device!r} of type "
                                 f"{device.kind!r} (request: {result.request})")
            return position - 2
        if not candidate.requests and candidate.kind == wanted:
            return position - 2
    raise AssertionError("the built-in defaults match every device")  # pragma: no cover


def _normalized(candidate: _Candidate, where: str) -> DeviceConfig:
    if candidate.default is not None:
        return candidate.default
    assert candidate.spec is not None
    try:
        return normalize_config(candidate.spec)
    except DeviceConfigError as e:
        raise ClaimError(f"{where}: error validating {candidate.kind}: {e}") from None
