"""IMEX channels end to end: the daemon on a simulated node that has (or lacks) channel 0, against the kubelet
emulator. A required channel that is missing refuses the config the way every refused config is refused
(docs/compatibility.md): at start with flags or a static file, nvdp exits with upstream's message; a live source's
first config serves nothing until fixed; a reload keeps the running config."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from nvdp.core.config.settings import Settings
from nvdp.daemon import StartupError, run_daemon
from nvdp.observe.http import ProbeState
from nvdp.observe.metrics import Metrics
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import daemon, eventually, wait_for
from tests.helpers import gpu, write_node
from tests.test_config_warnings_daemon import node_config_for, value

GPU0 = gpu(0)["uuid"]
CHANNEL = "/dev/nvidia-caps-imex-channels/channel0"
REQUIRED = "version: v1\nimex:\n  channelIDs: [0]\n  required: true\n"


def node(tmp_path: Path, channels: list[int]) -> Path:
    return write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)], imexChannels=channels)


def settings(node_file: Path, kubelet: KubeletEmulator, **overrides: object) -> Settings:
    return Settings(simulate=node_file, kubelet_socket=kubelet.socket, imex_channel_ids=(0,),  # type: ignore[arg-type]
                    **overrides)


async def test_a_present_channel_reaches_the_container_per_strategy(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    s = settings(node(tmp_path, [0]), kubelet, imex_required=True, device_list_strategy=("envvar", "volume-mounts"),
                 pass_device_specs=True, dev_root=Path("/run/nvidia/driver"))
    async with daemon(s):
        response = await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu", [GPU0])
    (container,) = response.container_responses
    assert container.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices",
                              "NVIDIA_IMEX_CHANNELS": "0"}
    assert [m.container_path for m in container.mounts] == [f"/var/run/nvidia-container-devices/{GPU0}",
                                                            "/var/run/nvidia-container-devices/imex/0"]
    assert (container.devices[-1].container_path, container.devices[-1].host_path) == (
        CHANNEL, f"/run/nvidia/driver{CHANNEL}")


async def test_a_missing_optional_channel_is_skipped_with_a_warning(
    tmp_path: Path, kubelet: KubeletEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nvdp.core.plan.imex")
    async with daemon(settings(node(tmp_path, []), kubelet)):
        response = await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu", [GPU0])
    assert response.container_responses[0].envs == {"NVIDIA_VISIBLE_DEVICES": GPU0}
    assert any(r.getMessage().startswith("Ignoring requested IMEX channel channel0") for r in caplog.records)


async def test_a_missing_required_channel_stops_the_start_with_upstreams_message(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    with pytest.raises(StartupError, match="requested IMEX channel channel0 does not exist"):
        await run_daemon(settings(node(tmp_path, []), kubelet, imex_required=True), handle_signals=False)
    assert kubelet.registrations == []


async def test_deliberately_unlike_upstream_a_live_source_refuses_a_missing_required_channel_and_keeps_serving(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text(REQUIRED)
    probes, metrics = ProbeState(), Metrics()
    node_config, make_settings = node_config_for(node(tmp_path, []), kubelet, configs)
    async with daemon(make_settings(None, "flags"), probes=probes, metrics=metrics,  # type: ignore[operator]
                      node_config=node_config):
        # The first config is refused: nothing served, not ready, the reason given.
        ready, why = probes.readiness()
        assert not ready and "requested IMEX channel channel0 does not exist" in why, why
        assert kubelet.registrations == []

        # Fixed (the channel is no longer required): served, without the channel.
        (configs / "default").write_text(REQUIRED.replace("true", "false"))
        assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/gpu")) == 2)
        await eventually(lambda: probes.readiness()[0], lambda: probes.readiness())
        assert value(metrics, "nvdp_config_last_reload_successful") == 1

        # Required again: the reload is refused and the running config keeps serving.
        (configs / "default").write_text(REQUIRED + "# again\n")
        await eventually(lambda: value(metrics, "nvdp_config_last_reload_successful") == 0)
        response = await trio.to_thread.run_sync(kubelet.allocate, "nvidia.com/gpu", [GPU0])
        assert response.container_responses[0].envs == {"NVIDIA_VISIBLE_DEVICES": GPU0}
        assert len(kubelet.devices("nvidia.com/gpu")) == 2
