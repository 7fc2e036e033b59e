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

import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import trio

from nvdp.core.config.errors import ConfigError
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


def read_config_dir(directory: Path) -> dict[str, bytes]:
    """Every config in the directory, by file name. A missing directory has none (it may be mounted later)."""
    configs: dict[str, bytes] = {}
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return configs
    except OSError as exc:
        log.warning("cannot list config directory %s: %s", directory, exc.strerror or exc)
        return configs
    for name in entries:
        if name.startswith(".."):
            continue
        path = directory / name
        # is_file() follows symlinks: a ConfigMap key is a symlink into ..data, and counts as a regular file.
        if not path.is_file():
            continue
        try:
            configs[name] = path.read_bytes()
        except FileNotFoundError:
            continue  # removed between listing and reading; the next event re-reads
        except OSError as exc:
            log.warning("cannot read config %s: %s", path, exc.strerror or exc)
    return configs


@trio.as_safe_channel
async def watch_config_dir(directory: Path, settle_s: float = 0.05) -> AsyncGenerator[dict[str, bytes], None]:
    """Yield the directory's configs now, then whenever a config appears, changes or goes.

    Raises `nvdp.inotify.InotifyError` when inotify cannot be used (limits, permissions).

    Use as ``async with watch_config_dir(path) as states: async for configs in states: ...``.
    """
    with DirectoryWatch(directory, _DIR_MASK) as watch:
        if not watch.watching:
            log.warning("config directory %s does not exist (yet); waiting for it", directory)
        last = await trio.to_thread.run_sync(read_config_dir, directory)
        yield last
        while True:
            if not _relevant(directory, await watch.wait()):
                continue
            # One update is a burst (the kubelet's swap; an editor's write and rename): let it finish, and fold
            # whatever else arrived into this one re-read.
            await trio.sleep(settle_s)
            _relevant(directory, watch.read_nowait())
            current = await trio.to_thread.run_sync(read_config_dir, directory)
            if current != last:
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
