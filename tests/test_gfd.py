"""Publishing the GFD labels: NodeFeature objects and Node labels on a fake API server, the label child's write
discipline (only on change, rate-bounded, timestamp), and the daemon end to end on a simulated node."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nvdp.core.config.settings import Settings, resolve
from nvdp.core.inventory import Gpu, NodeInventory
from nvdp.core.plan.model import Device, Plan, Resource, Sharing
from nvdp.daemon import NodeConfig
from nvdp.gfd import FileSink, LabelPublisher, LabelSinkError, NodeFeatureSink, NodeLabelSink, label_sink
from nvdp.k8s.client import open_client
from nvdp.k8s.nodefeatures import OWNED_ANNOTATION, publish_node_feature, publish_node_labels
from nvdp.node_config import ConfigSources
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.fake_apiserver import open_fake_apiserver
from tests.harness import daemon, eventually, wait_for
from tests.helpers import gpu, write_node

NODE = "gpu-node-1"
NAMESPACE = "gpu-system"
FEATURE = (NAMESPACE, f"nvidia-features-for-{NODE}")
POD = {"metadata": {"name": "nvdp-x7k2p", "namespace": NAMESPACE, "uid": "pod-uid", "ownerReferences": [
    {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "nvdp", "uid": "ds-uid", "controller": True}]}}


# -- the API sinks ---------------------------------------------------------------------------------------------------


async def test_node_feature_is_created_updated_only_on_change_and_owned_by_the_daemonset() -> None:
    async with open_fake_apiserver(token=None) as fake, open_client(fake.api_config()) as client:
        fake.pods[(NAMESPACE, "nvdp-x7k2p")] = POD
        sink = NodeFeatureSink(client, NAMESPACE, NODE, "nvdp-x7k2p")
        assert await sink.publish({"nvidia.com/gpu.count": "2"})
        obj = fake.node_features[FEATURE]
        assert (obj["apiVersion"], obj["kind"]) == ("nfd.k8s-sigs.io/v1alpha1", "NodeFeature")
        assert obj["metadata"]["labels"] == {"nfd.node.kubernetes.io/node-name": NODE}
        assert obj["spec"]["labels"] == {"nvidia.com/gpu.count": "2"}
        assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in obj["metadata"]["ownerReferences"]] \
            == [("DaemonSet", "nvdp", "ds-uid", True), ("Pod", "nvdp-x7k2p", "pod-uid", None)]

        assert not await sink.publish({"nvidia.com/gpu.count": "2"})
        assert fake.count("put") == 0
        assert await sink.publish({"nvidia.com/gpu.count": "4"})
        assert fake.node_features[FEATURE]["spec"]["labels"] == {"nvidia.com/gpu.count": "4"}
        assert fake.count("put") == 1 and fake.count("post") == 1
        # Someone else's edit of the object is put back.
        fake.node_features[FEATURE]["metadata"]["labels"] = {}
        assert await sink.publish({"nvidia.com/gpu.count": "4"})
        assert fake.node_features[FEATURE]["metadata"]["labels"] == {"nfd.node.kubernetes.io/node-name": NODE}


async def test_node_feature_without_a_readable_pod_has_no_owner() -> None:
    async with open_fake_apiserver(token=None) as fake, open_client(fake.api_config()) as client:
        assert await publish_node_feature(client, NAMESPACE, NODE, {"a": "1"}, [])
        assert "ownerReferences" not in fake.node_features[FEATURE]["metadata"]
        assert await NodeFeatureSink(client, NAMESPACE, NODE, "gone-pod").publish({"a": "2"})
        assert "ownerReferences" not in fake.node_features[FEATURE]["metadata"]


async def test_node_labels_are_merged_and_stale_ones_removed_leaving_others_alone() -> None:
    async with open_fake_apiserver(token=None) as fake, open_client(fake.api_config()) as client:
        fake.set_node(NODE, {"kubernetes.io/hostname": NODE, "nvidia.com/gpu.product": "set-by-someone-else"})
        assert await publish_node_labels(client, NODE, {"nvidia.com/gpu.product": "A100", "nvidia.com/gpu.count": "2"})
        node = fake.objects[("/api/v1/nodes", NODE)]["metadata"]
        assert node["labels"] == {"kubernetes.io/hostname": NODE, "nvidia.com/gpu.product": "A100",
                                  "nvidia.com/gpu.count": "2"}
        assert node["annotations"][OWNED_ANNOTATION] == "nvidia.com/gpu.count,nvidia.com/gpu.product"

        assert not await publish_node_labels(client, NODE, {"nvidia.com/gpu.product": "A100",
                                                            "nvidia.com/gpu.count": "2"})
        assert fake.count("patch") == 1

        assert await publish_node_labels(client, NODE, {"nvidia.com/gpu.product": "A100"})
        node = fake.objects[("/api/v1/nodes", NODE)]["metadata"]
        assert node["labels"] == {"kubernetes.io/hostname": NODE, "nvidia.com/gpu.product": "A100"}
        assert node["annotations"][OWNED_ANNOTATION] == "nvidia.com/gpu.product"
        # Only this node was asked for: no list, no other path.
        assert {r.path for r in fake.requests} == {f"/api/v1/nodes/{NODE}"}


def test_the_sink_follows_the_flags() -> None:
    def settings(**cli: str) -> Settings:
        return resolve(cli, {"POD_NAMESPACE": NAMESPACE})

    client: Any = object()
    default_file = Path("/etc/kubernetes/node-feature-discovery/features.d/nvdp")
    assert label_sink(settings(), None, None) == FileSink(default_file)
    assert label_sink(settings(label_sink="none"), client, NODE) is None
    assert isinstance(label_sink(settings(use_node_feature_api="true"), client, NODE), NodeFeatureSink)
    assert label_sink(settings(label_sink="node"), client, NODE) == NodeLabelSink(client, NODE)
    with pytest.raises(ValueError, match=r"--label-sink node .* needs --node-name"):
        label_sink(settings(label_sink="node"), None, NODE)
    with pytest.raises(ValueError, match="--use-node-feature-api"):
        label_sink(settings(use_node_feature_api="true"), client, None)


# -- the label child ---------------------------------------------------------------------------------------------------


class MemorySink:
    description = "memory"

    def __init__(self) -> None:
        self.writes: list[tuple[float, dict[str, str]]] = []
        self.changed = trio.Event()

    async def publish(self, labels: Mapping[str, str]) -> bool:
        self.writes.append((trio.current_time(), dict(labels)))
        self.changed.set()
        self.changed = trio.Event()
        return True


def _node(replicas: int) -> tuple[Plan, NodeInventory]:
    gpu0 = Gpu(0, "GPU-0", "NVIDIA A100-SXM4-40GB", 40960, 0, "00000000:10:00.0", "8.0")
    devices = tuple(Device(f"GPU-0::{n}", "GPU-0", "0", "GPU-0", 0, ("/dev/nvidia0",), replica=n)
                    for n in range(replicas))
    sharing = Sharing.TIME_SLICING if replicas > 1 else Sharing.NONE
    return Plan((Resource("nvidia.com/gpu", devices, sharing),)), NodeInventory("580.82.07", 13000, (gpu0,))


@pytest.mark.parametrize("timestamps", [True, False])
async def test_labels_are_written_on_change_only_at_a_bounded_rate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, timestamps: bool
) -> None:
    sink = MemorySink()
    publisher = LabelPublisher(sink, host_root=tmp_path, machine_type_file=None, timestamps=timestamps,
                               min_interval_s=5.0)
    before = int(time.time())
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        publisher.update(*_node(1), "none")
        await sink.changed.wait()
        publisher.nudge()  # a health change that changes no label: no write
        publisher.update(*_node(1), "none")  # a reload that changes nothing: no write
        await trio.sleep(30)
        assert len(sink.writes) == 1
        for replicas in (2, 3, 4):  # three reloads in two seconds: the first written at once, the last 5 s later
            publisher.update(*_node(replicas), "none")
            await trio.sleep(1)
        while len(sink.writes) < 3:
            await sink.changed.wait()
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert [w["nvidia.com/gpu.replicas"] for _, w in sink.writes] == ["1", "2", "4"]
    times = [t for t, _ in sink.writes]
    assert all(later - earlier >= 5.0 for earlier, later in itertools.pairwise(times))
    first = sink.writes[0][1]
    assert first["nvidia.com/gpu.machine"] == "unknown"
    if timestamps:
        # Wall-clock seconds (the mock clock moves trio's time only).
        stamps = [int(w["nvidia.com/gfd.timestamp"]) for _, w in sink.writes]
        assert before <= min(stamps) and max(stamps) <= time.time()
    else:
        assert "nvidia.com/gfd.timestamp" not in first
    assert repr(publisher) == f"<LabelPublisher memory: {len(sink.writes[-1][1]) - timestamps} labels published, " \
        "3 writes, 0 failed>"


class FlakySink(MemorySink):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts: list[float] = []

    async def publish(self, labels: Mapping[str, str]) -> bool:
        self.attempts.append(trio.current_time())
        if len(self.attempts) <= self.failures:
            raise LabelSinkError("NodeFeature x: HTTP 503 Service Unavailable")
        return await super().publish(labels)


async def test_a_failed_write_is_retried_with_backoff_and_the_child_stays_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sink = FlakySink(failures=3)
    publisher = LabelPublisher(sink, host_root=tmp_path, machine_type_file=None, timestamps=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        start = trio.current_time()
        publisher.update(*_node(1), "none")
        await sink.changed.wait()
        nursery.cancel_scope.cancel()
    # 1 s, 2 s, 4 s between attempts; the labels written are the ones current at the last attempt.
    assert [round(t - start, 6) for t in sink.attempts] == [0, 1, 3, 7]
    assert len(sink.writes) == 1 and publisher.failures == 3
    assert "GPU feature labels not written: NodeFeature x: HTTP 503 Service Unavailable; retrying in 4 s" \
        in caplog.messages


async def test_api_errors_say_what_to_fix() -> None:
    async with open_fake_apiserver(token=None) as fake, open_client(fake.api_config()) as client:
        fake.node_feature_api = False
        with pytest.raises(LabelSinkError, match=r"404 .*is node-feature-discovery installed"):
            await NodeFeatureSink(client, NAMESPACE, NODE).publish({"a": "1"})
        with pytest.raises(LabelSinkError, match=r"404 .*no node gpu-node-1: check --node-name"):
            await NodeLabelSink(client, NODE).publish({"a": "1"})


# -- the daemon --------------------------------------------------------------------------------------------------------


def _sliced(replicas: int) -> str:
    return ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
            f"      replicas: {replicas}\n")


async def test_the_daemon_publishes_a_node_feature_and_follows_a_reload(tmp_path: Path,
                                                                       kubelet: KubeletEmulator) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1, pciBusId="00000000:11:00.0")],
                      machine="PowerEdge XE8545")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "plain").write_text("version: v1\n")
    (configs / "sliced").write_text(_sliced(4))
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {"nvidia.com/device-plugin.config": "plain"})
        fake.pods[(NAMESPACE, "nvdp-x7k2p")] = POD
        env = {"POD_NAMESPACE": NAMESPACE, "POD_NAME": "nvdp-x7k2p"}

        def make_settings(config: Any, source: str) -> Settings:
            return resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": "",
                            "node_name": NODE, "use_node_feature_api": "true", "label_interval": "0",
                            "machine_type_file": "/sys/class/dmi/id/product_name"}, env, config, config_source=source)

        sources = ConfigSources(config_dir=configs, node_name=NODE, default_config="plain")
        node_config = NodeConfig(sources, fake.api_config(token="token-1"), make_settings)

        def labels() -> dict[str, str]:
            obj = fake.node_features.get(FEATURE)
            return obj["spec"]["labels"] if obj else {}

        async with daemon(make_settings(None, "flags"), node_config=node_config):
            await eventually(lambda: labels().get("nvidia.com/gpu.replicas") == "1", labels)
            assert {k: labels()[k] for k in ("nvidia.com/gpu.count", "nvidia.com/gpu.product",
                                             "nvidia.com/gpu.machine", "nvidia.com/gpu.mode",
                                             "nvidia.com/mig.capable")} == {
                "nvidia.com/gpu.count": "2", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
                "nvidia.com/gpu.machine": "PowerEdge-XE8545", "nvidia.com/gpu.mode": "compute",
                "nvidia.com/mig.capable": "true"}
            assert labels()["nvidia.com/gfd.timestamp"].isdigit()
            owners = fake.node_features[FEATURE]["metadata"]["ownerReferences"]
            assert owners[0]["kind"] == "DaemonSet"

            fake.patch_node_labels(NODE, {"nvidia.com/device-plugin.config": "sliced"})
            assert await wait_for(kubelet, lambda k: len(k.devices("nvidia.com/gpu")) == 8)
            await eventually(lambda: labels().get("nvidia.com/gpu.replicas") == "4", labels)
            assert labels()["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-SHARED"
            assert labels()["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
            assert fake.count("post", f"/apis/nfd.k8s-sigs.io/v1alpha1/namespaces/{NAMESPACE}/nodefeatures") == 1


async def test_the_daemon_labels_its_own_node_directly(tmp_path: Path, kubelet: KubeletEmulator) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0)])
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {"nvidia.com/gpu.family": "stale-from-an-old-run", "team": "ml"})
        # An earlier run set a label this one does not produce: removed. Labels nvdp never set are kept, and one it
        # produces (gpu.family) is corrected.
        fake.objects[("/api/v1/nodes", NODE)]["metadata"]["annotations"] = {OWNED_ANNOTATION: "nvidia.com/old.label"}
        fake.patch_node_labels(NODE, {"nvidia.com/old.label": "x"})

        def make_settings(config: Any, source: str) -> Settings:
            return resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": "",
                            "node_name": NODE, "label_sink": "node", "no_timestamp": "true"}, {}, config,
                           config_source=source)

        node_config = NodeConfig(None, fake.api_config(token="token-1"), make_settings)

        def labels() -> dict[str, str]:
            return dict(fake.objects[("/api/v1/nodes", NODE)]["metadata"]["labels"])

        async with daemon(make_settings(None, "flags"), node_config=node_config):
            await eventually(lambda: labels().get("nvidia.com/gpu.count") == "1", labels)
            assert "nvidia.com/old.label" not in labels()
            assert labels()["team"] == "ml"
            assert labels()["nvidia.com/gpu.family"] == "ampere"
            assert "nvidia.com/gfd.timestamp" not in labels()


async def test_the_daemon_writes_the_feature_file_with_the_simulated_hosts_machine(
    tmp_path: Path, kubelet: KubeletEmulator
) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0)])
    features = tmp_path / "features.d" / "nvdp"
    features.parent.mkdir()
    # The machine-type file's default path is read under the simulated host root, as it is under / on a GPU node.
    settings = resolve({"simulate": str(node), "kubelet_socket": str(kubelet.socket), "metrics_address": "",
                        "nfd_features_file": str(features), "machine_type_file": "/sys/class/dmi/id/product_name"},
                       {})
    async with daemon(settings):
        await eventually(features.exists)
        lines = dict(line.split("=", 1) for line in features.read_text().splitlines())
    assert lines["nvidia.com/gpu.machine"] == "Simulated-GPU-Node"
    assert lines["nvidia.com/gpu.count"] == "1" and lines["nvidia.com/gpu.mode"] == "compute"
    assert lines["nvidia.com/gfd.timestamp"].isdigit()
