"""A node's DRA devices as ResourceSlice objects, and what to write to make the API server hold them.

One pool per node, named after the node (as every node-local driver does). Its devices are cut into as few slices as
the API allows: 128 devices per slice, 64 when a device in the slice has taints (`resource.k8s.io/v1` validation).
Every slice of the pool carries the same `pool.generation` and the pool's `resourceSliceCount`; the scheduler uses
only the slices of a pool's highest generation, so **any** change rewrites every slice under a new generation, and a
pool that is left half-written is completed under a newer one.

Which slices are nvdp's: those of this driver on this node (`spec.driver`, `spec.nodeName`, which the API server
lets nvdp select by field) with the label `app.kubernetes.io/managed-by=nvdp`; `nvdp.dev/slice-index` says which
part of the pool a slice holds. Slices are created with `generateName` (`<index, 5 hex digits>-<driver>-<node>-`,
as Kubernetes' own publishing helper names them, so `kubectl get resourceslices` sorts them in pool order) and carry
an owner reference to the Node, so deleting the Node deletes them.

`plan_sync()` is the whole decision, a pure function: the slices the API server has, the devices wanted -> deletes
first (slices of no use any more), then updates (with the resourceVersion they were read at, so a concurrent change
is a conflict, not lost), then creates.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nvdp.core.dra.devices import is_dns_subdomain

API_VERSION = "resource.k8s.io/v1"
KIND = "ResourceSlice"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "nvdp"
#: Which part of the pool a slice holds: 0 .. resourceSliceCount - 1.
INDEX_LABEL = "nvdp.dev/slice-index"
MAX_DEVICES_PER_SLICE = 128
#: The limit when any device of the slice has taints (or counters, or list attributes, which nvdp does not use).
MAX_DEVICES_PER_SLICE_TAINTED = 64
#: `generateName` gets 5 random characters appended; the name must stay a DNS subdomain of at most 253.
_MAX_GENERATE_NAME = 240


@dataclass(frozen=True, slots=True)
class Pool:
    """Whose slices: the node (its name is the pool's name) and the driver."""

    node_name: str
    #: The Node's UID, for the owner reference.
    node_uid: str
    driver: str

    def __post_init__(self) -> None:
        if not is_dns_subdomain(self.node_name):
            raise ValueError(f"node name {self.node_name!r} is not a DNS subdomain: it cannot name a DRA pool")
        if not is_dns_subdomain(self.driver, 63):
            raise ValueError(f"DRA driver name {self.driver!r} is not a DNS subdomain of at most 63 characters")


def split(devices: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Devices in order, cut into slices as full as the limits allow (at least one slice, maybe empty: a pool
    with no devices is still published, so the scheduler knows the node has none)."""
    chunks: list[list[Mapping[str, Any]]] = [[]]
    tainted = False
    for device in devices:
        has_taints = bool(device.get("taints"))
        limit = MAX_DEVICES_PER_SLICE_TAINTED if (tainted or has_taints) else MAX_DEVICES_PER_SLICE
        if len(chunks[-1]) + 1 > limit:
            chunks.append([])
            tainted = False
        chunks[-1].append(device)
        tainted = tainted or has_taints
    return chunks


def generate_name(pool: Pool, index: int) -> str:
    base = f"{index:05x}-{pool.driver}-{pool.node_name}"[:_MAX_GENERATE_NAME]
    return re.sub(r"[.-]+$", "", base) + "-"


def labels(index: int) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY, INDEX_LABEL: str(index)}


def label_selector() -> str:
    return f"{MANAGED_BY_LABEL}={MANAGED_BY}"


def slice_spec(pool: Pool, devices: Sequence[Mapping[str, Any]], generation: int, count: int) -> dict[str, Any]:
    return {
        "driver": pool.driver,
        "pool": {"name": pool.node_name, "generation": generation, "resourceSliceCount": count},
        "nodeName": pool.node_name,
        # Copies: a body may be changed on its way (the API server's answer replaces it), the devices must not.
        "devices": [copy.deepcopy(dict(d)) for d in devices],
    }


def slice_object(pool: Pool, index: int, spec: dict[str, Any]) -> dict[str, Any]:
    """A new slice, for a create (`metadata.generateName`)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "generateName": generate_name(pool, index),
            "labels": labels(index),
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": pool.node_name, "uid": pool.node_uid,
                                 "controller": True}],
        },
        "spec": spec,
    }


def build_slices(pool: Pool, devices: Sequence[Mapping[str, Any]], generation: int) -> list[dict[str, Any]]:
    """Every slice of the pool at `generation`, as objects to create."""
    chunks = split(devices)
    return [slice_object(pool, i, slice_spec(pool, chunk, generation, len(chunks))) for i, chunk in enumerate(chunks)]


