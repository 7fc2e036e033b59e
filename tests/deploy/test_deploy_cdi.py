"""The Helm chart with CDI device list strategies, upstream's cdi.* values and IMEX channels (issue 16), rendered by
Helm's own engine: what is mounted for each, the env vars each value sets, and what fails at install time."""

from __future__ import annotations

import pytest

from nvdp.core.config.settings import CDI_FEATURE_FLAGS
from tests.deploy.test_deploy_chart import DROP_ALL


@pytest.mark.parametrize(
    ("values", "name", "value"),
    [
        ({"deviceListStrategy": ["envvar", "cdi-annotations"]}, "DEVICE_LIST_STRATEGY", "envvar,cdi-annotations"),
        ({"cdi": {"nvidiaHookPath": "/usr/local/bin/nvidia-cdi-hook"}}, "NVIDIA_CDI_HOOK_PATH",
         "/usr/local/bin/nvidia-cdi-hook"),
        ({"cdi": {"featureFlags": "disable-ipc-discoverer"}}, "CDI_FEATURE_FLAGS", "disable-ipc-discoverer"),
        ({"cdi": {"featureFlags": ["disable-ipc-discoverer", "disable-nvsandboxutils"]}}, "CDI_FEATURE_FLAGS",
         "disable-ipc-discoverer,disable-nvsandboxutils"),
        ({"imex": {"channelIDs": [0]}}, "IMEX_CHANNEL_IDS", "0"),
        ({"imex": {"channelIDs": []}}, "IMEX_CHANNEL_IDS", ""),
        ({"imex": {"required": True}}, "IMEX_REQUIRED", "true"),
    ],
)
def test_each_cdi_and_imex_value_sets_its_env(render, values, name, value):
    assert render(values).env[name] == value


def test_unset_cdi_and_imex_values_set_nothing(render):
    env = render().env
    for name in ("NVIDIA_CDI_HOOK_PATH", "CDI_FEATURE_FLAGS", "IMEX_CHANNEL_IDS", "IMEX_REQUIRED", "CDI_ROOT"):
        assert name not in env, name


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"deviceDiscoveryStrategy": "tegra"}, "deviceDiscoveryStrategy=tegra: nvdp discovers GPUs through NVML"),
        ({"cdi": {"featureFlags": "disable-ipc-discoverer,enable-x"}}, "cdi.featureFlags=enable-x: nvdp knows"),
        ({"cdi": {"featureFlags": ["disable-hooks"]}}, "cdi.featureFlags=disable-hooks"),
    ],
)
def test_values_still_refused_fail_naming_the_value(render_error, values, message):
    assert message in render_error(values)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"imex": {"channelIDs": [1]}}, "channelIDs"),
        ({"imex": {"channelIDs": [0, 0]}}, "channelIDs"),
        ({"imex": {"required": "yes"}}, "required"),
        ({"cdi": {"nvidiaHookPath": "nvidia-ctk"}}, "nvidiaHookPath"),
        ({"cdi": {"hookPath": "/usr/bin/nvidia-ctk"}}, "hookPath"),
    ],
)
def test_schema_refuses_bad_cdi_and_imex_values_naming_the_key(render_error, values, key):
    message = render_error(values)
    assert "schema" in message and key in message, message



