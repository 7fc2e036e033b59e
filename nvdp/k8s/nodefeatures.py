"""Where the GFD labels go through the API: NFD's NodeFeature object, or the Node's own labels.

- `publish_node_feature`: the node's `NodeFeature` (`nfd.k8s-sigs.io/v1alpha1`), named and labelled as upstream's GFD
  names it (`nvidia-features-for-<node>`, label `nfd.node.kubernetes.io/node-name`), owned by nvdp's DaemonSet and
  pod so it goes when they go; NFD's master turns its `spec.labels` into Node labels and removes the ones that left.
- `publish_node_labels`: with no NFD, a JSON merge patch of the node's own labels. The keys nvdp set are kept in an
  annotation on the Node (`OWNED_ANNOTATION`), so labels nvdp set before and no longer produces are removed, and
  labels nvdp never set are never touched.

Both read first and write only when something differs, so an unchanged label set costs one GET.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from nvdp.k8s.client import ApiClient, ApiError

log = logging.getLogger(__name__)

NFD_GROUP_VERSION = "nfd.k8s-sigs.io/v1alpha1"
NODE_NAME_LABEL = "nfd.node.kubernetes.io/node-name"
#: Upstream GFD's object name prefix: `nvidia-features-for-<node>`.
NAME_PREFIX = "nvidia-features-for"
#: The label keys nvdp set on the Node itself, comma-separated and sorted.
OWNED_ANNOTATION = "nvdp/gfd-labels"


def node_feature_name(node_name: str) -> str:
    return f"{NAME_PREFIX}-{node_name}"


def node_features_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/{NFD_GROUP_VERSION}/namespaces/{namespace}/nodefeatures"
    return base if name is None else f"{base}/{name}"


async def owner_references(client: ApiClient, namespace: str, pod_name: str | None) -> list[dict[str, Any]]:
    """The DaemonSet that owns nvdp's pod (as controller) and the pod itself, as upstream sets them; none when nvdp
    does not run in a DaemonSet's pod (systemd), or its pod cannot be read (a warning; labels are still published)."""
    if not pod_name:
        return []
    try:
        pod = msgspec.json.decode(await client.get_json(f"/api/v1/namespaces/{namespace}/pods/{pod_name}"))
    except (ApiError, msgspec.DecodeError) as exc:
        log.warning("cannot read pod %s/%s for the NodeFeature's owner: %s; publishing without one", namespace,
                    pod_name, exc)
        return []
    metadata = pod.get("metadata", {}) if isinstance(pod, dict) else {}
    daemonset = next((ref for ref in metadata.get("ownerReferences") or () if ref.get("kind") == "DaemonSet"), None)
    if daemonset is None:
        return []
    return [
        {"apiVersion": daemonset.get("apiVersion", "apps/v1"), "kind": "DaemonSet", "name": daemonset.get("name"),
         "uid": daemonset.get("uid"), "controller": True},
        {"apiVersion": "v1", "kind": "Pod", "name": metadata.get("name", pod_name), "uid": metadata.get("uid")},
    ]


def _spec(labels: Mapping[str, str]) -> dict[str, Any]:
    return {"features": {"flags": {}, "attributes": {}, "instances": {}}, "labels": dict(sorted(labels.items()))}


async def publish_node_feature(client: ApiClient, namespace: str, node_name: str, labels: Mapping[str, str],
                               owners: Sequence[Mapping[str, Any]]) -> bool:
    """Create or update the node's NodeFeature; True when something was written. A 409 (someone wrote it between
    our read and our write) raises ApiError: the caller retries with a fresh read."""
    name = node_feature_name(node_name)
    meta_labels = {NODE_NAME_LABEL: node_name}
    try:
        current = msgspec.json.decode(await client.get_json(node_features_path(namespace, name)))
    except ApiError as exc:
        if exc.status != 404:
            raise
        body: dict[str, Any] = {"apiVersion": NFD_GROUP_VERSION, "kind": "NodeFeature",
                                "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
                                "spec": _spec(labels)}
        if owners:
            body["metadata"]["ownerReferences"] = list(owners)
        await client.post(node_features_path(namespace), body)
        log.info("created NodeFeature %s/%s with %d labels", namespace, name, len(labels))
        return True
    metadata = current.get("metadata", {})
    spec = current.get("spec") or {}
    if ((metadata.get("labels") or {}) == meta_labels and (spec.get("labels") or {}) == dict(labels)
            and (metadata.get("ownerReferences") or []) == list(owners)):
        return False
    updated = dict(current)
    updated["metadata"] = {**metadata, "labels": meta_labels, "ownerReferences": list(owners)}
    if not owners:
        del updated["metadata"]["ownerReferences"]
    updated["spec"] = _spec(labels)
    await client.put(node_features_path(namespace, name), updated)
    log.info("updated NodeFeature %s/%s: %d labels", namespace, name, len(labels))
    return True


async def publish_node_labels(client: ApiClient, node_name: str, labels: Mapping[str, str]) -> bool:
    """Set `labels` on the Node and remove those nvdp set before and no longer produces; True when patched. Only
    this node is read or written (the RBAC grants nothing else: docs/security.md)."""
    path = f"/api/v1/nodes/{node_name}"
    node = msgspec.json.decode(await client.get_json(path))
    metadata = node.get("metadata", {})
    current: dict[str, str] = metadata.get("labels") or {}
    annotation = (metadata.get("annotations") or {}).get(OWNED_ANNOTATION, "")
    owned = {key for key in annotation.split(",") if key}
    changes: dict[str, str | None] = {key: value for key, value in labels.items() if current.get(key) != value}
    changes |= {key: None for key in sorted(owned - set(labels)) if key in current}
    keys = ",".join(sorted(labels))
    if not changes and annotation == keys:
        return False
    await client.patch(path, {"metadata": {"labels": changes, "annotations": {OWNED_ANNOTATION: keys}}})
    removed = sum(1 for value in changes.values() if value is None)
    log.info("node %s labels: %d set, %d removed", node_name, len(changes) - removed, removed)
    return True
