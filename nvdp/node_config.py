"""Where named configs come from, and which one this node serves right now.

Sources of named configs, either or both:

- a directory (`--config-dir`): each regular file is one config named by its file name; names starting with `..`
  are the kubelet's ConfigMap-volume internals and are ignored. A mounted ConfigMap is updated by swapping its
  `..data` symlink (new timestamped directory, `..data_tmp` renamed over `..data`), then adding and removing the
  per-key symlinks; plain files on bare metal are written, renamed into place or deleted. We watch the directory,
  never the files (a watch on a file dies with the first swap), and re-read the whole directory after a short
  settle time, since one update is a burst of events;
- the ConfigMap through the API (`--config-map NAMESPACE/NAME`): a key is usable as soon as the API server has it,
  without waiting for the kubelet's volume refresh. Where both have a key, the API's copy wins: it is the newer.

`watch_config()` combines those with the node label (`nvdp.k8s.node_labels`) and `choose_config()`, and yields a
`ConfigUpdate` whenever the selected config's name or content changes or a problem appears or clears. It decides
nothing about validity: the daemon parses, resolves and plans each update before stopping anything, and keeps
serving what it has when that fails.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from inotify_simple import INotify
from inotify_simple import flags as F

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.selection import DEFAULT_FALLBACKS, DEFAULT_NODE_LABEL, choose_config, describe

if TYPE_CHECKING:
    # Imported where used: a node without a label or ConfigMap never loads httpx.
    from nvdp.k8s.client import ApiClient
    from nvdp.k8s.watch import WatchOptions

log = logging.getLogger(__name__)

#: The ConfigMap volume's current-version symlink; swapping it is how the kubelet publishes an update.
DATA_LINK = "..data"

_DIR_MASK = (F.CLOSE_WRITE | F.MOVED_TO | F.MOVED_FROM | F.CREATE | F.DELETE | F.DELETE_SELF | F.MOVE_SELF)
_PARENT_MASK = F.CREATE | F.MOVED_TO


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """The config this node should serve now."""

    #: The selected config's name; None: built-in defaults.
    name: str | None
    #: Its content, for `parse_config(text, source)`.
    text: bytes
    #: Where it came from, for error messages: `/config/named/b`, `configmap nvdp/plugin-configs key "b"`,
    #: `built-in defaults`.
    source: str
    #: Why this config: "node label nvidia.com/device-plugin.config=b", "fallback 'named': ...".
    reason: str
    #: What to report (log, metric, Event on the Node) while it lasts; None when all is as asked. A new update
    #: with `problem=None` means an earlier problem has cleared.
    problem: str | None
    #: True when name or content differ from the previous update (and on the first): build a new plan. False when
    #: only `problem` changed.
    changed: bool
    #: The node label's value when it names no config (reported as a metric and an Event), else None.
    unknown_label: str | None = None


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

    Use as ``async with watch_config_dir(path) as states: async for configs in states: ...``.
    """
    with INotify(nonblocking=True) as inotify:
        watches = _DirWatches(inotify, directory)
        last = await trio.to_thread.run_sync(read_config_dir, directory)
        yield last
        while True:
            await trio.lowlevel.wait_readable(inotify.fileno())
            if not watches.handle(inotify.read(timeout=0)):
                continue
            # One update is a burst (the kubelet's swap; an editor's write and rename): let it finish, and fold
            # whatever else arrived into this one re-read.
            await trio.sleep(settle_s)
            watches.handle(inotify.read(timeout=0))
            current = await trio.to_thread.run_sync(read_config_dir, directory)
            if current != last:
                log.info("config directory %s changed: %s", directory, ", ".join(sorted(current)) or "empty")
                last = current
                yield current


