"""Which named config a node serves: the node label, else the default, else the fallbacks. Pure.

The rules (upstream's config-manager, minus its crash loops):

- label set and a config of that name exists: that config;
- label set to a name that does not exist: while serving, keep the current config and report it (the switch happens
  as soon as a config of that name appears, because the caller asks again on every change); at start-up there is
  nothing to keep, so choose as if the label were unset, and report that;
- label unset (or empty): `--default-config` if it exists, then each fallback in order: `named` (a config called
  `default`), `single` (the only config, if there is exactly one), `empty` (built-in defaults);
- nothing chosen: at start-up a `ConfigError`; while serving, keep the current config and report it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nvdp.core.config.errors import ConfigError

DEFAULT_NODE_LABEL = "nvidia.com/device-plugin.config"
FALLBACK_STRATEGIES = ("named", "single", "empty")
DEFAULT_FALLBACKS = ("named", "single")
#: The config the `named` fallback looks for.
DEFAULT_NAME = "default"


@dataclass(frozen=True, slots=True)
class Choice:
    #: The config to serve; None: built-in defaults (the `empty` fallback, or keeping them).
    name: str | None
    #: Its content (`b""` for built-in defaults). None only when keeping a current config that is no longer
    #: available: the caller keeps the content it already has.
    text: bytes | None
    #: Why this config, for the log: "node label nvidia.com/device-plugin.config=b".
    reason: str
    #: Something to report (log, metric, Event) even though serving goes on; None when all is as asked.
    problem: str | None = None


def check_fallbacks(fallbacks: Sequence[str]) -> tuple[str, ...]:
    unknown = [f for f in fallbacks if f not in FALLBACK_STRATEGIES]
    if unknown:
        raise ConfigError(
            f"unknown fallback strategy {unknown[0]!r} (--fallback-strategies): accepted values are "
            f"{', '.join(FALLBACK_STRATEGIES)}")
    return tuple(fallbacks)


def describe(name: str | None) -> str:
    return "built-in defaults" if name is None else f"config {name!r}"


def _names(available: Mapping[str, bytes]) -> str:
    return ", ".join(sorted(available)) if available else "none"


def choose_config(
    label: str | None,
    available: Mapping[str, bytes],
    default: str | None,
    fallbacks: Sequence[str],
    current: str | None,
    at_startup: bool,
    *,
    label_name: str = DEFAULT_NODE_LABEL,
) -> Choice:
    """Choose the config to serve. `current` is the config being served (None: built-in defaults); it is only
    read when `at_startup` is false. Raises `ConfigError` for an unknown fallback strategy (always, so a typo shows
    at start-up) and when nothing can be chosen at start-up."""
    fallbacks = check_fallbacks(fallbacks)
    label = label or None
    if label is not None:
        if label in available:
            return Choice(label, available[label], f"node label {label_name}={label}")
        missing = f"node label {label_name}={label} names no config (available: {_names(available)})"
        if not at_startup:
            return _keep(current, available, f"{missing}; keeping {describe(current)} until a config named "
                                             f"{label!r} appears")
        chosen = _unlabelled(available, default, fallbacks, current, at_startup, missing)
        note = (f"{missing}; started with {chosen.reason} as if the label were unset; will switch when a config "
                f"named {label!r} appears")
        problem = f"{note}; {chosen.problem}" if chosen.problem else note
        return Choice(chosen.name, chosen.text, chosen.reason, problem)
    return _unlabelled(available, default, fallbacks, current, at_startup, None)


def _unlabelled(
    available: Mapping[str, bytes],
    default: str | None,
    fallbacks: tuple[str, ...],
    current: str | None,
    at_startup: bool,
    label_problem: str | None,
) -> Choice:
    problem: str | None = None
    missing_default: str | None = None
    if default:
        if default in available:
            return Choice(default, available[default], f"default config {default!r} (--default-config)")
        missing_default = f"default config {default!r} (--default-config) does not exist"
        problem = f"{missing_default} (available: {_names(available)})"
    for strategy in fallbacks:
        if strategy == "named" and DEFAULT_NAME in available:
            return Choice(DEFAULT_NAME, available[DEFAULT_NAME],
                          f"fallback 'named': the config called {DEFAULT_NAME!r}", problem)
        if strategy == "single" and len(available) == 1:
            (only,) = available
            return Choice(only, available[only], f"fallback 'single': {only!r} is the only config", problem)
        if strategy == "empty":
            return Choice(None, b"", "fallback 'empty': built-in defaults", problem)
    why = [label_problem or "the node label is unset"]
    why.append(missing_default or "no default config (--default-config)")
    tried = ", ".join(fallbacks) if fallbacks else "none given"
    message = (f"no config to serve: {'; '.join(why)}; and no fallback strategy applies (tried: {tried}; "
               f"available configs: {_names(available)})")
    if at_startup:
        raise ConfigError(message)
    return _keep(current, available, f"{message}; keeping {describe(current)}")


def _keep(current: str | None, available: Mapping[str, bytes], problem: str) -> Choice:
    if current is None:
        return Choice(None, b"", "keeping built-in defaults", problem)
    return Choice(current, available.get(current), f"keeping config {current!r}", problem)
