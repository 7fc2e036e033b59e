"""Which named config this node serves right now: `watch_config()`, the choice loop.

It combines the sources (`nvdp.node_config.sources`: a config directory, a ConfigMap through the API) with the node
label (`nvdp.k8s.node_labels`) and `choose_config()`, and yields a `ConfigUpdate` whenever the selected config's name
or content changes or a problem appears or clears. Where both sources have a key, the API's copy wins: it is the
newer. It decides nothing about validity: the daemon parses, resolves and plans each update before stopping
anything, and keeps serving what it has when that fails. Nor does it log the choice or its problems: the update
carries them, and whoever applies it (the daemon) reports them once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.selection import choose_config
from nvdp.node_config.sources import ConfigSources, watch_config_dir

if TYPE_CHECKING:
    # Imported where used: a node without a label or ConfigMap never loads httpx.
    from nvdp.k8s.client import ApiClient
    from nvdp.k8s.watch import WatchObserver, WatchOptions

log = logging.getLogger(__name__)


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
    observer: WatchObserver | None = None,
    startup_wait_s: float = 30.0,
    settle_s: float = 0.05,
) -> AsyncGenerator[ConfigUpdate, None]:
    """Yield the config to serve now, then whenever that changes (see `ConfigUpdate`).

    `client` is an `nvdp.k8s.client.ApiClient`, needed when `sources.needs_api`; `observer` is told about the API
    watches' reconnects and relists (`nvdp.observe.metrics.Metrics` counts them). At start-up, the first update
    waits (at most `startup_wait_s`) until every source has been read once; a source still unread then (the API
    server unreachable) is treated as empty, which the update's `problem` says, and a later read switches over.
    Raises `ConfigError` when no config can be chosen at start-up, and `nvdp.inotify.InotifyError` when the config
    directory cannot be watched.

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
            nursery.start_soon(_feed_configmap, client, sources.config_map, watch_options, observer, send)
        if sources.node_name is not None:
            nursery.start_soon(_feed_label, client, sources.node_name, sources.node_label, watch_options, observer,
                               send)

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
                # Not logged here: the choice and its problem are the daemon's to report (once, with the outcome).
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
                          observer: WatchObserver | None, send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
    from nvdp.k8s.configmap import watch_configmap

    assert client is not None
    async with watch_configmap(client, ref[0], ref[1], options, observer=observer) as states:
        async for contents in states:
            send.send_nowait(("cm", contents))


async def _feed_label(client: ApiClient | None, node_name: str, label: str, options: WatchOptions | None,
                      observer: WatchObserver | None, send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
    from nvdp.k8s.node_labels import watch_node_label

    assert client is not None
    async with watch_node_label(client, node_name, label, options, observer=observer) as values:
        async for value in values:
            log.info("node %s: label %s=%s", node_name, label, value if value is not None else "(unset)")
            send.send_nowait(("label", value))
