"""The Kubernetes API client and watches against the in-process fake API server (real TLS, real HTTP).

No threads are involved (trio sockets on both sides, numeric addresses): every test runs on trio's MockClock with
autojump, so backoffs, bookmark intervals, read deadlines and "gone for a while" cost no real time and do not
depend on the machine's load."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from nvdp.k8s.client import (
    ApiConfig,
    ApiUnreachable,
    KubeConfigError,
    in_cluster_config,
    kubeconfig_config,
    load_api_config,
    open_client,
)
from nvdp.k8s.configmap import watch_configmap
from nvdp.k8s.node_labels import NODES_PATH, watch_node_label
from nvdp.k8s.watch import Backoff, WatchOptions
from tests.fake_apiserver import follow, open_fake_apiserver, write_kubeconfig

LABEL = "nvidia.com/device-plugin.config"
FAST = WatchOptions(backoff_initial_s=0.02, backoff_max_s=0.1, min_stream_s=0.05)


async def test_label_follows_the_node(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a", "other": "x"})
        fake.set_node("n2", {LABEL: "zzz"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            assert await values.next() == "a"
            fake.patch_node_labels("n1", {LABEL: "b"})
            assert await values.next() == "b"
            # Changes that leave the label alone (status, other labels, other nodes) yield nothing.
            fake.touch_node("n1")
            fake.patch_node_labels("n1", {"other": "y"})
            fake.patch_node_labels("n2", {LABEL: "yyy"})
            fake.patch_node_labels("n1", {LABEL: None})
            assert await values.next() is None
            fake.patch_node_labels("n1", {LABEL: ""})  # an empty value reads as unset: no change
            fake.patch_node_labels("n1", {LABEL: "c"})
            assert await values.next() == "c"
            fake.delete_node("n1")
            assert await values.next() is None
            fake.set_node("n1", {LABEL: "d"})
            assert await values.next() == "d"
            assert values.pending() == []
        # One list, then one watch stream carried everything, always narrowed to the one node.
        assert fake.count("list") == 1
        assert fake.count("watch") == 1
        assert all(r.query["fieldSelector"] == "metadata.name=n1" for r in fake.requests)
        watch = next(r for r in fake.requests if r.kind == "watch")
        assert watch.query["allowWatchBookmarks"] == "true"
        assert int(watch.query["timeoutSeconds"]) >= 240


async def test_410_as_event_relists(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            assert await values.next() == "a"
            await fake.wait_watching()
            fake.expire()
            fake.patch_node_labels("n1", {LABEL: "b"})
            assert await values.next() == "b"
            assert fake.count("list") == 2


async def test_410_as_status_relists(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.gone_as = "status"
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            assert await values.next() == "a"
            await fake.wait_watching()
            # While the server is away its history is compacted: the resumed watch is answered 410.
            async with fake.offline():
                fake.patch_node_labels("n1", {LABEL: "b"})
                fake.expire()
            assert await values.next() == "b"
            assert 410 in [r.status for r in fake.requests if r.kind == "watch"]
            assert fake.count("list") == 2


@pytest.mark.parametrize("abrupt", [False, True], ids=["clean-end", "reset"])
async def test_dropped_stream_resumes_from_the_last_version(
    abrupt: bool, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            assert await values.next() == "a"
            fake.patch_node_labels("n1", {LABEL: "b"})
            assert await values.next() == "b"
            seen = fake.rv
            fake.drop_watches(abrupt=abrupt)
            fake.patch_node_labels("n1", {LABEL: "c"})  # may happen while disconnected: history replays it
            assert await values.next() == "c"
            assert fake.count("list") == 1  # resumed, not re-listed
            resumed = [r for r in fake.requests if r.kind == "watch"][1]
            assert resumed.query["resourceVersion"] == str(seen)


async def test_bookmarks_move_the_resume_version(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver(bookmark_interval_s=0.02) as fake:
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            assert await values.next() == "a"
            await fake.wait_watching()
            for n in range(5):
                fake.set_node(f"other-{n}")  # other nodes: no event for us, but the version moves
            latest = fake.rv
            await trio.sleep(0.1)  # a few bookmark intervals
            fake.drop_watches()
            await fake.wait_requests("watch", 2)
            assert fake.requests[-1].query["resourceVersion"] == str(latest)
            assert values.pending() == []


async def test_stalled_watch_is_abandoned(autojump_clock: trio.testing.MockClock) -> None:
    options = WatchOptions(timeout_s=0.1, read_grace_s=0.2, backoff_initial_s=0.02, backoff_max_s=0.1)
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_node_label(client, "n1", LABEL, options)) as values:
            assert await values.next() == "a"
            await fake.wait_watching()
            fake.stalled = True  # silent, and deaf to timeoutSeconds: a half-open connection
            fake.patch_node_labels("n1", {LABEL: "b"})
            await fake.wait_requests("watch", 2)  # the read deadline gave up on the silent stream
            fake.stalled = False
            fake.wake()
            assert await values.next() == "b"


async def test_server_gone_for_a_while(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            assert await values.next() == "a"
            await fake.wait_watching()
            async with fake.offline():
                fake.patch_node_labels("n1", {LABEL: "b"})
                await trio.sleep(1.0)
            with trio.fail_after(1.0):  # back within a capped backoff (0.1 s here)
                assert await values.next() == "b"


async def test_errors_back_off_and_never_spin(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a"})
        fake.fail_next("list", 500, count=2)
        fake.fail_next("watch", 410, count=4)  # listed, then "too old" at once: must not loop hot
        async with open_client(fake.api_config(token="token-1")) as client:
            start = trio.current_time()
            async with follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
                assert await values.next() == "a"
                await fake.wait_requests("watch", 5)
                await fake.wait_watching()
                fake.patch_node_labels("n1", {LABEL: "b"})
                assert await values.next() == "b"
            # Six failures in a row, each waiting at least half of 0.02, 0.04, 0.08, 0.1, 0.1, 0.1 s.
            assert trio.current_time() - start >= 0.2
        assert fake.count("list") == 2 + 5


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next_delay() for _ in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(15.0 <= d <= 30.0 for d in delays[7:])
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_wrong_token_then_rotated_token_file(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("stale\n")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token_file=token_file)) as client, \
                follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            await fake.wait_requests("list", 2)
            assert {r.status for r in fake.requests} == {401}
            token_file.write_text("token-1\n")  # the kubelet rotates the projected token
            assert await values.next() == "a"
            await fake.wait_watching()
            # The server moves on to a new token; the file follows; the watch reconnects with it.
            fake.token = "token-2"
            token_file.write_text("token-2\n")
            fake.drop_watches()
            fake.patch_node_labels("n1", {LABEL: "b"})
            assert await values.next() == "b"
            assert fake.requests[-1].status == 200


async def test_token_read_again_on_401_even_if_the_file_looks_unchanged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1")
        async with open_client(fake.api_config(token_file=token_file)) as client:
            await client.get_json(NODES_PATH)
            stat = token_file.stat()
            fake.token = "token-2"
            token_file.write_text("token-2")
            # Same size, same mtime: only the 401 tells us to read it again.
            os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            await client.get_json(NODES_PATH)
        assert [r.status for r in fake.requests] == [200, 401, 200]


async def test_configmap_watch(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_configmap(client, "nvdp", "plugin-configs", FAST)) as states:
            assert await states.next() is None
            fake.set_configmap("nvdp", "plugin-configs", {"a": "version: v1\n"}, binary_data={"b": "eDogMQo="})
            assert await states.next() == {"a": b"version: v1\n", "b": b"x: 1\n"}
            fake.set_configmap("nvdp", "other", {"x": "y"})
            fake.set_configmap("nvdp", "plugin-configs", {"a": "version: v1\n", "c": ""})
            assert await states.next() == {"a": b"version: v1\n", "c": b""}
            fake.delete_configmap("nvdp", "plugin-configs")
            assert await states.next() is None
        assert all(r.path == "/api/v1/namespaces/nvdp/configmaps" for r in fake.requests)


async def test_leaving_early_is_clean(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "a"})
        async with open_client(fake.api_config(token="token-1")) as client:
            for _ in range(3):
                async with watch_node_label(client, "n1", LABEL, FAST) as values:
                    async for value in values:
                        assert value == "a"
                        break
            gc.collect()  # a leaked generator would warn here, and warnings are errors


async def test_kubeconfig_with_client_certificate(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver(token=None, require_client_cert=True) as fake:
        fake.set_node("n1", {LABEL: "a"})
        path = write_kubeconfig(tmp_path / "kubeconfig", fake, client_cert=fake.client_cert())
        config = load_api_config({"KUBECONFIG": str(path)})
        assert config.source.endswith("context fake")
        async with open_client(config) as client, follow(watch_node_label(client, "n1", LABEL, FAST)) as values:
            assert await values.next() == "a"
        # Without the certificate the TLS handshake fails.
        bare = write_kubeconfig(tmp_path / "bare", fake)
        async with open_client(kubeconfig_config([bare])) as client:
            # Translated at the edge of nvdp.k8s; the transport's own error is the cause.
            with pytest.raises(ApiUnreachable) as bare_info:
                await client.get_json(NODES_PATH)
            assert isinstance(bare_info.value.__cause__, httpx.HTTPError)


async def test_kubeconfig_token_and_ca_file(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("n1")
        path = write_kubeconfig(tmp_path / "kubeconfig", fake, token="token-1", inline_ca=False)
        config = load_api_config({"KUBECONFIG": f"{tmp_path / 'missing'}:{path}"})
        assert config.ca_file == tmp_path / "ca.crt"
        async with open_client(config) as client:
            await client.get_json(NODES_PATH)
        insecure = write_kubeconfig(tmp_path / "insecure", fake, token="token-1", insecure=True)
        async with open_client(load_api_config({}, kubeconfig=str(insecure))) as client:
            await client.get_json(NODES_PATH)
        # The right CA is required when verifying.
        other = ApiConfig(server=fake.url, source="test", token="token-1")
        async with open_client(other) as client:
            with pytest.raises(ApiUnreachable, match="ConnectError") as info:
                await client.get_json(NODES_PATH)
            assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_kubeconfig_errors(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="not found"):
        kubeconfig_config([tmp_path / "nope"])
    path = tmp_path / "kubeconfig"
    path.write_text("clusters: [{name: c, cluster: {server: https://x}}]\nusers: [{name: u, user: {exec: {}}}]\n"
                    "contexts: [{name: x, context: {cluster: c, user: u}}]\n")
    with pytest.raises(KubeConfigError, match="no current-context"):
        kubeconfig_config([path])
    with pytest.raises(KubeConfigError, match="context 'y' not found"):
        kubeconfig_config([path], context="y")
    with pytest.raises(KubeConfigError, match="exec authentication is not supported"):
        kubeconfig_config([path], context="x")


def test_in_cluster_config(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("ca")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    config = in_cluster_config(env, tmp_path)
    assert (config.server, config.token_file, config.ca_file) == (
        "https://10.0.0.1:6443", tmp_path / "token", tmp_path / "ca.crt")
    assert in_cluster_config({"KUBERNETES_SERVICE_HOST": "fd00::1"}, tmp_path).server == "https://[fd00::1]:443"
    assert load_api_config(env, service_account_dir=tmp_path).source == "in-cluster service account"
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST is unset"):
        load_api_config({}, service_account_dir=tmp_path)
    with pytest.raises(KubeConfigError, match="no service-account token"):
        in_cluster_config(env, tmp_path / "missing")
