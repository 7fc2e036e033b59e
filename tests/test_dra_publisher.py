"""The ResourceSlice publisher against the fake API server (real TLS, real HTTP, resource.k8s.io/v1).

No threads: trio's MockClock with autojump, as the other watch tests, so settling delays, backoffs and relists cost
no real time."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from nvdp.core.dra.devices import HealthFact, build_devices
from nvdp.core.dra.slices import INDEX_LABEL
from nvdp.dra.publisher import PublisherOptions, SlicePublisher
from nvdp.k8s.client import ApiClient, ApiConfig, ApiError, open_client
from nvdp.k8s.resourceslices import (
    RESOURCESLICES_PATH,
    SliceWriteError,
    create_slice,
    delete_slice,
    update_slice,
)
from nvdp.k8s.watch import WatchOptions
from tests.fake_apiserver import FakeApiServer, open_fake_apiserver
from tests.test_dra_slices import fake_devices, two_gpu_node

DRIVER = "gpu.nvidia.com"
FAST = PublisherOptions(settle_s=0.1, backoff_initial_s=0.05, backoff_max_s=0.2,
                        watch=WatchOptions(backoff_initial_s=0.02, backoff_max_s=0.1, min_stream_s=0.05))


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[int, int, int]] = []
        self.writes: list[tuple[str, bool]] = []

    def slices_published(self, driver: str, generation: int, slices: int, devices: int) -> None:
        self.published.append((generation, slices, devices))

    def slice_write(self, driver: str, operation: str, ok: bool) -> None:
        self.writes.append((operation, ok))


@contextlib.asynccontextmanager
async def publishing(fake: FakeApiServer, node: str = "node-1", options: PublisherOptions = FAST,
                     ) -> AsyncIterator[tuple[SlicePublisher, Recorder, ApiClient]]:
    recorder = Recorder()
    async with open_client(fake.api_config(token="token-1")) as client, trio.open_nursery() as nursery:
        publisher = SlicePublisher(client, node, DRIVER, options=options, observer=recorder)
        await nursery.start(publisher.run)
        yield publisher, recorder, client
        nursery.cancel_scope.cancel()


def pool_of(fake: FakeApiServer, node: str = "node-1") -> list[dict[str, Any]]:
    return sorted(fake.resourceslices(node), key=lambda s: int(s["metadata"]["labels"][INDEX_LABEL]))


def devices_of(slices: list[dict[str, Any]]) -> list[str]:
    return [d["name"] for s in slices for d in s["spec"]["devices"]]


async def test_initial_publish_of_a_two_gpu_node(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        fake.set_node("node-2")
        async with publishing(fake) as (publisher, recorder, _):
            publisher.set_devices([d.api for d in build_devices(two_gpu_node(), {"GPU-0000", "GPU-0001"}).devices])
            assert await publisher.wait_synced() == 1
            slices = pool_of(fake)
            assert len(slices) == 1
            spec = slices[0]["spec"]
            assert spec["pool"] == {"name": "node-1", "generation": 1, "resourceSliceCount": 1}
            assert spec["nodeName"] == "node-1" and spec["driver"] == DRIVER
            assert devices_of(slices) == ["gpu-0", "gpu-1"]
            meta = slices[0]["metadata"]
            assert meta["name"].startswith("00000-gpu.nvidia.com-node-1-")
            assert meta["ownerReferences"][0]["uid"] == "uid-node-1"
            assert recorder.published == [(1, 1, 2)]
        # The watch was narrowed to this node and driver and to nvdp's own slices.
        watches = [r for r in fake.requests if r.kind in ("list", "watch") and r.path == RESOURCESLICES_PATH]
        assert watches and all(r.query["fieldSelector"] == "spec.nodeName=node-1,spec.driver=gpu.nvidia.com"
                               and r.query["labelSelector"] == "app.kubernetes.io/managed-by=nvdp"
                               for r in watches)


async def test_nothing_is_written_before_set_devices(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake):
            await fake.wait_watching()
            await trio.sleep(5)
            assert fake.dra_writes() == []


async def test_set_devices_updates_in_place_and_bumps_the_generation(
        autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake) as (publisher, recorder, _):
            publisher.set_devices([d.api for d in build_devices(two_gpu_node(), {"GPU-0000", "GPU-0001"}).devices])
            await publisher.wait_synced()
            name = pool_of(fake)[0]["metadata"]["name"]
            facts = [HealthFact("GPU-0001", xid=48)]
            tainted = build_devices(two_gpu_node(), {"GPU-0000", "GPU-0001"}, facts=facts)
            publisher.set_devices([d.api for d in tainted.devices])
            assert await publisher.wait_synced() == 2
            slices = pool_of(fake)
            assert [s["metadata"]["name"] for s in slices] == [name]
            assert slices[0]["spec"]["pool"]["generation"] == 2
            taints = slices[0]["spec"]["devices"][1]["taints"]
            assert taints[0]["key"] == "gpu.nvidia.com/xid" and taints[0]["value"] == "48"
            # Recovery removes the taint, under generation 3. The server-set timeAdded caused no extra write.
            publisher.set_devices([d.api for d in build_devices(two_gpu_node(), {"GPU-0000", "GPU-0001"}).devices])
            assert await publisher.wait_synced() == 3
            assert "taints" not in pool_of(fake)[0]["spec"]["devices"][1]
            assert [r.kind for r in fake.dra_writes()] == ["create", "update", "update"]
            # Setting the same devices again changes nothing.
            publisher.set_devices([d.api for d in build_devices(two_gpu_node(), {"GPU-0000", "GPU-0001"}).devices])
            await trio.sleep(5)
            assert len(fake.dra_writes()) == 3
            assert [g for g, _, _ in recorder.published] == [1, 2, 3]


async def test_a_restarted_publisher_finds_the_pool_in_sync_and_writes_nothing(
        autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        devices = fake_devices(200)
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(devices)
            assert await publisher.wait_synced() == 1
        writes = len(fake.dra_writes())
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(devices)
            assert await publisher.wait_synced() == 1
            assert len(fake.dra_writes()) == writes


async def test_300_devices_split_and_shrink(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(300))
            assert await publisher.wait_synced() == 1
            slices = pool_of(fake)
            assert [len(s["spec"]["devices"]) for s in slices] == [128, 128, 44]
            assert {s["spec"]["pool"]["resourceSliceCount"] for s in slices} == {3}
            assert devices_of(slices) == [f"gpu-{i}" for i in range(300)]
            publisher.set_devices(fake_devices(100))
            assert await publisher.wait_synced() == 2
            slices = pool_of(fake)
            assert [len(s["spec"]["devices"]) for s in slices] == [100]
            assert slices[0]["spec"]["pool"] == {"name": "node-1", "generation": 2, "resourceSliceCount": 1}
            # Obsolete slices were deleted before the surviving one was rewritten.
            kinds = [r.kind for r in fake.dra_writes()][3:]
            assert kinds == ["delete", "delete", "update"]


async def test_wiped_slices_come_back_under_a_new_generation(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(300))
            assert await publisher.wait_synced() == 1
            assert fake.wipe_resourceslices("node-1") == 3
            with trio.fail_after(30):
                await fake.wait_for(lambda: len(pool_of(fake)) == 3)
            await trio.sleep(2)
            slices = pool_of(fake)
            assert {s["spec"]["pool"]["generation"] for s in slices} == {2}
            assert devices_of(slices) == [f"gpu-{i}" for i in range(300)]
            # One pass re-created the pool: three creates after the first three, nothing more.
            assert [r.kind for r in fake.dra_writes()] == ["create"] * 6


async def test_a_slice_edited_by_someone_else_is_put_back(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(2))
            await publisher.wait_synced()
            edited = pool_of(fake)[0]
            edited["spec"]["devices"] = edited["spec"]["devices"][:1]
            fake.put_resourceslice(edited)
            with trio.fail_after(30):
                await fake.wait_for(lambda: devices_of(pool_of(fake)) == ["gpu-0", "gpu-1"])
            assert pool_of(fake)[0]["spec"]["pool"]["generation"] == 2


async def test_relist_after_410_and_a_wipe_meanwhile(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(2))
            await publisher.wait_synced()
            lists = fake.count("list", RESOURCESLICES_PATH)
            await fake.wait_watching()
            fake.expire()
            fake.wipe_resourceslices("node-1")
            with trio.fail_after(30):
                await fake.wait_for(lambda: len(pool_of(fake)) == 1)
            assert fake.count("list", RESOURCESLICES_PATH) > lists


async def test_conflict_on_update_is_read_again_and_retried(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        # The watch is kept from seeing changes, so the publisher updates from a stale resourceVersion.
        async with publishing(fake) as (publisher, recorder, _):
            publisher.set_devices(fake_devices(2))
            await publisher.wait_synced()
            fake.stalled = True
            other = pool_of(fake)[0]
            other["metadata"]["labels"]["someone"] = "else"
            fake.put_resourceslice(other)
            publisher.set_devices(fake_devices(3))
            with trio.fail_after(30):
                await fake.wait_for(lambda: devices_of(pool_of(fake)) == ["gpu-0", "gpu-1", "gpu-2"])
            statuses = [(r.kind, r.status) for r in fake.dra_writes()]
            assert ("update", 409) in statuses
            assert statuses[-1] == ("update", 200)
            assert ("update", False) in recorder.writes
            assert sum(1 for r in fake.requests if r.kind == "get" and r.path.startswith(RESOURCESLICES_PATH)) >= 1
            fake.stalled = False


async def test_write_errors_back_off(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        fake.fail_next("create", 500, count=4)
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(1))
            start = trio.current_time()
            await publisher.wait_synced()
            # 0.05, 0.1, 0.2, 0.2 s (halved at worst by jitter) between the five tries.
            assert trio.current_time() - start >= 0.05 / 2 + 0.1 / 2 + 0.2 / 2 + 0.2 / 2
            assert [r.status for r in fake.dra_writes()] == [500, 500, 500, 500, 201]


async def test_withdraw_on_stop_deletes_the_pool(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(300))
            await publisher.wait_synced()
        assert len(pool_of(fake)) == 3  # by default the slices outlive the publisher
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(300))
            await publisher.wait_synced()
            publisher.withdraw_on_stop()
        assert pool_of(fake) == []


async def test_write_errors_are_precise(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        fake.slice_writer_node = "node-2"
        async with open_client(fake.api_config(token="token-1")) as client:
            body = {"metadata": {"generateName": "x-"}, "spec": {
                "driver": DRIVER, "nodeName": "node-1", "pool": {"name": "node-1", "generation": 1,
                                                                 "resourceSliceCount": 1}, "devices": []}}
            with pytest.raises(SliceWriteError) as refused:
                await create_slice(client, body)
            assert refused.value.status == 403
            assert "own ResourceSlices" in str(refused.value) and "admission policy" in str(refused.value)
            fake.slice_writer_node = None
            created = await create_slice(client, body)
            assert created.metadata.name.startswith("x-") and created.metadata.uid
            body["metadata"] = {"name": created.metadata.name, "resourceVersion": "1"}
            with pytest.raises(SliceWriteError) as stale:
                await update_slice(client, created.metadata.name, body)
            assert stale.value.conflict and "read again" in str(stale.value)
            assert not await delete_slice(client, "missing")
            with pytest.raises(SliceWriteError) as precondition:
                await delete_slice(client, created.metadata.name, uid="other-uid")
            assert precondition.value.conflict
            assert await delete_slice(client, created.metadata.name, uid=created.metadata.uid)


async def test_a_fight_with_another_writer_backs_off(autojump_clock: trio.testing.MockClock, caplog) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(2))
            await publisher.wait_synced()
            gaps = []
            for _ in range(6):
                edited = pool_of(fake)[0]
                edited["spec"]["devices"] = []
                fake.put_resourceslice(edited)
                start = trio.current_time()
                with trio.fail_after(60):
                    await fake.wait_for(lambda: len(devices_of(pool_of(fake))) == 2)
                gaps.append(trio.current_time() - start)
            # The first rewrites come after the settling delay only; once it looks like a fight, with backoff.
            assert max(gaps[:2]) < 0.5
            assert gaps[-1] > gaps[0]
            assert "another writer" in caplog.text


async def test_the_watch_sees_only_nvdps_slices_of_its_node_and_driver(
        autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_node("node-1")
        foreign = {"metadata": {"name": "other-driver", "labels": {"app.kubernetes.io/managed-by": "nvdp"}},
                   "spec": {"driver": "other.example.com", "nodeName": "node-1",
                            "pool": {"name": "node-1", "generation": 1, "resourceSliceCount": 1}, "devices": []}}
        fake.put_resourceslice(foreign)
        fake.put_resourceslice({**foreign, "metadata": {"name": "unlabelled"},
                                "spec": {**foreign["spec"], "driver": DRIVER}})
        fake.put_resourceslice({**foreign, "metadata": {"name": "node-2-slice", "labels": foreign["metadata"][
            "labels"]}, "spec": {**foreign["spec"], "driver": DRIVER, "nodeName": "node-2"}})
        async with publishing(fake) as (publisher, _, _):
            publisher.set_devices(fake_devices(1))
            await publisher.wait_synced()
            # Nothing but its own slice was touched: the others are not nvdp's to delete.
            assert [r.kind for r in fake.dra_writes()] == ["create"]
            assert {s["metadata"]["name"] for s in fake.resourceslices()} >= {"other-driver", "unlabelled",
                                                                                "node-2-slice"}


async def test_claims_and_device_classes_are_served(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_apiserver() as fake:
        fake.set_resourceclaim({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                                "metadata": {"name": "c1", "namespace": "ns1"}, "spec": {}})
        fake.set_deviceclass({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
                              "metadata": {"name": "gpu.nvidia.com"}, "spec": {}})
        async with open_client(fake.api_config(token="token-1")) as client:
            claim = await client.get_json("/apis/resource.k8s.io/v1/namespaces/ns1/resourceclaims/c1")
            assert b'"uid"' in claim and b'"c1"' in claim
            with pytest.raises(ApiError) as info:
                await client.get_json("/apis/resource.k8s.io/v1/namespaces/ns2/resourceclaims/c1")
            assert info.value.status == 404
            listing = await client.get_json("/apis/resource.k8s.io/v1/deviceclasses")
            assert b"gpu.nvidia.com" in listing
            assert b"gpu.nvidia.com" in await client.get_json("/apis/resource.k8s.io/v1/deviceclasses/gpu.nvidia.com")


async def test_a_node_name_no_pool_can_carry_is_refused_at_once() -> None:
    async with open_client(ApiConfig(server="https://127.0.0.1:1", source="test")) as client:
        with pytest.raises(ValueError, match="node name"):
            SlicePublisher(client, "Node_1", DRIVER)
        with pytest.raises(ValueError, match="driver name"):
            SlicePublisher(client, "node-1", "bad driver")


def test_pcie_roots_from_sysfs(tmp_path) -> None:
    from nvdp.dra.sysfs import pcie_roots

    device = tmp_path / "devices" / "pci0000:40" / "0000:40:01.0" / "0000:47:00.0"
    device.mkdir(parents=True)
    links = tmp_path / "bus" / "pci" / "devices"
    links.mkdir(parents=True)
    (links / "0000:47:00.0").symlink_to(device)
    (links / "0000:99:00.0").symlink_to(tmp_path / "elsewhere")  # dangling
    assert pcie_roots(["0000:47:00.0", "0000:99:00.0", "0000:07:00.0"], tmp_path) == {"0000:47:00.0": "pci0000:40"}
