"""Config file, flags and env vars: schema, precedence (flag > env > file > default) and error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nvdp.cli import build_parser, load_settings
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import load_config_file, parse_config
from nvdp.core.config.settings import Settings, resolve


def settings_from(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return load_settings(build_parser().parse_args(["run", *argv]), env or {})


def test_defaults_match_upstream() -> None:
    s = resolve({}, {})
    assert s.mig_strategy == "none"
    assert s.fail_on_init_error is True
    assert s.driver_root == Path("/") and s.dev_root == Path("/")
    assert s.pass_device_specs is False
    assert s.device_list_strategy == ("envvar",)
    assert s.device_id_strategy == "uuid"
    assert s.kubelet_socket == Path("/var/lib/kubelet/device-plugins/kubelet.sock")


def test_an_empty_file_means_every_default() -> None:
    assert resolve({}, {}, parse_config("", "c.yaml")) == resolve({}, {})


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        pytest.param("index", "uuid", "uuid", "index", id="a flag beats env and file"),
        pytest.param(None, "index", "uuid", "index", id="env beats the file"),
        pytest.param(None, None, "index", "index", id="the file beats the default"),
        pytest.param(None, None, None, "uuid", id="the default applies when nothing is given"),
    ],
)
def test_precedence_is_flag_then_env_then_file_then_default(
    flag: str | None, env: str | None, file: str | None, expected: str
) -> None:
    config = parse_config(f"flags:\n  plugin:\n    deviceIDStrategy: {file}\n" if file else "", "c.yaml")
    s = resolve({"device_id_strategy": flag}, {"DEVICE_ID_STRATEGY": env} if env else {}, config)
    assert s.device_id_strategy == expected


def test_a_false_in_the_file_is_not_mistaken_for_unset() -> None:
    config = parse_config("flags:\n  failOnInitError: false\n", "c.yaml")
    assert resolve({}, {}, config).fail_on_init_error is False


def test_device_list_strategy_is_a_string_or_a_list_in_the_file_and_a_comma_list_in_env() -> None:
    assert resolve({}, {}, parse_config("flags: {plugin: {deviceListStrategy: volume-mounts}}", "c")
                   ).device_list_strategy == ("volume-mounts",)
    assert resolve({}, {}, parse_config("flags: {plugin: {deviceListStrategy: [envvar, volume-mounts]}}", "c")
                   ).device_list_strategy == ("envvar", "volume-mounts")
    assert resolve({}, {"DEVICE_LIST_STRATEGY": "envvar, volume-mounts"}).device_list_strategy == (
        "envvar", "volume-mounts")


def test_dev_root_defaults_to_the_driver_root() -> None:
    s = resolve({}, {"NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"})
    assert s.dev_root == Path("/run/nvidia/driver")
    s = resolve({"dev_root": "/"}, {"NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"})
    assert s.dev_root == Path("/")


def test_flag_aliases_and_bool_flags() -> None:
    s = settings_from(["--nvidia-driver-root", "/drv", "--pass-device-specs", "--fail-on-init-error=false"])
    assert s.driver_root == Path("/drv")
    assert s.pass_device_specs is True
    assert s.fail_on_init_error is False


def test_an_empty_kubelet_socket_means_do_not_register() -> None:
    assert resolve({"kubelet_socket": ""}, {}).kubelet_socket is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("flags:\n  migStrategy: none\n  migStrategy: mixed\n",
                     "line 3: duplicate key `migStrategy` (first given at line 2)",
                     id="a duplicate key names both lines"),
        pytest.param("flags:\n  plugin:\n    passDeviceSpecs: maybe\n", "$.flags.plugin.passDeviceSpecs",
                     id="a wrongly typed value names its path"),
        pytest.param("flags:\n  migStrategy: no\n", "quote the value", id="YAML's no-as-false gets a hint"),
        pytest.param("- a\n- b\n", "expected a mapping", id="a list at the top level"),
        pytest.param("flags: [\n", "not valid YAML", id="broken YAML"),
    ],
)
def test_file_errors_name_the_file_and_the_key_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, "/etc/nvdp/config.yaml")
    assert str(error.value).startswith("/etc/nvdp/config.yaml")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("cli", "env", "file", "message"),
    [
        pytest.param({}, {}, "flags:\n  migStrategy: sometimes\n",
                     "c.yaml: $.flags.migStrategy: invalid value 'sometimes': accepted values are none, single, mixed",
                     id="a bad value in the file"),
        pytest.param({}, {"MIG_STRATEGY": "sometimes"}, "", "MIG_STRATEGY: invalid value 'sometimes'",
                     id="a bad value in env names the variable"),
        pytest.param({"device_id_strategy": "serial"}, {}, "", "--device-id-strategy: invalid value 'serial'",
                     id="a bad flag names the flag"),
        pytest.param({}, {"PASS_DEVICE_SPECS": "perhaps"}, "", "PASS_DEVICE_SPECS: invalid value 'perhaps'",
                     id="a bad boolean in env"),
        pytest.param({}, {}, "imex:\n  channelIDs: [0, 1]\n",
                     "c.yaml: $.imex.channelIDs: invalid IMEX channel IDs: invalid IMEX config: channelIDs must be "
                     "[] or [0]; found [0 1]", id="IMEX channels other than 0 in the file, upstream's words"),
        pytest.param({}, {}, "version: v2\n", "$.version: unknown version 'v2'", id="an unknown version"),
    ],
)
def test_bad_values_name_where_they_came_from(
    cli: dict[str, str], env: dict[str, str], file: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        resolve(cli, env, parse_config(file, "c.yaml"), config_source="c.yaml")
    assert message in str(error.value)


def test_an_upstream_config_file_with_every_flag_printed_loads(tmp_path: Path) -> None:
    # Upstream logs its config with null for unset leaves; such a file must load unchanged.
    path = tmp_path / "upstream.yaml"
    path.write_text(
        "version: v1\n"
        "flags:\n"
        "  migStrategy: none\n  failOnInitError: true\n  nvidiaDriverRoot: /\n  nvidiaDevRoot: null\n"
        "  gdsEnabled: null\n  mofedEnabled: null\n  useNodeFeatureAPI: null\n"
        "  plugin:\n    passDeviceSpecs: false\n    deviceListStrategy: [envvar]\n    deviceIDStrategy: uuid\n"
        "    cdiAnnotationPrefix: cdi.k8s.io/\n    nvidiaCTKPath: /usr/bin/nvidia-ctk\n"
        "    containerDriverRoot: /driver-root\n"
        "  gfd:\n    oneshot: false\n    sleepInterval: 60s\n"
    )
    s = resolve({}, {}, load_config_file(path))
    assert s.device_id_strategy == "uuid"


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param("flags:\n  plugin:\n    passDeviceSpecs: maybe\n", "$.flags.plugin", id="wrong type"),
        pytest.param("flags:\n  migStrategy: sometimes\n", "$.flags.migStrategy", id="bad value"),
    ],
)
def test_the_daemon_exits_non_zero_with_the_key_path(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "nvdp", "--config-file", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert fragment in result.stderr
    assert str(path) in result.stderr