@dataclass(frozen=True, slots=True)
class SliceState:
    """One slice as the API server has it (the fields `plan_sync` reads)."""

    name: str
    uid: str
    resource_version: str
    labels: Mapping[str, str]
    spec: Mapping[str, Any]

    @property
    def index(self) -> int | None:
        text = self.labels.get(INDEX_LABEL, "")
        return int(text) if text.isdigit() else None

    @property
    def generation(self) -> int:
        pool = self.spec.get("pool") or {}
        value = pool.get("generation", 0) if isinstance(pool, Mapping) else 0
        return value if isinstance(value, int) else 0


@dataclass(frozen=True, slots=True)
class Delete:
    name: str
    uid: str
    resource_version: str


@dataclass(frozen=True, slots=True)
class Update:
    name: str
    #: The object to PUT: the slice as read, with the new spec (metadata.resourceVersion makes it conditional).
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Create:
    index: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """Writes in the order they must happen; empty when the API server already holds the pool."""

    #: The pool's generation once the writes are done.
    generation: int
    deletes: tuple[Delete, ...] = ()
    updates: tuple[Update, ...] = ()
    creates: tuple[Create, ...] = field(default=())

    @property
    def in_sync(self) -> bool:
        return not (self.deletes or self.updates or self.creates)

    @property
    def writes(self) -> int:
        return len(self.deletes) + len(self.updates) + len(self.creates)


def normalise_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A slice's spec without what the API server fills in itself (a taint's `timeAdded`), for comparing what is
    there with what nvdp would write."""
    out = dict(spec)
    devices = []
    for device in spec.get("devices") or ():
        if isinstance(device, Mapping) and device.get("taints"):
            device = dict(device)
            device["taints"] = [{k: v for k, v in t.items() if k != "timeAdded"} for t in device["taints"]]
        devices.append(device)
    out["devices"] = devices
    return out


def _ours(pool: Pool, state: SliceState) -> bool:
    return state.spec.get("driver") == pool.driver and state.spec.get("nodeName") == pool.node_name


def plan_sync(
    pool: Pool, devices: Sequence[Mapping[str, Any]], actual: Sequence[SliceState], generation: int,
) -> SyncPlan:
    """What to write so that the API server holds exactly `devices` for the pool.

    `actual` is every slice nvdp's selectors found (its driver, its node, its label); `generation` the highest
    generation nvdp has written so far (0 at first), so a generation never goes back, even after every slice was
    deleted. Nothing to write when each part of the pool is there once, all at the highest generation seen, with
    the wanted devices. Otherwise every part is written again at that generation + 1: surplus slices (a second
    copy of a part, a part beyond the new count, a slice of another pool) deleted first, the others updated in
    place, missing parts created.
    """
    chunks = split(devices)
    count = len(chunks)
    current = max([generation, *(s.generation for s in actual)])
    kept: dict[int, SliceState] = {}
    surplus: list[SliceState] = []
    for state in sorted(actual, key=lambda s: (s.generation, s.name), reverse=True):
        index = state.index
        if index is None or index >= count or index in kept or not _ours(pool, state) \
                or (state.spec.get("pool") or {}).get("name") != pool.node_name:
            surplus.append(state)
        else:
            kept[index] = state
    if not surplus and len(kept) == count and all(
            normalise_spec(kept[i].spec) == slice_spec(pool, chunks[i], current, count) for i in range(count)):
        return SyncPlan(current)
    new = current + 1
    deletes = tuple(Delete(s.name, s.uid, s.resource_version) for s in sorted(surplus, key=lambda s: s.name))
    updates = []
    creates = []
    for i, chunk in enumerate(chunks):
        spec = slice_spec(pool, chunk, new, count)
        if i in kept:
            state = kept[i]
            _keep_taint_times(spec, state.spec)
            body = slice_object(pool, i, spec)
            meta = body["metadata"]
            del meta["generateName"]
            meta["name"] = state.name
            meta["resourceVersion"] = state.resource_version
            updates.append(Update(state.name, body))
        else:
            creates.append(Create(i, slice_object(pool, i, spec)))
    return SyncPlan(new, deletes, tuple(updates), tuple(creates))


def _keep_taint_times(spec: dict[str, Any], old: Mapping[str, Any]) -> None:
    """A taint still there keeps the `timeAdded` the API server gave it: it says how long a device has been bad."""
    times = {}
    for device in old.get("devices") or ():
        for taint in (device.get("taints") or ()) if isinstance(device, Mapping) else ():
            if taint.get("timeAdded"):
                key = (device.get("name"), taint.get("key"), taint.get("value"), taint.get("effect"))
                times[key] = taint["timeAdded"]
    for device in spec["devices"]:
        for taint in device.get("taints") or ():
            added = times.get((device.get("name"), taint.get("key"), taint.get("value"), taint.get("effect")))
            if added:
                taint["timeAdded"] = added
