"""The DRA kubelet plugin's sockets and gRPC services, against the grpcio DRA kubelet emulator and a fake preparer:
registration, versions, socket lifecycle, re-registration, Prepare/Unprepare answers, the health stream."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from nvdp.core.dra.plugin import HealthTarget
from nvdp.core.dra.types import ClaimRef, PreparedDevice, PrepareResult, UnprepareResult
from nvdp.core.health import HealthTracker, XidPolicy
from nvdp.core.health.events import XidEvent
from nvdp.core.health.xids import EVENT_XID_CRITICAL
from nvdp.dra.calls import ClaimCalls
from nvdp.dra.kubelet_plugin import DraHealthFeed, DraKubeletPlugin, DraPluginPaths
from nvdp.kubelet.aio import open_asyncio_thread
from nvdp.testing.dra_emulator import DraKubeletEmulator

# Threads, descriptors and processes: none left behind by the plugin or the emulator (tests/harness.py).
pytestmark = pytest.mark.usefixtures("no_leaks")

DRIVER = "gpu.nvidia.com"
NODE = "node-a"
GPU0, GPU1 = "GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111"
TARGETS = (
    HealthTarget("gpu-0", GPU0),
    HealthTarget("gpu-1-mig-1g5gb-19-0", GPU1, (1, 0)),
    HealthTarget("gpu-1-mig-1g5gb-19-1", GPU1, (2, 0)),
)


@dataclass
class FakePreparer:
    """Answers from a table: uid -> PrepareResult (missing uids get no entry); records every call."""

    answers: dict[str, PrepareResult] = field(default_factory=dict)
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    fail: Exception | None = None
    block: bool = False
    #: Set when a blocked prepare began, and when it was cancelled.
    blocked: trio.Event = field(default_factory=trio.Event)
    cancelled: trio.Event = field(default_factory=trio.Event)

    async def prepare(self, claims: Sequence[ClaimRef]) -> Mapping[str, PrepareResult]:
        self.calls.append(("prepare", tuple(c.uid for c in claims)))
        if self.block:
            try:
                self.blocked.set()
                await trio.sleep_forever()
            finally:
                self.cancelled.set()
        if self.fail is not None:
            raise self.fail
        return {c.uid: self.answers[c.uid] for c in claims if c.uid in self.answers}

    async def unprepare(self, claims: Sequence[ClaimRef]) -> Mapping[str, UnprepareResult]:
        self.calls.append(("unprepare", tuple(c.uid for c in claims)))
        return {c.uid: UnprepareResult() for c in claims}


@dataclass
class Node:
    root: Path
    paths: DraPluginPaths
    plugin: DraKubeletPlugin
    preparer: FakePreparer
    feed: DraHealthFeed
    tracker: HealthTracker
    scope: trio.CancelScope
    #: Set when the plugin's child has returned (its sockets unbound).
    exited: trio.Event

    async def kubelet(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@contextlib.asynccontextmanager
async def dra_node(short_dir: Path, *, resend_s: float = 10.0, deadline_s: float = 30.0, max_pending: int = 16,
                   before: Callable[[DraPluginPaths], None] | None = None) -> AsyncIterator[Node]:
    paths = DraPluginPaths(DRIVER, short_dir / "plugins_registry", short_dir / "plugins")
    paths.registry_dir.mkdir(exist_ok=True)
    if before is not None:
        before(paths)
    preparer = FakePreparer()
    tracker = HealthTracker(XidPolicy.from_env(None, None), quiet_period_s=300)
    feed = DraHealthFeed(NODE, tracker)
    feed.set_targets(TARGETS)
    async with open_asyncio_thread() as host, trio.open_nursery() as nursery:
        calls = ClaimCalls(preparer, deadline_s=deadline_s, max_pending=max_pending)
        plugin = DraKubeletPlugin(host, paths, calls, feed, health_resend_s=resend_s)
        scope, exited = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                with scope:
                    await plugin.run(task_status=task_status)
            finally:
                exited.set()

        await nursery.start(run)
        if paths.registry_dir.is_dir():
            with trio.fail_after(5):
                await plugin.wait_until(lambda p: p.binds)  # the registration socket follows dra.sock
        yield Node(short_dir, paths, plugin, preparer, feed, tracker, scope, exited)
        nursery.cancel_scope.cancel()


def registered(kubelet: DraKubeletEmulator) -> Any:
    return kubelet.plugins.get(DRIVER)


# -- registration -----------------------------------------------------------------------------------------------------


async def test_the_kubelet_registers_the_driver_with_v1_and_both_health_versions(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            plugin = await node.kubelet(kubelet.wait_for, registered)
            registration = kubelet.registrations[-1]
            await node.plugin.state.registered.wait()
    assert registration.accepted and registration.driver == DRIVER
    assert registration.endpoint == str(short_dir / "plugins" / DRIVER / "dra.sock")
    assert os.path.isabs(registration.endpoint)
    assert registration.versions == ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth",
                                     "v1alpha1.DRAResourceHealth")
    assert plugin.dra_version == "v1.DRAPlugin"
    assert plugin.health_version == "v1.DRAResourceHealth"
    assert node.plugin.state.registrations == 1


@pytest.mark.parametrize(("kubelet_versions", "dra", "health"), [
    pytest.param(("v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth"), "v1beta1.DRAPlugin",
                 "v1alpha1.DRAResourceHealth", id="kubelet-1.33-knows-v1beta1-and-v1alpha1-health"),
    pytest.param(("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth"), "v1.DRAPlugin",
                 "v1alpha1.DRAResourceHealth", id="kubelet-1.34-takes-v1"),
])
async def test_older_kubelets_find_a_version_they_know(short_dir: Path, kubelet_versions: tuple[str, ...],
                                                       dra: str, health: str) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir, versions=kubelet_versions) as kubelet:
            plugin = await node.kubelet(kubelet.wait_for, registered)
            node.preparer.answers["u1"] = PrepareResult(devices=(
                PreparedDevice(("gpu",), NODE, "gpu-0", ("k8s.gpu.nvidia.com/claim=u1-gpu-0",), share_id="s1"),))
            answer = await node.kubelet(kubelet.prepare, DRIVER, [("ns", "u1", "c1")])
            await node.kubelet(kubelet.wait_for, lambda k: registered(k).devices)
    assert (plugin.dra_version, plugin.health_version) == (dra, health)
    (device,) = answer["u1"].devices
    assert device[:4] == (("gpu",), NODE, "gpu-0", ("k8s.gpu.nvidia.com/claim=u1-gpu-0",))
    # v1beta1 has no share ID on the wire.
    assert device[4] == ("s1" if dra == "v1.DRAPlugin" else None)


async def test_a_kubelet_without_a_common_version_refuses_and_the_plugin_says_why(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir, versions=("v1alpha4.DRAPlugin",)) as kubelet:
            await node.kubelet(kubelet.wait_for, lambda k: k.registrations)
            with trio.fail_after(5):
                await node.plugin.wait_until(lambda p: p.state.last_error)
    assert not kubelet.registrations[0].accepted
    assert "none of services supported by the plugin" in node.plugin.state.last_error
    assert not node.plugin.state.registered.is_set()


# -- sockets --------------------------------------------------------------------------------------------------------


def _stale_sockets(paths: DraPluginPaths) -> None:
    """Leftovers of a crashed run: socket files nobody listens on."""
    paths.plugin_socket.parent.mkdir(parents=True)
    for path in (paths.plugin_socket, paths.registration_socket):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))


async def test_stale_sockets_are_replaced_and_dra_sock_is_up_before_the_registration_socket(short_dir: Path) -> None:
    async with dra_node(short_dir, before=_stale_sockets) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            assert await node.kubelet(kubelet.prepare, DRIVER, []) == {}
            plugin_st, reg_st = os.stat(node.paths.plugin_socket), os.stat(node.paths.registration_socket)
    assert plugin_st.st_mode & 0o777 == reg_st.st_mode & 0o777 == 0o600
    # Both bound (replacing the stale files), dra.sock first.
    assert plugin_st.st_ctime_ns <= reg_st.st_ctime_ns


async def test_both_sockets_are_removed_on_the_way_out_but_not_a_socket_that_is_no_longer_ours(
    short_dir: Path,
) -> None:
    async with dra_node(short_dir) as node:
        assert node.paths.plugin_socket.exists() and node.paths.registration_socket.exists()
        node.scope.cancel()
        with trio.fail_after(5):
            await node.exited.wait()
        assert not node.paths.registration_socket.exists() and not node.paths.plugin_socket.exists()
    async with dra_node(short_dir) as node:
        # Someone else's socket now sits at dra.sock (a new instance): ours must not remove it.
        node.paths.plugin_socket.unlink()
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(node.paths.plugin_socket))
            theirs = os.stat(node.paths.plugin_socket).st_ino
            node.scope.cancel()
            with trio.fail_after(5):
                await node.exited.wait()
            assert not node.paths.registration_socket.exists()
            assert os.stat(node.paths.plugin_socket).st_ino == theirs


async def test_a_recreated_registry_directory_registers_the_driver_again(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            shutil.rmtree(node.paths.registry_dir)
            node.paths.registry_dir.mkdir()
            await node.kubelet(kubelet.wait_for, lambda k: sum(r.accepted for r in k.registrations) >= 2)
            await node.kubelet(kubelet.wait_for, registered)
            answer = await node.kubelet(kubelet.unprepare, DRIVER, [("ns", "u9", "c9")])
    assert node.plugin.binds == 2
    assert answer == {"u9": ""}


async def test_a_deleted_registration_socket_is_bound_again(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            node.paths.registration_socket.unlink()
            await node.kubelet(kubelet.wait_for, lambda k: sum(r.accepted for r in k.registrations) >= 2)
    assert node.plugin.binds == 2


async def test_the_registry_directory_is_waited_for(short_dir: Path) -> None:
    async with dra_node(short_dir, before=lambda paths: paths.registry_dir.rmdir()) as node:
        assert not node.paths.registration_socket.exists()
        node.paths.registry_dir.mkdir()
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)


# -- Prepare / Unprepare -----------------------------------------------------------------------------------------------


async def test_an_empty_request_gets_an_empty_map_without_asking_the_preparer(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            for version in ("v1.DRAPlugin", "v1beta1.DRAPlugin"):
                assert await node.kubelet(kubelet.prepare, DRIVER, [], version=version) == {}
                assert await node.kubelet(kubelet.unprepare, DRIVER, [], version=version) == {}
    assert node.preparer.calls == []


async def test_one_bad_claim_is_an_error_for_that_claim_only(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        node.preparer.answers = {
            "good": PrepareResult(devices=(PreparedDevice(("gpus/small", "gpus/big"), NODE, "gpu-0",
                                                          ("k8s.gpu.nvidia.com/claim=good-gpu-0",)),)),
            "bad": PrepareResult(error="claim ns/bad not allocated"),
        }
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            answer = await node.kubelet(kubelet.prepare, DRIVER, [
                ("ns", "good", "good"), ("ns", "bad", "bad"), ("ns", "silent", "silent"), ("ns", "", "no-uid"),
                ("ns", "good", "good")])
    assert set(answer) == {"good", "bad", "silent", ""}
    # A subrequest counts as its request, once.
    assert answer["good"].devices == ((("gpus",), NODE, "gpu-0", ("k8s.gpu.nvidia.com/claim=good-gpu-0",), None),)
    assert answer["good"].error == ""
    assert answer["bad"] == type(answer["bad"])("claim ns/bad not allocated")
    assert "no answer" in answer["silent"].error
    assert "no UID" in answer[""].error
    # Each claim asked about once; the reference without a UID never reaches the preparer.
    assert node.preparer.calls == [("prepare", ("good", "bad", "silent"))]


async def test_a_preparer_that_fails_fails_each_claim_not_the_call(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        node.preparer.fail = RuntimeError("checkpoint unreadable")
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            answer = await node.kubelet(kubelet.prepare, DRIVER, [("ns", "a", "a"), ("ns", "b", "b")])
    assert {uid: r.error for uid, r in answer.items()} == {
        uid: "nvdp failed to prepare the claim: RuntimeError: checkpoint unreadable" for uid in ("a", "b")}


async def test_a_call_is_answered_within_its_deadline_even_when_the_preparer_hangs(short_dir: Path) -> None:
    async with dra_node(short_dir, deadline_s=0.3) as node:
        node.preparer.block = True
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            answer = await node.kubelet(kubelet.prepare, DRIVER, [("ns", "a", "a")])
    assert answer["a"].error == "prepare did not finish within 0.3 s; the kubelet will retry"
    assert node.plugin.calls.timed_out == 1 and node.plugin.calls.pending == 0


async def test_a_call_the_kubelet_gave_up_on_is_cancelled(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        node.preparer.block = True
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            with pytest.raises(grpc.RpcError) as caught:
                await node.kubelet(kubelet.prepare, DRIVER, [("ns", "a", "a")], timeout=0.2)
            with trio.fail_after(5):
                await node.preparer.cancelled.wait()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_calls_beyond_the_bound_are_answered_at_once_with_an_error(short_dir: Path) -> None:
    async with dra_node(short_dir, max_pending=1, deadline_s=1.0) as node:
        node.preparer.block = True
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            async with trio.open_nursery() as nursery:
                first: dict[str, Any] = {}

                async def hold() -> None:
                    first.update(await node.kubelet(kubelet.prepare, DRIVER, [("ns", "a", "a")]))

                nursery.start_soon(hold)
                with trio.fail_after(5):
                    await node.preparer.blocked.wait()
                second = await node.kubelet(kubelet.prepare, DRIVER, [("ns", "b", "b")])
    assert second["b"].error.startswith("nvdp is busy (1 prepare/unprepare calls running)")
    assert "did not finish within 1 s" in first["a"].error
    assert node.plugin.calls.refused == 1


async def test_more_claims_than_a_pod_can_have_are_refused_whole(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, registered)
            with pytest.raises(grpc.RpcError) as caught:
                await node.kubelet(kubelet.prepare, DRIVER, [("ns", f"u{i}", f"c{i}") for i in range(129)])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert node.preparer.calls == []


# -- health --------------------------------------------------------------------------------------------------------


def _health(kubelet: DraKubeletEmulator) -> dict[str, str]:
    return {device: seen.health for (_, device), seen in registered(kubelet).devices.items()}


async def test_the_health_stream_sends_every_device_and_an_xid_marks_the_gpu_and_its_mig_devices(
    short_dir: Path,
) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, lambda k: registered(k) and len(registered(k).devices) == 3)
            first = _health(kubelet)
            # XID 48 (double-bit ECC) on GPU 1, not attributed to one MIG instance.
            node.tracker.on_xid(XidEvent(GPU1, EVENT_XID_CRITICAL, 48), trio.current_time())
            node.feed.publish()
            await node.kubelet(kubelet.wait_for, lambda k: _health(k).get("gpu-1-mig-1g5gb-19-0") == "UNHEALTHY")
            after = _health(kubelet)
            seen = registered(kubelet).devices[(NODE, "gpu-1-mig-1g5gb-19-1")]
    assert first == dict.fromkeys(("gpu-0", "gpu-1-mig-1g5gb-19-0", "gpu-1-mig-1g5gb-19-1"), "HEALTHY")
    assert after == {"gpu-0": "HEALTHY", "gpu-1-mig-1g5gb-19-0": "UNHEALTHY", "gpu-1-mig-1g5gb-19-1": "UNHEALTHY"}
    assert "XID 48" in seen.message
    assert seen.last_updated_time > 0


async def test_a_mig_xid_marks_only_its_instance(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, lambda k: registered(k) and registered(k).devices)
            node.tracker.on_xid(XidEvent(GPU1, EVENT_XID_CRITICAL, 48, gi=2, ci=0), trio.current_time())
            node.feed.publish()
            await node.kubelet(kubelet.wait_for, lambda k: "UNHEALTHY" in _health(k).values())
            after = _health(kubelet)
    assert after == {"gpu-0": "HEALTHY", "gpu-1-mig-1g5gb-19-0": "HEALTHY", "gpu-1-mig-1g5gb-19-1": "UNHEALTHY"}


async def test_the_full_list_is_resent_without_a_change(short_dir: Path) -> None:
    async with dra_node(short_dir, resend_s=0.05) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            await node.kubelet(kubelet.wait_for, lambda k: registered(k) and registered(k).health_messages >= 4)
            devices = dict(registered(kubelet).devices)
    # Nothing changed, yet the kubelet keeps hearing about every device (its 30 s timeout never runs out).
    assert {name for _, name in devices} == {t.device_name for t in TARGETS}
    assert node.feed.snapshot.devices[0].health == 1


async def test_the_health_stream_ends_when_the_plugin_stops(short_dir: Path) -> None:
    async with dra_node(short_dir) as node:
        with DraKubeletEmulator(node.paths.registry_dir) as kubelet:
            plugin = await node.kubelet(kubelet.wait_for, lambda k: registered(k) and registered(k).devices
                                        and registered(k))
            node.scope.cancel()
            await node.kubelet(kubelet.wait_for, lambda k: plugin.stream_ended)
    assert plugin.devices == {}
