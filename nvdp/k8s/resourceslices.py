"""resource.k8s.io/v1 ResourceSlices of one node and driver: watch, create, update, delete; the Node's UID.

The RBAC these calls need is the chart's (`deploy/helm/nvdp/templates/dra.yaml`): resourceslices get, list, watch,
create, update, patch, delete; nodes get. A ValidatingAdmissionPolicy there refuses writes to another node's slices,
so a 403 or 422 with the policy's message means the slice named another node: a bug, never retried quickly.

Every failure leaves as `SliceWriteError` (the write, the slice, what the API server said and what it likely means)
or as the client's `ApiUnreachable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx
import msgspec
import trio

from nvdp.core.dra.slices import SliceState, label_selector
from nvdp.k8s.client import ApiClient, ApiError, ApiUnreachable, api_error
from nvdp.k8s.watch import KubeObject, WatchObserver, WatchOptions, watch_collection

RESOURCESLICES_PATH = "/apis/resource.k8s.io/v1/resourceslices"
NODES_PATH = "/api/v1/nodes"


class ResourceSlice(KubeObject, kw_only=True):
    spec: dict[str, Any] = msgspec.field(default_factory=dict)

    def state(self) -> SliceState:
        meta = self.metadata
        return SliceState(meta.name, meta.uid, meta.resource_version, dict(meta.labels or {}), self.spec)


class SliceWriteError(Exception):
    """A write to a ResourceSlice (or the read it needed) failed with an error status."""

    def __init__(self, operation: str, name: str, error: ApiError) -> None:
        self.operation = operation
        self.name = name
        self.status = error.status
        hint = ""
        if error.status == 409:
            hint = " (changed since it was read: read again, then retry)"
        elif error.status == 403:
            hint = (" (RBAC or the chart's admission policy: nvdp's service account needs resourceslices "
                    "get/list/watch/create/update/delete, and may write only slices of its own node)")
        elif error.status == 422:
            hint = " (the API server refused the slice's content)"
        elif error.status == 404 and operation in ("create", "list"):
            hint = " (resource.k8s.io/v1 is not served: Kubernetes 1.34 or later is needed)"
        super().__init__(f"{operation} ResourceSlice {name or '(new)'}: {error}{hint}")

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404


def field_selector(node_name: str, driver: str) -> str:
    return f"spec.nodeName={node_name},spec.driver={driver}"


@trio.as_safe_channel
async def watch_slices(
    client: ApiClient, node_name: str, driver: str, options: WatchOptions | None = None, *,
    observer: WatchObserver | None = None,
) -> AsyncGenerator[dict[str, ResourceSlice], None]:
    """nvdp's slices of this node and driver, by name, now and after every change (list, watch, relist on 410,
    backoff: `nvdp.k8s.watch`)."""
    async with watch_collection(
            client, RESOURCESLICES_PATH, ResourceSlice, options, field_selector=field_selector(node_name, driver),
            label_selector=label_selector(), observer=observer,
            what=f"{RESOURCESLICES_PATH} of node {node_name}, driver {driver}") as states:
        async for state in states:
            yield state


async def _send(client: ApiClient, method: str, path: str, body: Mapping[str, Any] | None) -> bytes:
    content = msgspec.json.encode(body) if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else None
    try:
        response = await client.http.request(method, path, content=content, headers=headers)
    except (httpx.HTTPError, OSError) as exc:
        raise ApiUnreachable.of(exc) from exc
    if response.status_code not in (200, 201, 202):
        raise api_error(response.status_code, response.reason_phrase, response.content)
    return response.content


def _decode(body: bytes, operation: str, name: str) -> ResourceSlice:
    try:
        return msgspec.json.decode(body, type=ResourceSlice)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SliceWriteError(operation, name, ApiError(200, "OK", f"undecodable answer: {exc}")) from None


async def create_slice(client: ApiClient, body: Mapping[str, Any]) -> ResourceSlice:
    """POST a new slice (`metadata.generateName`); the API server's copy, with its name, comes back."""
    try:
        answer = await _send(client, "POST", RESOURCESLICES_PATH, body)
    except ApiError as exc:
        raise SliceWriteError("create", "", exc) from None
    return _decode(answer, "create", "")


async def update_slice(client: ApiClient, name: str, body: Mapping[str, Any]) -> ResourceSlice:
    """PUT the slice; `metadata.resourceVersion` in `body` makes it conditional (409: `SliceWriteError.conflict`)."""
    try:
        answer = await _send(client, "PUT", f"{RESOURCESLICES_PATH}/{name}", body)
    except ApiError as exc:
        raise SliceWriteError("update", name, exc) from None
    return _decode(answer, "update", name)


async def delete_slice(client: ApiClient, name: str, uid: str = "", resource_version: str = "") -> bool:
    """DELETE the slice, only if it is still the one read (uid, resourceVersion preconditions when given).
    False when it was gone already."""
    preconditions = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v}
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions} if preconditions else None
    try:
        await _send(client, "DELETE", f"{RESOURCESLICES_PATH}/{name}", body)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise SliceWriteError("delete", name, exc) from None
    return True


async def get_slice(client: ApiClient, name: str) -> ResourceSlice | None:
    """The slice as it is now, or None."""
    try:
        answer = await client.get_json(f"{RESOURCESLICES_PATH}/{name}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise SliceWriteError("get", name, exc) from None
    return _decode(answer, "get", name)


async def node_uid(client: ApiClient, node_name: str) -> str:
    """The Node's UID, for the slices' owner reference."""
    try:
        answer = await client.get_json(f"{NODES_PATH}/{node_name}")
    except ApiError as exc:
        raise SliceWriteError("get Node for", node_name, exc) from None
    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
        uid = msgspec.json.decode(answer, type=KubeObject).metadata.uid
        if uid:
            return uid
    raise SliceWriteError("get Node for", node_name, ApiError(200, "OK", "the Node has no metadata.uid"))
