"""Following one ConfigMap through the API: a new key is usable the moment the API server has it, without waiting
for the kubelet to refresh the mounted volume (which takes up to a minute or more)."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncGenerator

import trio

from nvdp.k8s.client import ApiClient
from nvdp.k8s.watch import KubeObject, WatchObserver, WatchOptions, watch_object

log = logging.getLogger(__name__)


class ConfigMap(KubeObject, kw_only=True, rename="camel"):
    data: dict[str, str] | None = None
    #: Base64, as the API sends it.
    binary_data: dict[str, str] | None = None


def configmap_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps"


def configmap_contents(cm: ConfigMap) -> dict[str, bytes]:
    """Every key as bytes (what `parse_config` takes); `binaryData` keys too, as a mounted volume shows them."""
    contents = {key: value.encode() for key, value in (cm.data or {}).items()}
    for key, value in (cm.binary_data or {}).items():
        try:
            contents[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            log.warning("configmap %s/%s: binaryData key %r is not valid base64; ignored",
                        cm.metadata.namespace, cm.metadata.name, key)
    return contents


@trio.as_safe_channel
async def watch_configmap(
    client: ApiClient, namespace: str, name: str, options: WatchOptions | None = None, *,
    observer: WatchObserver | None = None,
) -> AsyncGenerator[dict[str, bytes] | None, None]:
    """Yield the ConfigMap's keys and contents now, then each time they change; None while it does not exist.

    Use as ``async with watch_configmap(client, ns, name) as states: async for contents in states: ...``.
    """
    first = True
    last: dict[str, bytes] | None = None
    async with watch_object(client, configmap_path(namespace), name, ConfigMap, options,
                            observer=observer) as states:
        async for cm in states:
            contents = None if cm is None else configmap_contents(cm)
            if first or contents != last:
                first, last = False, contents
                yield contents


