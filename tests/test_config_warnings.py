"""Issue 15: configs that upstream (v0.14 to v0.20) or the nebuly fork ran do not stop nvdp.

What those projects accept is served with their meaning and reported as a `ConfigWarning` (file, key path, what
nvdp does); what no project accepts stays a `ConfigError`; `--strict-config` turns warnings into errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import (
    ConfigWarning,
    config_warnings,
    load_config_file_with_warnings,
    parse_config,
    parse_config_with_warnings,
)
from nvdp.core.config.settings import resolve

SOURCE = "/etc/nvdp/config.yaml"


def warnings_of(text: str) -> list[tuple[str, str]]:
    _, found = parse_config_with_warnings(text, SOURCE)
    assert all(w.source == SOURCE for w in found)
    return [(w.path, w.message) for w in found]


def test_a_clean_config_has_no_warnings() -> None:
    config, found = parse_config_with_warnings("flags:\n  migStrategy: single\n", SOURCE)
    assert found == () and config_warnings(config) == ()
    assert config.flags is not None and config.flags.mig_strategy == "single"


def test_an_empty_file_has_no_warnings() -> None:
    assert parse_config_with_warnings("", SOURCE)[1] == ()


@pytest.mark.parametrize(
    ("text", "path"),
    [
        pytest.param("flags:\n  renameByDefault: true\n", "$.flags.renameByDefault", id="upstream issue 1433"),
        pytest.param("flags:\n  plugin:\n    passDeviceSpec: true\n", "$.flags.plugin.passDeviceSpec", id="nested"),
        pytest.param("extra: 1\n", "$.extra", id="top level"),
        pytest.param("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n      replica: 3\n",
                     "$.sharing.timeSlicing.resources[0].replica", id="a misspelt replica beside replicas"),
    ],
)
def test_an_unknown_key_is_ignored_with_a_warning_naming_its_path(text: str, path: str) -> None:
    ((where, message),) = warnings_of(text)
    assert where == path
    assert f"unknown key `{path.rsplit('.', 1)[1]}` ignored" in message


def test_a_misspelt_replicas_alone_is_an_error_that_names_the_ignored_key() -> None:
    # Upstream fails too ("no replicas specified"); the message says which key was meant.
    with pytest.raises(ConfigError) as caught:
        parse_config("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replica: 2\n", SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: $.sharing.timeSlicing.resources[0]: no replicas specified")
    assert "$.sharing.timeSlicing.resources[0].replica: unknown key `replica` ignored" in message


def test_time_slicing_devices_without_rename_are_ignored_as_upstream_does() -> None:
    config, found = parse_config_with_warnings(
        "sharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
        "      devices: [0, 1]\n", SOURCE)
    assert [w.path for w in found] == ["$.sharing.timeSlicing.resources[0].devices"]
    assert "upstream ignores `devices` and shares every device" in found[0].message
    assert config.sharing is not None and config.sharing.time_slicing is not None
    resource = (config.sharing.time_slicing.resources or [])[0]
    assert resource.devices is None and resource.selection().is_all


def test_devices_with_rename_keep_nvdps_meaning() -> None:
    config, found = parse_config_with_warnings(
        "sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      rename: shared\n      replicas: 4\n"
        "      devices: [0, 1]\n", SOURCE)
    assert found == ()
    assert config.sharing is not None and config.sharing.time_slicing is not None
    assert (config.sharing.time_slicing.resources or [])[0].devices == ["0", "1"]


def test_devices_all_is_not_a_difference() -> None:
    assert warnings_of("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
                       "      devices: all\n") == []


def test_invalid_devices_stay_an_error() -> None:
    # Upstream refuses it while parsing, before ignoring `devices`.
    with pytest.raises(ConfigError, match=r"\$\.sharing\.timeSlicing\.resources\[0\]: devices set as 'some'"):
        parse_config("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
                     "      devices: some\n", SOURCE)


def test_mps_limits_under_time_slicing_are_ignored_with_a_warning() -> None:
    found = warnings_of("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      rename: s\n"
                        "      replicas: 2\n      memoryGB: 10\n      computePercent: 50\n")
    assert [p for p, _ in found] == ["$.sharing.timeSlicing.resources[0].memoryGB",
                                     "$.sharing.timeSlicing.resources[0].computePercent"]
    assert all("time-slicing enforces no limits" in m for _, m in found)


def test_the_resources_section_is_reported() -> None:
    ((path, message),) = warnings_of("resources:\n  gpus:\n  - pattern: '*'\n    name: gpu\n")
    assert path == "$.resources" and "ignored, as upstream ignores it" in message


def test_warnings_ride_on_the_config_and_the_settings() -> None:
    config = parse_config("flags:\n  foo: 1\n", SOURCE)
    assert config_warnings(config) == (ConfigWarning(SOURCE, "$.flags.foo", config_warnings(config)[0].message),)
    assert resolve({}, {}, config, SOURCE).config_warnings == config_warnings(config)
    assert str(config_warnings(config)[0]).startswith(f"{SOURCE}: $.flags.foo: unknown key `foo`")


@pytest.mark.parametrize(
    ("cli", "env", "text", "origin"),
    [
        pytest.param({"strict_config": "true"}, {}, "flags:\n  foo: 1\n", "--strict-config", id="flag"),
        pytest.param({}, {"STRICT_CONFIG": "true"}, "flags:\n  foo: 1\n", "STRICT_CONFIG", id="env"),
        pytest.param({}, {}, "flags:\n  foo: 1\n  strictConfig: true\n", "$.flags.strictConfig", id="config file"),
    ],
)
def test_strict_config_turns_warnings_into_errors(cli: dict[str, str], env: dict[str, str], text: str,
                                                  origin: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(cli, env, parse_config(text, SOURCE), SOURCE)
    message = str(caught.value)
    assert "1 config warning(s), errors under strict config" in message and origin in message
    assert f"{SOURCE}: $.flags.foo: unknown key `foo`" in message


def test_strict_config_accepts_a_clean_config() -> None:
    assert resolve({"strict_config": "true"}, {}, parse_config("flags: {}\n", SOURCE), SOURCE).strict_config


# -- what no project accepts ---------------------------------------------------------------------------------------


def test_a_duplicate_key_is_an_error_naming_both_lines() -> None:
    text = "flags:\n  migStrategy: none\nsharing: {}\nflags:\n  migStrategy: mixed\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    assert str(caught.value).startswith(f"{SOURCE}: line 4: duplicate key `flags` (first given at line 1)")


def test_a_nested_duplicate_key_is_an_error() -> None:
    text = ("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
            "      replicas: 8\n")
    with pytest.raises(ConfigError, match="line 6: duplicate key `replicas` \\(first given at line 5\\)"):
        parse_config(text, SOURCE)


def test_a_merge_key_may_be_overridden() -> None:
    text = "base: &b {migStrategy: none}\n"  # not a config key: dropped with a warning
    config, found = parse_config_with_warnings(text + "flags:\n  <<: *b\n  migStrategy: single\n", SOURCE)
    assert config.flags is not None and config.flags.mig_strategy == "single"
    assert [w.path for w in found] == ["$.base"]


def test_a_duplicate_key_that_is_not_key_like_is_not_quoted() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("a b c d $6$x: 1\na b c d $6$x: 2\n", SOURCE)
    assert "$6$" not in str(caught.value) and "duplicate key" in str(caught.value)


@pytest.mark.parametrize("text", ["flags: [\n", "a: b: c\n", "\tx\n"])
def test_yaml_errors_name_the_file(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text.encode(), SOURCE)
    assert str(caught.value).startswith(f"{SOURCE}: not valid YAML")
    assert "<byte string>" not in str(caught.value) and "<unicode string>" not in str(caught.value)


def test_the_file_api_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("flags:\n  foo: 1\n")
    _, found = load_config_file_with_warnings(path)
    assert [(w.source, w.path) for w in found] == [(str(path), "$.flags.foo")]


def test_time_slicing_beside_mps_on_every_gpu_is_ignored_as_upstream_does() -> None:
    config, found = parse_config_with_warnings(
        "sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      replicas: 2\n"
        "  mps:\n    resources:\n    - name: gpu\n      replicas: 2\n", SOURCE)
    assert [w.path for w in found] == ["$.sharing.timeSlicing"]
    assert "upstream serves mps and ignores timeSlicing" in found[0].message
    assert config.sharing is not None and config.sharing.time_slicing is None and config.sharing.mps is not None


def test_time_slicing_and_mps_on_named_devices_keep_nvdps_meaning() -> None:
    config, found = parse_config_with_warnings(
        "sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      rename: ts\n      replicas: 2\n"
        "      devices: [1]\n  mps:\n    resources:\n    - name: gpu\n      rename: mps\n      replicas: 2\n"
        "      devices: [0]\n", SOURCE)
    assert found == ()
    assert config.sharing is not None and config.sharing.time_slicing is not None


def test_imex_channels_load_without_warning_as_upstream_serves_them() -> None:
    """nvdp passes IMEX channels as upstream does (nvdp.core.plan.imex): nothing to warn about."""
    assert warnings_of("imex:\n  channelIDs: [0]\n") == []
    settings = resolve({}, {}, parse_config("imex:\n  channelIDs: [0]\n  required: true\n", SOURCE), SOURCE)
    assert (settings.imex_channel_ids, settings.imex_required, settings.config_warnings) == ((0,), True, ())
