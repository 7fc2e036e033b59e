"""Watching the kubelet's device-plugin directory with inotify.

The kubelet wipes the directory when it starts (our sockets go) and then creates `kubelet.sock`: that creation is
the signal to start our servers again and re-register. We watch the directory, never the file (a watch on a file
dies with it), and the directory's parent as well, so that a removed and re-created directory is picked up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio
from inotify_simple import INotify
from inotify_simple import flags as F

log = logging.getLogger(__name__)

_DIR_MASK = F.CREATE | F.MOVED_TO | F.DELETE | F.DELETE_SELF | F.MOVE_SELF
_PARENT_MASK = F.CREATE | F.MOVED_TO


@dataclass(frozen=True, slots=True)
class SocketEvent:
    #: "kubelet-started": kubelet.sock appeared; "deleted": a socket other than kubelet.sock was removed.
    kind: str
    name: str


async def watch_plugin_dir(kubelet_socket: Path) -> AsyncIterator[SocketEvent]:
    """Yield events for the directory holding `kubelet_socket`, for as long as the caller iterates."""
    directory, socket_name = kubelet_socket.parent, kubelet_socket.name
    with INotify(nonblocking=True) as inotify:
        parent_wd = _add_watch(inotify, directory.parent, _PARENT_MASK)
        dir_wd = _add_watch(inotify, directory, _DIR_MASK)
        while True:
            await trio.lowlevel.wait_readable(inotify.fileno())
            for event in inotify.read(timeout=0):
                if event.wd == parent_wd and event.name == directory.name:
                    # Always follow a new directory, even before the old one's DELETE_SELF arrives (a socket still
                    # bound in the old directory can delay that); events of the old watch no longer match dir_wd.
                    dir_wd = _add_watch(inotify, directory, _DIR_MASK)
                    log.info("plugin directory %s re-created", directory)
                    if await trio.Path(kubelet_socket).exists():
                        yield SocketEvent("kubelet-started", socket_name)
                elif event.wd == dir_wd:
                    if event.mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
                        log.warning("plugin directory %s removed; waiting for it to come back", directory)
                        dir_wd = None
                    elif event.mask & (F.CREATE | F.MOVED_TO) and event.name == socket_name:
                        yield SocketEvent("kubelet-started", socket_name)
                    elif event.mask & F.DELETE and event.name != socket_name:
                        yield SocketEvent("deleted", event.name)


def _add_watch(inotify: INotify, path: Path, mask: int) -> int | None:
    try:
        return inotify.add_watch(path, mask)
    except FileNotFoundError:
        return None
