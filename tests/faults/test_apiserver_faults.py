"""The Kubernetes API misbehaving under the running daemon (node label chooses the config): connection refused,
500s, 410 Gone, a watch that stalls without closing, malformed JSON events, a token that expires and is rotated.
After each fault the label is changed and the daemon must follow it, still answering the kubelet."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import nvdp.k8s.watch
import nvdp.testing.fake_apiserver
from nvdp.core.config.settings import Settings, resolve
from nvdp.daemon import NodeConfig
from nvdp.node_config import ConfigSources
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.fake_apiserver import FakeApiServer, open_fake_apiserver
from tests.harness import GPU0, LIMIT_S, LogWatch, answers, daemon, eventually, until

LABEL = "nvidia.com/device-plugin.config"
NODE = "gpu-node-1"
#: Config name -> devices advertised for nvidia.com/gpu on the two-GPU node.
CONFIGS = {"A": ("version: v1\n", 2), "B": ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                                             "    - name: nvidia.com/gpu\n      replicas: 2\n", 4)}


async def relabel_and_follow(fake: FakeApiServer, kubelet: KubeletEmulator, name: str, what: str) -> None:
    fake.patch_node_labels(NODE, {LABEL: name})
    devices = CONFIGS[name][1]
    await until(kubelet, lambda k: len(k.devices("nvidia.com/gpu")) == devices, what=f"{what}: config {name}")
    await answers(kubelet, "nvidia.com/gpu", GPU0 if name == "A" else f"{GPU0}::1", visible_as=GPU0)


async def test_api_server_faults(
    two_gpu_node: Path, kubelet: KubeletEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: LogWatch
) -> None:
    # The watch's periods shortened (the defaults: a 240 s watch, a 30 s read grace) so that a stall is noticed in
    # a second; the logic is the same.
    monkeypatch.setattr(nvdp.k8s.watch, "WatchOptions", partial(
        nvdp.k8s.watch.WatchOptions, timeout_s=0.5, read_grace_s=0.5, backoff_initial_s=0.02, backoff_max_s=0.2,
        min_stream_s=0.05))
    # Malformed events: while `garbage` is set, the fake server sends a line that is not JSON before each event.
    garbage = {"lines": 0}
    real_chunk = nvdp.testing.fake_apiserver._chunk

    async def chunk(send: Any, event: dict[str, Any]) -> None:
        if garbage["lines"] > 0:
            garbage["lines"] -= 1
            await send({"type": "http.response.body", "body": b'{"type": "MODIFIED", "object": {\n',
                        "more_body": True})
        await real_chunk(send, event)

    monkeypatch.setattr(nvdp.testing.fake_apiserver, "_chunk", chunk)
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, (text, _) in CONFIGS.items():
        (configs / name).write_text(text)
    token_file = tmp_path / "token"
    token_file.write_text("token-1\n")

    async with open_fake_apiserver() as fake:
        fake.set_node(NODE, {LABEL: "A"})

        def make_settings(parsed: object, source: str) -> Settings:
            return resolve({"simulate": str(two_gpu_node), "kubelet_socket": str(kubelet.socket),
                            "metrics_address": ""}, {}, parsed, config_source=source)  # type: ignore[arg-type]

        sources = ConfigSources(config_dir=configs, node_name=NODE, node_label=LABEL, default_config="A")
        node_config = NodeConfig(sources, fake.api_config(token_file=token_file), make_settings)
        async with daemon(make_settings(None, "flags"), node_config=node_config):
            await until(kubelet, lambda k: len(k.devices("nvidia.com/gpu")) == 2)
            await fake.wait_watching()

            fake.fail_next("list", 500, 2)
            fake.fail_next("watch", 500, 3)
            fake.drop_watches()
            await relabel_and_follow(fake, kubelet, "B", "after 500s")

            fake.expire()
            await relabel_and_follow(fake, kubelet, "A", "after 410 Gone")

            async with fake.offline():  # connection refused
                mark = len(logs.records)
                fake.patch_node_labels(NODE, {LABEL: "B"})
                # The witness: the cut watch and at least one refused attempt after it, each retried.
                await logs.wait(r"(retrying|reconnecting) in [0-9.]+ s$", after=mark, count=2)
            await relabel_and_follow(fake, kubelet, "B", "after connection refused")

            watches = fake.count("watch")
            fake.stalled = True  # silent and deaf to timeoutSeconds: a half-open connection
            fake.patch_node_labels(NODE, {LABEL: "A"})
            with trio.fail_after(LIMIT_S):
                await fake.wait_requests("watch", watches + 1)  # noticed and reconnected
            fake.stalled = False
            fake.wake()
            await relabel_and_follow(fake, kubelet, "A", "after a stalled watch")

            garbage["lines"] = 1
            await relabel_and_follow(fake, kubelet, "B", "after a malformed event")

            # The token expires (401), then the kubelet rotates the projected file.
            fake.token = "token-2"
            fake.drop_watches()
            await eventually(lambda: any(r.status == 401 for r in fake.requests[-3:]), "a request refused with 401")
            token_file.write_text("token-2\n")
            await relabel_and_follow(fake, kubelet, "A", "after token rotation")
