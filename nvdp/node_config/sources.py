"""The sources of named configs, each followed on its own: a directory (inotify) and a ConfigMap (the API).

- a directory (`--config-dir`): each regular file is one config named by its file name; names starting with `..`
  are the kubelet's ConfigMap-volume internals and are ignored. A mounted ConfigMap is updated by swapping its
  `..data` symlink (new timestamped directory, `..data_tmp` renamed over `..data`), then adding and removing the
  per-key symlinks; plain files on bare metal are written, renamed into place or deleted. We watch the directory,
  never the files (`nvdp.inotify`), and re-read the whole directory after a short settle time, since one update is
  a burst of events;
- the ConfigMap through the API (`--config-map NAMESPACE/NAME`): a key is usable as soon as the API server has it,
  without waiting for the kubelet's volume refresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import trio

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import MAX_CONFIG_BYTES, parse_config
from nvdp.core.config.schema import Config
from nvdp.core.config.selection import DEFAULT_FALLBACKS, DEFAULT_NODE_LABEL
from nvdp.inotify import DirectoryWatch, DirEvent
from nvdp.inotify import flags as F

log = logging.getLogger(__name__)

#: The ConfigMap volume's current-version symlink; swapping it is how the kubelet publishes an update.
DATA_LINK = "..data"

_DIR_MASK = F.CLOSE_WRITE | F.MOVED_TO | F.MOVED_FROM | F.CREATE | F.DELETE


@dataclass(frozen=True, slots=True)
class ConfigSources:
    """What to watch and how to choose."""

    config_dir: Path | None = None
    #: (namespace, name) of the ConfigMap read through the API.
    config_map: tuple[str, str] | None = None
    #: The node whose label selects the config; None: no label (default and fallbacks only).
    node_name: str | None = None
    node_label: str = DEFAULT_NODE_LABEL
    default_config: str | None = None
    fallbacks: tuple[str, ...] = DEFAULT_FALLBACKS

    @property
    def needs_api(self) -> bool:
        return self.config_map is not None or self.node_name is not None


def parse_config_map_ref(text: str, default_namespace: str | None = None) -> tuple[str, str]:
    """`NAMESPACE/NAME`, or `NAME` in `default_namespace` (the pod's, from POD_NAMESPACE)."""
    namespace, _, name = text.strip().rpartition("/")
    namespace = namespace or (default_namespace or "")
    if not name or not namespace or "/" in namespace:
        raise ConfigError(f"--config-map {text!r}: expected NAMESPACE/NAME (or NAME with POD_NAMESPACE set)")
    return namespace, name


# -- the directory ------------------------------------------------------------------------------------------------


#: Longest a whole read of the config directory may take before it is abandoned (a hung filesystem); the
#: previous configs stay in force and the next change reads again.
READ_TIMEOUT_S = 10.0
#: Longest a config's parse may take off the event loop (`parse_config_off_loop`).
PARSE_TIMEOUT_S = 10.0


def read_config_dir(directory: Path) -> dict[str, bytes]:
    """Every config in the directory, by file name. A missing directory has none (it may be mounted later).

    Each entry is read by `_read_entry`: links are followed only while they stay inside the directory (a ConfigMap
    key is a link into `..data/`; a link to /etc/shadow is skipped, unread), only regular files are read, without
    blocking (a FIFO is skipped), and at most `MAX_CONFIG_BYTES` each (a larger file is skipped). Skips are logged
    with the file's name and why, never its content."""
    configs: dict[str, bytes] = {}
    try:
        entries = sorted(os.listdir(directory))
        root = os.path.realpath(directory)
    except FileNotFoundError:
        return configs
    except OSError as exc:
        log.warning("cannot list config directory %s: %s", directory, exc.strerror or exc)
        return configs
    for name in entries:
        if name.startswith(".."):
            continue
        try:
            data = _read_entry(directory / name, root)
        except FileNotFoundError:
            continue  # removed between listing and reading; the next event re-reads
        except _Skip as skip:
            if skip.loud:
                log.warning("config %s skipped: %s", directory / name, skip)
            continue
        except OSError as exc:
            log.warning("cannot read config %s: %s", directory / name, exc.strerror or exc)
            continue
        configs[name] = data
    return configs


class _Skip(Exception):
    """An entry that is not a config file; `loud` when it deserves a warning (not a plain subdirectory)."""

    def __init__(self, why: str, loud: bool = True) -> None:
        super().__init__(why)
        self.loud = loud


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _read_entry(path: Path, root: str) -> bytes:
    """The bytes of one directory entry if it is a config file inside `root` (the directory's real path)."""
    target = os.path.realpath(path)
    if not _inside(target, root):
        raise _Skip("it links outside the config directory (not read)")
    if os.path.isdir(target):
        raise _Skip("a directory", loud=False)
    # O_NOFOLLOW: `target` has no links left; should one appear in its place now, the open fails (ELOOP).
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Skip("not a regular file (a FIFO, socket or device; not read)")
        # What was opened, whatever changed on the way there (a swapped directory link): still inside?
        with contextlib.suppress(OSError):
            if not _inside(os.readlink(f"/proc/self/fd/{fd}"), root):
                raise _Skip("it links outside the config directory (not read)")
        if info.st_size > MAX_CONFIG_BYTES:
            raise _Skip(f"{info.st_size} bytes, larger than {MAX_CONFIG_BYTES} (1 MiB, a ConfigMap's maximum)")
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
        while len(data) <= MAX_CONFIG_BYTES and (chunk := os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))):
            data += chunk
        if len(data) > MAX_CONFIG_BYTES:
            raise _Skip(f"larger than {MAX_CONFIG_BYTES} bytes (1 MiB, a ConfigMap's maximum)")
        return data
    finally:
        os.close(fd)