@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"deviceListStrategy": "cdi-cri"}, id="cdi-cri"),
        pytest.param({"deviceListStrategy": "envvar,cdi-annotations"}, id="a comma list with cdi-annotations"),
        pytest.param({"deviceListStrategy": ["volume-mounts", "cdi-annotations"]}, id="a YAML list"),
        pytest.param({"config": {"map": {"default": "flags:\n  plugin:\n    deviceListStrategy: [cdi-cri]\n"}}},
                     id="an inline config"),
        pytest.param({"config": {"name": "mine"}, "cdi": {"enabled": True}},
                     id="cdi.enabled for an external ConfigMap"),
    ],
)
def test_a_cdi_strategy_mounts_the_cdi_root_and_the_driver_root(render, values):
    r = render(values)
    mount, volume = r.mount("/var/run/cdi")
    assert not mount.get("readOnly"), "nvdp writes its specs there"
    assert volume["hostPath"] == {"path": "/var/run/cdi", "type": "DirectoryOrCreate"}
    mount, volume = r.mount("/driver-root")
    assert mount["readOnly"] is True and volume["hostPath"] == {"path": "/", "type": "Directory"}
    assert (r.env["CDI_ROOT"], r.env["CONTAINER_DRIVER_ROOT"]) == ("/var/run/cdi", "/driver-root")
    # Writing a root-owned host directory as root needs no capability: CDI adds none (an external ConfigMap may
    # select MIG, which alone adds SYS_ADMIN).
    without_cdi = {k: v for k, v in values.items() if k not in ("deviceListStrategy", "cdi")}
    if "map" in values.get("config", {}):
        without_cdi = {}
    assert r.security_context == render(without_cdi).security_context


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"deviceListStrategy": ["envvar", "volume-mounts"]}, id="no CDI strategy"),
        pytest.param({"deviceListStrategy": "envvar",
                      "config": {"map": {"default": "flags:\n  plugin:\n    deviceListStrategy: cdi-cri\n"}}},
                     id="the top-level value beats an inline config, as env beats file"),
        pytest.param({"config": {"name": "mine"}}, id="an external ConfigMap alone"),
        pytest.param({"cdi": {"nvidiaHookPath": "/usr/bin/nvidia-ctk"}}, id="cdi values alone"),
    ],
)
def test_without_a_cdi_strategy_nothing_cdi_is_mounted(render, values):
    r = render(values)
    assert "/var/run/cdi" not in r.mount_paths() and "/driver-root" not in r.mount_paths()
    assert "CDI_ROOT" not in r.env


def test_cdi_with_a_driver_container_mounts_its_root_at_both_paths(render):
    r = render({"deviceListStrategy": "cdi-cri", "nvidiaDriverRoot": "/run/nvidia/driver",
                "cdi": {"nvidiaHookPath": "/usr/local/nvidia/toolkit/nvidia-cdi-hook"}})
    assert r.mount("/driver-root")[1]["hostPath"] == {"path": "/run/nvidia/driver", "type": "Directory"}
    assert r.mount("/run/nvidia/driver")[0]["readOnly"] is True
    assert r.env["NVIDIA_DRIVER_ROOT"] == "/run/nvidia/driver"
    assert r.env["NVIDIA_CDI_HOOK_PATH"] == "/usr/local/nvidia/toolkit/nvidia-cdi-hook"


@pytest.mark.parametrize(
    ("values", "mounted"),
    [
        pytest.param({"imex": {"channelIDs": [0]}}, True, id="a channel with the dev root /"),
        pytest.param({"imex": {"channelIDs": [0], "required": True}, "nvidiaDriverRoot": "/",
                      "nvidiaDevRoot": "/"}, True, id="roots given as /"),
        pytest.param({"config": {"map": {"default": "imex:\n  channelIDs: [0]\n"}}}, True, id="an inline config"),
        pytest.param({"imex": {"channelIDs": []}, "config": {"map": {"default": "imex:\n  channelIDs: [0]\n"}}},
                     False, id="the value beats an inline config"),
        pytest.param({"imex": {"required": True}}, False, id="required without a channel"),
        pytest.param({"imex": {"channelIDs": [0]}, "nvidiaDriverRoot": "/run/nvidia/driver"}, False,
                     id="a driver root is mounted whole already"),
    ],
)
def test_imex_channels_are_mounted_where_nvdp_checks_them(render, values, mounted):
    r = render(values)
    if mounted:
        mount, volume = r.mount("/dev/nvidia-caps-imex-channels")
        assert mount["readOnly"] is True
        assert volume["hostPath"] == {"path": "/dev/nvidia-caps-imex-channels", "type": "DirectoryOrCreate"}
    else:
        assert "/dev/nvidia-caps-imex-channels" not in r.mount_paths()
    assert r.security_context == DROP_ALL, "a stat of the node needs no privilege"


@pytest.mark.parametrize("flag", CDI_FEATURE_FLAGS)
def test_the_chart_accepts_every_feature_flag_nvdp_accepts(render, flag):
    """The chart's list of feature flags is written out in _helpers.tpl; it must follow nvdp's own."""
    assert render({"cdi": {"featureFlags": flag}}).env["CDI_FEATURE_FLAGS"] == flag
