"""Per-node configs end to end: the daemon, a config directory, a node label on a fake API server (real TLS and
tokens), and the kubelet emulator. The acceptance sequence of the node-label issue."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nvdp.core.config.settings import resolve
from nvdp.daemon import NodeConfig
from nvdp.node_config import ConfigSources
from nvdp.observe.metrics import Metrics
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.fake_apiserver import open_fake_apiserver
from tests.harness import daemon, eventually, wait_for
from tests.helpers import gpu, write_node

LABEL = "nvidia.com/device-plugin.config"
NODE = "gpu-node-1"
PLAIN = "version: v1\n"


def sliced(replicas: int, name: str = "nvidia.com/gpu") -> str:
    return f"version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: {name}\n      replicas: {replicas}\n"


def metric(metrics: Metrics, metric_name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name == metric_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def count(kubelet: KubeletEmulator, resource: str = "nvidia.com/gpu") -> int:
    return len(kubelet.devices(resource))


async def test_relabel_unknown_label_new_file_unset_label_and_invalid_config(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)])
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "A").write_text(PLAIN)
    (configs / "B").write_text(sliced(4))
    metrics = Metrics()

    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {LABEL: "A"})
        sources = ConfigSources(config_dir=configs, node_name=NODE, node_label=LABEL, default_config="A")

        def make_settings(config: object, source: str) -> object:
            return resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": ""},
                           {}, config, config_source=source)  # type: ignore[arg-type]

        node_config = NodeConfig(sources, fake.api_config(token="token-1"), make_settings)  # type: ignore[arg-type]
        async with daemon(make_settings(None, "flags"), metrics=metrics, node_config=node_config):  # type: ignore[arg-type]
            assert await wait_for(kubelet, lambda k: count(k) == 2)
            assert metric(metrics, "nvdp_config_info", name="A") == 1

            # Relabel to B: time-slicing x4 on both GPUs.
            fake.patch_node_labels(NODE, {LABEL: "B"})
            assert await wait_for(kubelet, lambda k: count(k) == 8)

            # Relabel to an unknown C: nothing changes, and it is reported.
            fake.patch_node_labels(NODE, {LABEL: "C"})
            await eventually(lambda: metric(metrics, "nvdp_config_label_unknown_total", value="C") == 1)
            assert count(kubelet) == 8

            # Create C: applied as soon as it appears.
            (configs / "C").write_text(sliced(2))
            assert await wait_for(kubelet, lambda k: count(k) == 4)

            # Remove the label: the default (A).
            fake.patch_node_labels(NODE, {LABEL: None})
            assert await wait_for(kubelet, lambda k: count(k) == 2)

            # An invalid config under the active name: the old plan keeps serving, the error is reported.
            (configs / "A").write_text("version: v1\nflags:\n  migStrategy: sometimes\n")
            await eventually(lambda: metric(metrics, "nvdp_config_last_reload_successful") == 0)
            assert count(kubelet) == 2
            assert set(kubelet.devices("nvidia.com/gpu").values()) == {"Healthy"}

            # Every decision above also reached the API server as an Event on the Node, in `default`.
            def reasons() -> set[str]:
                return {body["reason"] for _, body in fake.posted_events}

            await eventually(lambda: {"ConfigApplied", "ConfigLabelUnknown", "ConfigRejected"} <= reasons(), lambda: (
                reasons(), fake.posted_events[:3], [r for r in fake.requests if r.kind == "other"][:3]))
            path, body = fake.posted_events[0]
            assert path == "/api/v1/namespaces/default/events"
            assert body["involvedObject"]["kind"] == "Node" and body["involvedObject"]["name"] == NODE


async def test_a_reload_that_changes_only_a_mig_resource_keeps_the_gpu_stream(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    a100 = gpu(0, migEnabled=True, migDevices=[
        {"uuid": "MIG-aaaaaaaa-0000-0000-0000-000000000001", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 7, "ci": 0},
        {"uuid": "MIG-aaaaaaaa-0000-0000-0000-000000000002", "profile": "1g.5gb", "memoryMiB": 4864, "gi": 8, "ci": 0},
    ])
    node = write_node(tmp_path / "node.yaml", [a100, gpu(1)])
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text("version: v1\nflags:\n  migStrategy: mixed\n")

    def make_settings(config: object, source: str) -> object:
        return resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": ""},
                       {}, config, config_source=source)  # type: ignore[arg-type]

    node_config = NodeConfig(ConfigSources(config_dir=configs), None, make_settings)  # type: ignore[arg-type]
    async with daemon(make_settings(None, "flags"), node_config=node_config):  # type: ignore[arg-type]
        assert await wait_for(kubelet, lambda k: count(k, "nvidia.com/mig-1g.5gb") == 2 and count(k) == 1)
        gpu_endpoint = kubelet.endpoint("nvidia.com/gpu")
        (configs / "default").write_text("version: v1\nflags:\n  migStrategy: mixed\n"
                                         + sliced(3, "nvidia.com/mig-1g.5gb").removeprefix("version: v1\n"))
        assert await wait_for(kubelet, lambda k: count(k, "nvidia.com/mig-1g.5gb") == 6)
        # The whole-GPU resource did not change: same registration, same stream, never broken.
        assert kubelet.endpoint("nvidia.com/gpu") is gpu_endpoint
        assert kubelet.broken_streams.get("nvidia.com/gpu", 0) == 0
        assert [r.resource for r in kubelet.registrations].count("nvidia.com/gpu") == 1


async def test_an_xid_and_the_recovery_become_node_events(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    events = tmp_path / "xids"
    events.write_text("")
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1)], eventsFile=str(events))
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text(PLAIN)

    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {})

        def make_settings(config: object, source: str) -> object:
            return resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": "",
                            "health_quiet_period": "0.3"}, {}, config, config_source=source)  # type: ignore[arg-type]

        node_config = NodeConfig(ConfigSources(config_dir=configs, node_name=NODE),
                                 fake.api_config(token="token-1"), make_settings)  # type: ignore[arg-type]
        async with daemon(make_settings(None, "flags"), node_config=node_config):  # type: ignore[arg-type]
            with events.open("a") as f:
                f.write("xid GPU-00000000-aaaa-bbbb-cccc-000000000000 48\n")

            def messages(reason: str) -> list[str]:
                return [b["message"] for _, b in fake.posted_events if b["reason"] == reason]

            await eventually(lambda: bool(messages("DeviceUnhealthy")) and bool(messages("DeviceRecovered")))
            (unhealthy,) = messages("DeviceUnhealthy")
            assert unhealthy.startswith("device GPU-00000000-aaaa-bbbb-cccc-000000000000 is Unhealthy: XID 48")
            assert unhealthy.endswith("(1 advertised device(s))")
