"""Following one label of this node's Node object."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import trio

from nvdp.k8s.client import ApiClient
from nvdp.k8s.watch import KubeObject, WatchObserver, WatchOptions, watch_object

NODES_PATH = "/api/v1/nodes"


class Node(KubeObject, kw_only=True):
    """Only the metadata is read (labels); status, which changes often, is skipped by the decoder."""


@trio.as_safe_channel
async def watch_node_label(
    client: ApiClient, node_name: str, label: str, options: WatchOptions | None = None, *,
    observer: WatchObserver | None = None,
) -> AsyncGenerator[str | None, None]:
    """Yield the label's value now, then each time it changes. None when the label is absent, empty, or the Node
    does not exist (as upstream's config-manager: a deleted Node reads as an unset label).

    Use as ``async with watch_node_label(client, node, label) as values: async for value in values: ...``.
    """
    first = True
    last: str | None = None
    async with watch_object(client, NODES_PATH, node_name, Node, options, observer=observer) as nodes:
        async for node in nodes:
            labels = (node.metadata.labels if node is not None else None) or {}
            value = labels.get(label) or None
            if first or value != last:
                first, last = False, value
                yield value
