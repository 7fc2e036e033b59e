"""choose_config: which named config a node serves (pure, table-driven)."""

from __future__ import annotations

import pytest

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.selection import choose_config

LABEL = "nvidia.com/device-plugin.config"
AB = {"a": b"A", "b": b"B"}
WITH_DEFAULT = {"a": b"A", "default": b"D"}
ONLY = {"solo": b"S"}

# (id, label, available, default, fallbacks, current, at_startup) -> (name, text, problem substring or None)
CASES = [
    ("label-exists", "b", AB, None, ["named", "single"], None, True, ("b", b"B", None)),
    ("label-exists-running", "b", AB, "a", ["named"], "a", False, ("b", b"B", None)),
    ("label-beats-default", "a", WITH_DEFAULT, "default", ["named"], None, True, ("a", b"A", None)),
    ("empty-label-is-unset", "", WITH_DEFAULT, None, ["named"], None, True, ("default", b"D", None)),
    ("unknown-running-keeps", "c", AB, None, ["named", "single"], "a", False,
     ("a", b"A", "names no config (available: a, b); keeping config 'a' until a config named 'c' appears")),
    ("unknown-running-keeps-defaults", "c", AB, None, ["empty"], None, False, (None, b"", "keeping built-in")),
    ("unknown-running-current-gone", "c", {"b": b"B"}, None, ["single"], "a", False, ("a", None, "names no")),
    ("unknown-startup-falls-back", "c", WITH_DEFAULT, None, ["named"], None, True,
     ("default", b"D", "as if the label were unset")),
    ("unknown-startup-default", "c", AB, "b", [], None, True, ("b", b"B", "started with default config 'b'")),
    ("default", None, AB, "a", ["named", "single"], None, True, ("a", b"A", None)),
    ("default-missing-then-named", None, WITH_DEFAULT, "zzz", ["named"], None, True,
     ("default", b"D", "default config 'zzz' (--default-config) does not exist")),
    ("named", None, WITH_DEFAULT, None, ["named", "single"], None, True, ("default", b"D", None)),
    ("named-missing-single", None, ONLY, None, ["named", "single"], None, True, ("solo", b"S", None)),
    ("single-needs-exactly-one", None, AB, None, ["single", "empty"], None, True, (None, b"", None)),
    ("order-matters", None, {"default": b"D"}, None, ["single", "named"], None, True, ("default", b"D", None)),
    ("empty", None, {}, None, ["empty"], None, True, (None, b"", None)),
    ("nothing-running-keeps", None, AB, None, ["named"], "a", False, ("a", b"A", "no config to serve")),
    ("label-removed-goes-default", None, WITH_DEFAULT, None, ["named"], "a", False, ("default", b"D", None)),
]


@pytest.mark.parametrize(
    ("label", "available", "default", "fallbacks", "current", "at_startup", "expected"),
    [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_choose_config(label, available, default, fallbacks, current, at_startup, expected) -> None:  # type: ignore[no-untyped-def]
    name, text, problem = expected
    choice = choose_config(label, available, default, fallbacks, current, at_startup, label_name=LABEL)
    assert (choice.name, choice.text) == (name, text)
    if problem is None:
        assert choice.problem is None
    else:
        assert choice.problem is not None and problem in choice.problem
    assert choice.reason


def test_reasons_say_why() -> None:
    assert choose_config("b", AB, None, [], None, True).reason == f"node label {LABEL}=b"
    assert "fallback 'named'" in choose_config(None, WITH_DEFAULT, None, ["named"], None, True).reason
    assert "'solo' is the only config" in choose_config(None, ONLY, None, ["single"], None, True).reason
    assert "built-in defaults" in choose_config(None, {}, None, ["empty"], None, True).reason
    assert "--default-config" in choose_config(None, AB, "a", [], None, True).reason


def test_nothing_at_startup_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as info:
        choose_config(None, AB, None, ["named", "single"], None, True)
    message = str(info.value)
    assert "node label is unset" in message
    assert "tried: named, single" in message
    assert "available configs: a, b" in message


def test_unknown_label_and_nothing_at_startup() -> None:
    with pytest.raises(ConfigError, match="names no config"):
        choose_config("c", AB, None, [], None, True)


def test_unknown_fallback_is_rejected_even_when_unused() -> None:
    with pytest.raises(ConfigError, match=r"unknown fallback strategy 'nmaed'.*named, single, empty"):
        choose_config("a", AB, None, ["nmaed"], None, True)


def test_no_configs_at_all() -> None:
    with pytest.raises(ConfigError, match="available configs: none"):
        choose_config(None, {}, None, ["named", "single"], None, True)
