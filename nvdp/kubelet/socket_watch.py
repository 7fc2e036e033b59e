"""Watching the kubelet's device-plugin directory with inotify.

The kubelet wipes the directory when it starts (our sockets go) and then creates `kubelet.sock`: that creation is
the signal to start our servers again and re-register. `nvdp.inotify.DirectoryWatch` watches the directory (never
the file: a watch on a file dies with it) and its parent, so that a removed and re-created directory is picked up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from nvdp.inotify import DirectoryWatch
from nvdp.inotify import flags as F

log = logging.getLogger(__name__)

_DIR_MASK = F.CREATE | F.MOVED_TO | F.DELETE


@dataclass(frozen=True, slots=True)
class SocketEvent:
    #: "kubelet-started": kubelet.sock appeared; "deleted": a socket other than kubelet.sock was removed.
    kind: str
    name: str


async def watch_plugin_dir(kubelet_socket: Path) -> AsyncIterator[SocketEvent]:
    """Yield events for the directory holding `kubelet_socket`, for as long as the caller iterates.

    Raises `nvdp.inotify.InotifyError` when inotify cannot be used (limits, permissions)."""
    directory, socket_name = kubelet_socket.parent, kubelet_socket.name
    async with DirectoryWatch(directory, _DIR_MASK) as watch:
        while True:
            for event in await watch.wait():
                if event.kind == "appeared":
                    log.info("plugin directory %s re-created", directory)
                    if await trio.Path(kubelet_socket).exists():
                        yield SocketEvent("kubelet-started", socket_name)
                elif event.kind == "removed":
                    log.warning("plugin directory %s removed; waiting for it to come back", directory)
                elif event.mask & (F.CREATE | F.MOVED_TO) and event.name == socket_name:
                    yield SocketEvent("kubelet-started", socket_name)
                elif event.mask & F.DELETE and event.name != socket_name:
                    yield SocketEvent("deleted", event.name)