class _DirReader:
    """`read_config_dir` off the event loop, abandoned (not waited for) on cancellation, so shutdown never waits
    for a filesystem, and given up after `READ_TIMEOUT_S`. At most one read at a time: while an abandoned one is
    still stuck (a hung filesystem), no other thread is started, so a stuck mount costs one thread, not one per
    retry."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._idle = threading.Event()
        self._idle.set()

    async def read(self) -> dict[str, bytes] | None:
        """The configs, or None if the read took too long (or an earlier one is still stuck)."""
        if not self._idle.is_set():
            log.warning("config directory %s: an earlier read is still stuck; not reading again yet", self.directory)
            return None
        self._idle.clear()

        def work() -> dict[str, bytes]:
            try:
                return read_config_dir(self.directory)
            finally:
                self._idle.set()

        with trio.move_on_after(READ_TIMEOUT_S):
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        log.warning("reading config directory %s took longer than %g s; abandoned", self.directory, READ_TIMEOUT_S)
        return None


async def parse_config_off_loop(text: str | bytes, source: str, timeout_s: float | None = None) -> Config:
    """`parse_config` in a worker thread, abandoned on cancellation and after `timeout_s` (default
    `PARSE_TIMEOUT_S`): a ConfigError then. The text is at most 1 MiB (`parse_config` refuses more), so an
    abandoned parse ends on its own."""
    timeout_s = PARSE_TIMEOUT_S if timeout_s is None else timeout_s
    with trio.move_on_after(timeout_s):
        return await trio.to_thread.run_sync(parse_config, text, source, abandon_on_cancel=True)
    raise ConfigError(f"{source}: parsing took longer than {timeout_s:g} s; not applied")


@trio.as_safe_channel
async def watch_config_dir(directory: Path, settle_s: float = 0.05) -> AsyncGenerator[dict[str, bytes], None]:
    """Yield the directory's configs now, then whenever a config appears, changes or goes.

    Raises `nvdp.inotify.InotifyError` when inotify cannot be used (limits, permissions).

    Use as ``async with watch_config_dir(path) as states: async for configs in states: ...``.
    """
    with DirectoryWatch(directory, _DIR_MASK) as watch:
        if not watch.watching:
            log.warning("config directory %s does not exist (yet); waiting for it", directory)
        reader = _DirReader(directory)
        first = await reader.read()
        while first is None:
            await trio.sleep(READ_TIMEOUT_S)
            first = await reader.read()
        last = first
        yield last
        while True:
            if not _relevant(directory, await watch.wait()):
                continue
            # One update is a burst (the kubelet's swap; an editor's write and rename): let it finish, and fold
            # whatever else arrived into this one re-read.
            await trio.sleep(settle_s)
            _relevant(directory, watch.read_nowait())
            current = await reader.read()
            if current is not None and current != last:
                log.info("config directory %s changed: %s", directory, ", ".join(sorted(current)) or "empty")
                last = current
                yield current


def _relevant(directory: Path, events: list[DirEvent]) -> bool:
    """True if any of the events may have changed the configs."""
    relevant = False
    for event in events:
        if event.kind == "appeared":
            relevant = True
        elif event.kind == "removed":
            log.warning("config directory %s was removed; waiting for it to come back", directory)
            relevant = True
        else:
            relevant |= _entry_relevant(directory, event)
    return relevant


def _entry_relevant(directory: Path, event: DirEvent) -> bool:
    mask, name = event.mask, event.name
    if name == DATA_LINK:
        return bool(mask & (F.MOVED_TO | F.CREATE))
    if name.startswith(".."):
        return False  # the kubelet's timestamped directories and ..data_tmp
    if mask & F.CREATE and not mask & F.ISDIR:
        # A regular file just created is still empty: wait for its CLOSE_WRITE. A symlink (a new ConfigMap key) is
        # complete at once.
        return (directory / name).is_symlink()
    return bool(mask & (F.CLOSE_WRITE | F.MOVED_TO | F.MOVED_FROM | F.DELETE))
