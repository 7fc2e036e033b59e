"""`nvdp_k8s_watch_reconnects_total` and `nvdp_k8s_watch_relists_total`, counted through the watches' observer
(`nvdp.k8s.watch.WatchObserver`, which `Metrics` implements), against the fake API server."""

from __future__ import annotations

import trio

from nvdp.k8s.client import open_client
from nvdp.k8s.watch import WatchOptions
from nvdp.node_config import ConfigSources, watch_config
from nvdp.observe.metrics import Metrics
from tests.fake_apiserver import FakeApiServer, follow, open_fake_apiserver
from tests.observe_fixtures import scrape

LABEL = "nvidia.com/device-plugin.config"
NODE = "node-1"
FAST = WatchOptions(backoff_initial_s=0.02, backoff_max_s=0.1, min_stream_s=0.05)
A = "version: v1\n"
B = "version: v1\nflags:\n  migStrategy: mixed\n"


def counters(metrics: Metrics) -> tuple[float | None, float | None]:
    samples = scrape(metrics)
    return samples.value("nvdp_k8s_watch_reconnects_total"), samples.value("nvdp_k8s_watch_relists_total")


async def requests(fake: FakeApiServer, kind: str, count: int) -> None:
    with trio.fail_after(5):
        await fake.wait_requests(kind, count)


async def test_dropped_and_expired_watches_are_counted() -> None:
    """Both API watches of the node-config choice (the node label, the ConfigMap) report to the metrics: a dropped
    stream is one reconnect per watch, an expired one (410 Gone) one relist and, after the list, one reconnect."""
    metrics = Metrics()
    sources = ConfigSources(config_map=("nvdp", "configs"), node_name=NODE, node_label=LABEL)
    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {LABEL: "a"})
        fake.set_configmap("nvdp", "configs", {"a": A, "b": B})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_config(sources, client, watch_options=FAST, observer=metrics)) as updates:
            assert (await updates.next()).name == "a"
            with trio.fail_after(5):
                await fake.wait_watching(2)
            assert counters(metrics) == (0, 0)

            fake.drop_watches()
            await requests(fake, "watch", 4)  # counted before each request is sent
            assert counters(metrics) == (2, 0)
            assert fake.count("list") == 2  # resumed, not listed again

            fake.patch_node_labels(NODE, {LABEL: "b"})
            assert (await updates.next()).name == "b"
            with trio.fail_after(5):
                await fake.wait_watching(2)
            fake.expire()
            await requests(fake, "list", 4)
            await requests(fake, "watch", 6)
            assert counters(metrics) == (4, 2)
