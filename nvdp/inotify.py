"""inotify on one directory that may not exist yet, or may be removed and created again.

Both directories nvdp follows behave that way: the kubelet's device-plugin directory (the kubelet wipes it, and it
can be removed and re-created) and a config directory (mounted later, or replaced). A watch on a directory dies
with the directory, so `DirectoryWatch` also watches its parent, and follows the directory again whenever one of
that name is created or moved into place. Files inside are never watched one by one: a watch on a file dies with
the first rename over it.

This is the only module that imports `inotify_simple`. Its `OSError`s (no inotify instance or watch left, no
permission) leave here as `InotifyError`, with the sysctl to raise where a limit is the cause.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import inotify_simple
import trio
from inotify_simple import INotify, flags

__all__ = ["DirEvent", "DirectoryWatch", "InotifyError", "flags"]

# inotify_simple finds libc with `ctypes.util.find_library("c")` at its first INotify, which runs `ldconfig -p` in a
# child process (~2 ms on the trio thread at start-up, and a fork of the whole daemon). The C library is already in
# the process: the process's own symbols (dlopen(NULL)) include inotify_init1 and friends.
if getattr(inotify_simple, "_libc", False) is None:
    inotify_simple._libc = ctypes.CDLL(None, use_errno=True)

#: What the parent's watch asks for: a directory of the watched name created or moved into place.
_PARENT_MASK = flags.CREATE | flags.MOVED_TO
#: Always asked of the directory's own watch, so that its end is noticed.
_SELF_MASK = flags.DELETE_SELF | flags.MOVE_SELF


class InotifyError(Exception):
    """A directory cannot be watched: inotify itself failed (limits, permissions), not the directory's absence."""


@dataclass(frozen=True, slots=True)
class DirEvent:
    #: "entry": something happened to `name` inside the directory (`mask` says what); "appeared": a directory of the
    #: watched name was created or moved into place and is watched from now on (whatever it already holds was not
    #: reported); "removed": the directory was removed or moved away, and nothing is reported until it appears.
    kind: Literal["entry", "appeared", "removed"]
    name: str = ""
    mask: int = 0


class DirectoryWatch:
    """inotify on `directory` (events of `mask`) and on its parent. Use as a context manager (`async with` closes
    off the trio thread: see `aclose`); it closes the inotify file descriptor on the way out.

    ``with DirectoryWatch(path, flags.CREATE | flags.DELETE) as watch: events = await watch.wait()``
    """

    def __init__(self, directory: Path, mask: int) -> None:
        self.directory = directory
        self.mask = mask | _SELF_MASK
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as exc:
            raise _error(f"cannot start inotify for {directory}", exc) from exc
        try:
            self._parent_wd = self._add(directory.parent, _PARENT_MASK)
            self._dir_wd = self._add(directory, self.mask)
        except BaseException:
            self._inotify.close()
            raise

    @property
    def watching(self) -> bool:
        """Whether the directory exists (as far as the events read so far tell) and is being watched."""
        return self._dir_wd is not None

    def __enter__(self) -> DirectoryWatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> DirectoryWatch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def close(self) -> None:
        self._inotify.close()

    async def aclose(self) -> None:
        """`close` in a worker thread (shielded: it always completes). Closing an inotify descriptor that holds
        watches waits for the kernel's fsnotify grace period (~8 ms on the development VM, more when busy); on the
        trio thread that would stall every other task, at shutdown the servers' stop among them."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._inotify.close)

    async def wait(self) -> list[DirEvent]:
        """Wait until inotify has something, then return what it has (possibly nothing of interest: an empty
        list)."""
        await trio.lowlevel.wait_readable(self._inotify.fileno())
        return self.read_nowait()

    def read_nowait(self) -> list[DirEvent]:
        """The events that have arrived, without waiting; the watches follow a re-created directory on the way."""
        try:
            raw: list[Any] = self._inotify.read(timeout=0)
        except OSError as exc:
            raise _error(f"cannot read inotify events for {self.directory}", exc) from exc
        events: list[DirEvent] = []
        for event in raw:
            if event.wd == self._parent_wd:
                if event.name == self.directory.name and event.mask & _PARENT_MASK:
                    # Follow the new directory at once, even before the old one's DELETE_SELF arrives (a socket
                    # still bound in the old directory can delay that): the old watch's events no longer match.
                    self._dir_wd = self._add(self.directory, self.mask)
                    if self._dir_wd is not None:
                        events.append(DirEvent("appeared"))
            elif self._dir_wd is not None and event.wd == self._dir_wd:
                if event.mask & (_SELF_MASK | flags.IGNORED):
                    self._dir_wd = None
                    events.append(DirEvent("removed", mask=event.mask))
                else:
                    events.append(DirEvent("entry", event.name, event.mask))
        return events

    def _add(self, path: Path, mask: int) -> int | None:
        """The watch descriptor, or None when `path` is not (or no longer) a directory."""
        try:
            return int(self._inotify.add_watch(path, mask))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _error(f"cannot watch {path}", exc) from exc


def _error(what: str, exc: OSError) -> InotifyError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EMFILE:
        reason += " (too many inotify instances: raise the sysctl fs.inotify.max_user_instances)"
    elif exc.errno == errno.ENOSPC:
        reason += " (too many inotify watches: raise the sysctl fs.inotify.max_user_watches)"
    return InotifyError(f"{what}: {reason}")