class _DirWatches:
    """The directory's watch, and its parent's so that a directory created (or re-created) later is found."""

    def __init__(self, inotify: INotify, directory: Path) -> None:
        self.inotify = inotify
        self.directory = directory
        self.parent_wd = self._add(directory.parent, _PARENT_MASK)
        self.dir_wd = self._add(directory, _DIR_MASK)
        if self.dir_wd is None:
            log.warning("config directory %s does not exist (yet); waiting for it", directory)

    def _add(self, path: Path, mask: int) -> int | None:
        try:
            return self.inotify.add_watch(path, mask)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def handle(self, events: Any) -> bool:
        """Keep the watches current; True if any event may have changed the configs."""
        relevant = False
        for event in events:
            if event.wd == self.parent_wd:
                if event.name == self.directory.name and self.dir_wd is None:
                    self.dir_wd = self._add(self.directory, _DIR_MASK)
                    relevant = True
            elif event.wd == self.dir_wd:
                relevant |= self._relevant(event)
        return relevant

    def _relevant(self, event: Any) -> bool:
        mask = event.mask
        if mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
            log.warning("config directory %s was removed; waiting for it to come back", self.directory)
            self.dir_wd = None
            return True
        name: str = event.name
        if name == DATA_LINK:
            return bool(mask & (F.MOVED_TO | F.CREATE))
        if name.startswith(".."):
            return False  # the kubelet's timestamped directories and ..data_tmp
        if mask & F.CREATE and not mask & F.ISDIR:
            # A regular file just created is still empty: wait for its CLOSE_WRITE. A symlink (a new ConfigMap key)
            # is complete at once.
            return (self.directory / name).is_symlink()
        return bool(mask & (F.CLOSE_WRITE | F.MOVED_TO | F.MOVED_FROM | F.DELETE))


# -- everything together ------------------------------------------------------------------------------------------


@dataclass
class _State:
    dir_configs: dict[str, bytes] | None = None
    #: None: not read yet; {} also stands for a ConfigMap that does not exist (`cm_missing`).
    cm_configs: dict[str, bytes] | None = None
    cm_missing: bool = False
    label: str | None = None
    label_known: bool = False


