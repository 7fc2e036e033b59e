"""CDI settings: upstream's flags, environment variables and config keys; nvdp's checks; no CDI root unless given."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.cdi.plugin_specs import cdi_options, update_device_plugin_specs
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import parse_config
from nvdp.core.config.schema import Config, Imex
from nvdp.core.config.settings import Settings, resolve
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.model import Plan


def test_defaults_from_the_command_line() -> None:
    s = resolve({}, {})
    assert s.cdi_root == Path("/var/run/cdi")
    assert s.nvidia_cdi_hook_path == "/usr/bin/nvidia-ctk"
    assert s.container_driver_root == Path("/driver-root")
    assert (s.cdi_feature_flags, s.cdi_disable_hooks) == ((), ())


@pytest.mark.parametrize(
    ("env", "dest", "expected"),
    [
        ({"NVIDIA_CDI_HOOK_PATH": "/usr/local/bin/nvidia-cdi-hook"}, "nvidia_cdi_hook_path",
         "/usr/local/bin/nvidia-cdi-hook"),
        ({"NVIDIA_CTK_PATH": "/opt/nvidia-ctk"}, "nvidia_cdi_hook_path", "/opt/nvidia-ctk"),
        ({"CONTAINER_DRIVER_ROOT": "/host-driver"}, "container_driver_root", Path("/host-driver")),
        ({"DRIVER_ROOT_CTR_PATH": "/host-driver"}, "container_driver_root", Path("/host-driver")),
        ({"CDI_DISABLE_HOOKS": "update-ldcache, create-symlinks"}, "cdi_disable_hooks",
         ("update-ldcache", "create-symlinks")),
        ({"CDI_FEATURE_FLAGS": "disable-ipc-discoverer"}, "cdi_feature_flags", ("disable-ipc-discoverer",)),
        ({"CDI_ROOT": "/etc/cdi"}, "cdi_root", Path("/etc/cdi")),
    ],
)
def test_upstreams_environment_variables(env: dict[str, str], dest: str, expected: object) -> None:
    assert getattr(resolve({}, env), dest) == expected


def test_upstreams_config_keys() -> None:
    config = parse_config("version: v1\nflags:\n  plugin:\n    nvidiaCTKPath: /usr/bin/nvidia-cdi-hook\n"
                          "    containerDriverRoot: /drv\n", "config.yaml")
    s = resolve({}, {}, config)
    assert (s.nvidia_cdi_hook_path, s.container_driver_root) == ("/usr/bin/nvidia-cdi-hook", Path("/drv"))
    # flag > env > file
    s = resolve({"nvidia_cdi_hook_path": "/a/nvidia-ctk"}, {"NVIDIA_CDI_HOOK_PATH": "/b/nvidia-ctk"}, config)
    assert s.nvidia_cdi_hook_path == "/a/nvidia-ctk"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CDI_DISABLE_HOOKS": "update-ldcach"}, "CDI_DISABLE_HOOKS: unknown CDI hook 'update-ldcach'"),
        ({"CDI_FEATURE_FLAGS": "enable-everything"}, "CDI_FEATURE_FLAGS: unknown CDI feature flag"),
        ({"NVIDIA_CDI_HOOK_PATH": "nvidia-ctk"}, "NVIDIA_CDI_HOOK_PATH: the CDI hook path must be an absolute host"),
    ],
)
def test_bad_values_are_refused_naming_their_source(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve({}, env)


def test_cdi_is_on_when_any_strategy_is_a_cdi_one() -> None:
    assert not Settings().cdi_enabled
    assert Settings(device_list_strategy=("envvar", "cdi-annotations")).cdi_enabled
    assert Settings(device_list_strategy=("cdi-cri",)).cdi_enabled


def test_options_follow_the_settings() -> None:
    s = Settings(device_id_strategy="index", gds_enabled=True, cdi_disable_hooks=("all",),
                 nvidia_cdi_hook_path="/x/nvidia-cdi-hook", config=Config(imex=Imex(channel_ids=[0])))
    options = cdi_options(s, "/run/nvidia/driver", "/")
    assert (options.device_id_strategy, options.gds_enabled, options.disabled_hooks) == ("index", True,
                                                                                         frozenset({"all"}))
    assert (options.hook_path, options.imex_channel_ids) == ("/x/nvidia-cdi-hook", (0,))
    assert (options.host_driver_root, options.host_dev_root) == ("/run/nvidia/driver", "/")


async def test_settings_built_in_code_touch_no_cdi_file() -> None:
    s = Settings(device_list_strategy=("cdi-cri",))
    assert s.cdi_root is None
    assert await update_device_plugin_specs(s, NodeInventory("1", 1, ()), Plan(resources=())) is None
