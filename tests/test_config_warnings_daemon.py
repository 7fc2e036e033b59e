"""Issue 15 end to end: a config upstream ran is served with warnings that reach the log, a Node Event, the
`nvdp_config_warnings` gauge and `nvdp status`; a live source's refused first config does not stop nvdp (NotReady
with the reason, an Event, applied once fixed)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nvdp.core.config.load import load_config_file
from nvdp.core.config.settings import resolve
from nvdp.daemon import NodeConfig
from nvdp.node_config import ConfigSources
from nvdp.observe.http import ProbeState
from nvdp.observe.metrics import Metrics
from nvdp.observe.status import Probe, Samples, render
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.fake_apiserver import open_fake_apiserver
from tests.harness import daemon, eventually, wait_for
from tests.helpers import gpu, write_node

NODE = "gpu-node-1"
#: Upstream ran this: a misspelt key under flags and time-slicing `devices` without `rename` (ignored there).
UPSTREAM = ("version: v1\nflags:\n  renameByDefault: true\nsharing:\n  timeSlicing:\n    resources:\n"
            "    - name: nvidia.com/gpu\n      replicas: 2\n      devices: [0]\n")


def samples(metrics: Metrics) -> list[tuple[str, dict[str, str], float]]:
    text = generate_latest(metrics.registry).decode()
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def value(metrics: Metrics, name: str) -> float | None:
    return next((v for n, _, v in samples(metrics) if n == name), None)


def count(kubelet: KubeletEmulator, resource: str = "nvidia.com/gpu") -> int:
    return len(kubelet.devices(resource))


def node_config_for(node: Path, kubelet: KubeletEmulator, configs: Path, api: object = None,
                    **cli: str) -> tuple[NodeConfig, object]:
    def make_settings(config: object, source: str) -> object:
        return resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": "", **cli},
                       {}, config, config_source=source)  # type: ignore[arg-type]

    sources = ConfigSources(config_dir=configs, node_name=NODE if api is not None else None)
    return NodeConfig(sources, api, make_settings), make_settings  # type: ignore[arg-type]


async def test_a_config_upstream_ran_is_served_with_warnings_everywhere(
    tmp_path: Path, kubelet: KubeletEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)])
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text(UPSTREAM)
    metrics, probes = Metrics(), ProbeState()
    caplog.set_level(logging.WARNING, logger="nvdp.controller")
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {})
        node_config, make_settings = node_config_for(node, kubelet, configs, fake.api_config(token="token-1"))
        async with daemon(make_settings(None, "flags"), metrics=metrics, probes=probes,  # type: ignore[operator]
                          node_config=node_config):
            # Upstream's meaning: `devices` ignored, every GPU time-sliced.
            assert await wait_for(kubelet, lambda k: count(k) == 4)
            source = str(configs / "default")
            warnings = sorted((labels["path"], labels["config"]) for n, labels, v in samples(metrics)
                              if n == "nvdp_config_warnings" and v == 1)
            assert warnings == [(f"{source}: $.flags.renameByDefault", "default"),
                                (f"{source}: $.sharing.timeSlicing.resources[0].devices", "default")]
            logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config warning: ")]
            assert len(logged) == 2 and f"{source}: $.flags.renameByDefault: unknown key" in logged[0]

            def messages() -> list[str]:
                return [b["message"] for _, b in fake.posted_events if b["reason"] == "ConfigWarning"]

            await eventually(lambda: bool(messages()))
            (message,) = messages()
            assert "served with 2 warning(s)" in message and "$.sharing.timeSlicing.resources[0].devices" in message

            # `nvdp status` lists them.
            text = generate_latest(metrics.registry).decode()
            shown = render(Samples.parse(text), Probe(True, "ok"), Probe(True, "ok"))
            assert "CONFIG WARNING" in shown and "$.flags.renameByDefault" in shown

            # Fixed: the gauge is empty again (no stale series).
            (configs / "default").write_text(UPSTREAM.replace("  renameByDefault: true\n", "  migStrategy: none\n")
                                             .replace("      devices: [0]\n", ""))
            await eventually(lambda: value(metrics, "nvdp_config_generation") == 2)
            assert [n for n, _, _ in samples(metrics) if n == "nvdp_config_warnings"] == []
            assert count(kubelet) == 4


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param("flags: [\n", "not valid YAML", id="YAML garbage"),
        pytest.param("flags:\n  migStrategy: 3\n", "$.flags.migStrategy", id="wrong type"),
        pytest.param("flags:\n  migStrategy: none\n  migStrategy: mixed\n", "duplicate key", id="duplicate key"),
        pytest.param("sharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n      rename: s\n      replicas: 2\n"
                     "      devices: 5\n", "requested 5 devices", id="a plan the node cannot hold"),
    ],
)
async def test_a_refused_first_config_of_a_live_source_serves_nothing_until_fixed(
    tmp_path: Path, kubelet: KubeletEmulator, bad: str, reason: str
) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)])
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text(bad)
    metrics, probes = Metrics(), ProbeState()
    node_config, make_settings = node_config_for(node, kubelet, configs)
    async with daemon(make_settings(None, "flags"), metrics=metrics, probes=probes,  # type: ignore[operator]
                      node_config=node_config):
        # Started, not ready, saying why; nothing registered; the rejection counted (the Event's twin).
        ready, why = probes.readiness()
        assert not ready and "config 'default' rejected, serving nothing until it is fixed" in why, why
        assert reason in why
        assert value(metrics, "nvdp_config_last_reload_successful") == 0
        assert kubelet.registrations == []

        (configs / "default").write_text("version: v1\n")
        assert await wait_for(kubelet, lambda k: count(k) == 2)
        await eventually(lambda: probes.readiness()[0], lambda: probes.readiness())
        assert value(metrics, "nvdp_config_last_reload_successful") == 1


async def test_a_refused_first_config_posts_an_event(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0)])
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text("flags: [\n")
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {})
        node_config, make_settings = node_config_for(node, kubelet, configs, fake.api_config(token="token-1"))
        async with daemon(make_settings(None, "flags"), node_config=node_config):  # type: ignore[operator]
            def rejected() -> list[str]:
                return [b["message"] for _, b in fake.posted_events if b["reason"] == "ConfigRejected"]

            await eventually(lambda: bool(rejected()))
            assert "nothing is served until it is fixed: " in rejected()[0] and "not valid YAML" in rejected()[0]
            assert str(configs / "default") in rejected()[0]


async def test_strict_config_refuses_a_live_sources_warnings_until_fixed(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0)])
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text("flags:\n  foo: 1\n")
    probes = ProbeState()
    node_config, make_settings = node_config_for(node, kubelet, configs, strict_config="true")
    async with daemon(make_settings(None, "flags"), probes=probes,  # type: ignore[operator]
                      node_config=node_config):
        ready, why = probes.readiness()
        assert not ready and "errors under strict config (--strict-config)" in why and "$.flags.foo" in why
        (configs / "default").write_text("flags: {}\n")
        assert await wait_for(kubelet, lambda k: count(k) == 1)


# -- a static --config-file ----------------------------------------------------------------------------------------


async def test_a_static_config_file_with_warnings_is_served_and_reported(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)])
    path = tmp_path / "config.yaml"
    path.write_text(UPSTREAM)
    settings = resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": "",
                        "config_file": str(path)}, {}, load_config_file(path), config_source=str(path))
    metrics = Metrics()
    async with daemon(settings, metrics=metrics):
        # Registered is not yet listed: wait for the kubelet's ListAndWatch to carry the devices.
        assert await wait_for(kubelet, lambda k: count(k) == 4)
        paths = sorted(labels["path"] for n, labels, _ in samples(metrics) if n == "nvdp_config_warnings")
        assert paths == [f"{path}: $.flags.renameByDefault", f"{path}: $.sharing.timeSlicing.resources[0].devices"]


@pytest.mark.parametrize(
    ("content", "args", "env", "fragment"),
    [
        pytest.param("flags:\n  foo: 1\n", ["--strict-config"], {}, "$.flags.foo: unknown key `foo`", id="flag"),
        pytest.param("flags:\n  foo: 1\n", [], {"STRICT_CONFIG": "true"}, "(STRICT_CONFIG)", id="env"),
        pytest.param("flags:\n  a: 1\n  a: 2\n", [], {}, "line 3: duplicate key `a` (first given at line 2)",
                     id="duplicate key"),
        pytest.param("flags: [\n", [], {}, "not valid YAML", id="YAML garbage"),
    ],
)
def test_a_static_config_file_that_is_refused_exits_1(tmp_path: Path, content: str, args: list[str],
                                                        env: dict[str, str], fragment: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "nvdp", "--config-file", str(path), "--kubelet-socket", "",
                             "--metrics-address", "", *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env}, check=False)
    assert result.returncode == 1
    assert fragment in result.stderr and str(path) in result.stderr
    assert "<byte string>" not in result.stderr and "Traceback" not in result.stderr