@trio.as_safe_channel
async def watch_config(
    sources: ConfigSources,
    client: ApiClient | None = None,
    *,
    watch_options: WatchOptions | None = None,
    startup_wait_s: float = 30.0,
    settle_s: float = 0.05,
) -> AsyncGenerator[ConfigUpdate, None]:
    """Yield the config to serve now, then whenever that changes (see `ConfigUpdate`).

    `client` is an `nvdp.k8s.client.ApiClient`, needed when `sources.needs_api`. At start-up, the first update
    waits (at most `startup_wait_s`) until every source has been read once; a source still unread then (the API
    server unreachable) is treated as empty, which the update's `problem` says, and a later read switches over.
    Raises `ConfigError` when no config can be chosen at start-up.

    Use as ``async with watch_config(sources, client) as updates: async for update in updates: ...``.
    """
    if sources.needs_api and client is None:
        raise ValueError("watching a node label or a ConfigMap needs an API client")
    if sources.config_dir is None and sources.config_map is None:
        raise ValueError("watch_config needs a config directory or a ConfigMap")
    state = _State()
    if sources.config_dir is None:
        state.dir_configs = {}
    if sources.config_map is None:
        state.cm_configs = {}
    if sources.node_name is None:
        state.label_known = True
    send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
    startup_error: ConfigError | None = None
    async with trio.open_nursery() as nursery:
        if sources.config_dir is not None:
            nursery.start_soon(_feed_dir, sources.config_dir, settle_s, send)
        if sources.config_map is not None:
            nursery.start_soon(_feed_configmap, client, sources.config_map, watch_options, send)
        if sources.node_name is not None:
            nursery.start_soon(_feed_label, client, sources.node_name, sources.node_label, watch_options, send)

        def apply(item: tuple[str, Any]) -> None:
            kind, value = item
            if kind == "dir":
                state.dir_configs = value
            elif kind == "cm":
                state.cm_missing = value is None
                state.cm_configs = value or {}
            else:
                state.label, state.label_known = value, True

        with trio.move_on_after(startup_wait_s):
            while state.dir_configs is None or state.cm_configs is None or not state.label_known:
                apply(await receive.receive())

        last: ConfigUpdate | None = None
        while True:
            # Fold in everything already waiting, so a burst yields one update.
            while True:
                try:
                    apply(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                update = _select(sources, state, last)
            except ConfigError as exc:
                # Only at start-up (afterwards the current config is kept). Raised outside the nursery, so the
                # caller gets the ConfigError itself rather than an exception group.
                startup_error = exc
                nursery.cancel_scope.cancel()
                break
            if last is None or (update.name, update.text, update.problem) != (last.name, last.text, last.problem):
                if update.changed:
                    log.info("config: %s (%s)", describe(update.name), update.reason)
                if update.problem and (last is None or update.problem != last.problem):
                    log.warning("config: %s", update.problem)
                last = update
                yield update
            apply(await receive.receive())
    if startup_error is not None:
        raise startup_error


def _select(sources: ConfigSources, state: _State, last: ConfigUpdate | None) -> ConfigUpdate:
    available: dict[str, bytes] = dict(state.dir_configs or {})
    from_cm = set(state.cm_configs or {})
    available.update(state.cm_configs or {})
    notes: list[str] = []
    if state.dir_configs is None:
        notes.append(f"config directory {sources.config_dir} not read yet")
    if sources.config_map is not None:
        namespace, name = sources.config_map
        if state.cm_configs is None:
            notes.append(f"configmap {namespace}/{name} not read yet (API server unreachable?)")
        elif state.cm_missing:
            notes.append(f"configmap {namespace}/{name} does not exist")
    if not state.label_known:
        notes.append(f"node label {sources.node_label} of node {sources.node_name} not read yet (API server "
                     "unreachable?); choosing as if it were unset")
    try:
        choice = choose_config(
            state.label if state.label_known else None,
            available,
            sources.default_config,
            sources.fallbacks,
            last.name if last is not None else None,
            at_startup=last is None,
            label_name=sources.node_label,
        )
    except ConfigError as exc:
        if notes:  # say which source was not read, or the error would look like a config mistake
            raise ConfigError(f"{exc} ({'; '.join(notes)})") from None
        raise
    if choice.text is None:
        # Keeping a config whose content is gone from every source: keep the content being served.
        assert last is not None
        text, source = last.text, last.source
    else:
        text, source = choice.text, _source(sources, choice.name, from_cm)
    if choice.problem:
        notes.append(choice.problem)
    changed = last is None or (choice.name, text) != (last.name, last.text)
    unknown = state.label if state.label_known and state.label and state.label not in available else None
    return ConfigUpdate(choice.name, text, source, choice.reason, "; ".join(notes) or None, changed, unknown)


def _source(sources: ConfigSources, name: str | None, from_cm: set[str]) -> str:
    if name is None:
        return "built-in defaults"
    if name in from_cm and sources.config_map is not None:
        namespace, cm_name = sources.config_map
        return f'configmap {namespace}/{cm_name} key "{name}"'
    assert sources.config_dir is not None
    return str(sources.config_dir / name)


async def _feed_dir(directory: Path, settle_s: float, send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
    async with watch_config_dir(directory, settle_s) as states:
        async for configs in states:
            send.send_nowait(("dir", configs))


async def _feed_configmap(client: ApiClient | None, ref: tuple[str, str], options: WatchOptions | None,
                          send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
    from nvdp.k8s.configmap import watch_configmap

    assert client is not None
    async with watch_configmap(client, ref[0], ref[1], options) as states:
        async for contents in states:
            send.send_nowait(("cm", contents))


async def _feed_label(client: ApiClient | None, node_name: str, label: str, options: WatchOptions | None,
                      send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
    from nvdp.k8s.node_labels import watch_node_label

    assert client is not None
    async with watch_node_label(client, node_name, label, options) as values:
        async for value in values:
            log.info("node %s: label %s=%s", node_name, label, value if value is not None else "(unset)")
            send.send_nowait(("label", value))
