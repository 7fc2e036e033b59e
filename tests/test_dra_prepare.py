"""ClaimPreparer with in-memory fakes of the API, CDI, MPS and time slices, on the mock clock.

The checkpoint is a real file (written synchronously, so the mock clock still applies); the fakes record what was
done, in order, in one shared log, and read the checkpoint file when called, so "started before any side effect"
is checked where the side effect happens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from nvdp.core.dra import checkpoint as cp
from nvdp.core.dra.claims import ClaimPlan, DeviceEdits, NodeDevice, plan_claim
from nvdp.core.dra.types import ClaimRef, PreparedDevice, PrepareResult, UnprepareResult
from nvdp.dra.checkpoint_file import CheckpointFile
from nvdp.dra.prepare import ClaimFetchError, ClaimPreparer, MpsLimits, SideEffectError
from tests.dra_fixtures import DEVICES, DRIVER, GPU0, GPU2, MIG, MIG_NAME, NODE, claim, gpu_config, opaque, result

Log = list[tuple[str, ...]]


class FakeApi:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.unreachable = False
        self.hang = False

    def add(self, body: dict[str, Any]) -> ClaimRef:
        meta = body["metadata"]
        self.claims[(meta["namespace"], meta["name"])] = body
        return ClaimRef(meta["namespace"], meta["uid"], meta["name"])

    async def get(self, namespace: str, name: str) -> Mapping[str, object] | None:
        self.log.append(("get", name))
        if self.hang:
            await trio.sleep_forever()
        if self.unreachable:
            raise ClaimFetchError("connection refused")
        await trio.sleep(0.01)
        return self.claims.get((namespace, name))


class FakeCdi:
    def __init__(self, log: Log, checkpoint: Path) -> None:
        self.log = log
        self.checkpoint = checkpoint
        self.specs: dict[str, list[tuple[str, NodeDevice, DeviceEdits]]] = {}
        self.fail_write: BaseException | None = None
        self.fail_remove = False
        self.hang_write = False
        self.active = 0
        self.most_active = 0
        self.gate: trio.Event | None = None
        #: Set when `active` first reaches `watch_active`.
        self.watch_active = 0
        self.active_reached = trio.Event()

    async def write(self, claim_uid: str,
                    devices: Sequence[tuple[str, NodeDevice, DeviceEdits]]) -> Mapping[str, tuple[str, ...]]:
        self.log.append(("cdi-write", claim_uid, _state_on_disk(self.checkpoint, claim_uid)))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        if self.active == self.watch_active:
            self.active_reached.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.hang_write:
                await trio.sleep_forever()
            await trio.sleep(0.01)
            if self.fail_write is not None:
                raise self.fail_write
            self.specs[claim_uid] = list(devices)
            return {name: (f"k8s.gpu.nvidia.com/claim={claim_uid}-{name}",) for name, _, _ in devices}
        finally:
            self.active -= 1

    async def remove(self, claim_uid: str) -> None:
        self.log.append(("cdi-remove", claim_uid))
        if self.fail_remove:
            raise SideEffectError("read-only file system")
        self.specs.pop(claim_uid, None)

    async def list_claims(self) -> set[str]:
        return set(self.specs)


class FakeMps:
    def __init__(self, log: Log, checkpoint: Path) -> None:
        self.log = log
        self.checkpoint = checkpoint
        self.clients: dict[str, list[tuple[str, MpsLimits]]] = {}

    async def acquire(self, claim_uid: str, gpu_uuid: str, limits: MpsLimits) -> DeviceEdits:
        self.log.append(("mps-acquire", claim_uid, gpu_uuid, _state_on_disk(self.checkpoint, claim_uid)))
        self.clients.setdefault(claim_uid, []).append((gpu_uuid, limits))
        return DeviceEdits(env=(f"CUDA_MPS_PIPE_DIRECTORY=/mps/{gpu_uuid}",))

    async def release(self, claim_uid: str) -> None:
        self.log.append(("mps-release", claim_uid))
        self.clients.pop(claim_uid, None)

    async def restore(self, holdings: Sequence[tuple[str, str, MpsLimits]]) -> None:
        self.log.append(("mps-restore", *sorted({uid for uid, _, _ in holdings})))
        for claim_uid, gpu_uuid, limits in holdings:
            self.clients.setdefault(claim_uid, []).append((gpu_uuid, limits))


class FakeTimeSlicer:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.intervals: dict[str, int] = {}

    async def set_interval(self, gpu_uuid: str, interval: int) -> None:
        self.log.append(("timeslice", gpu_uuid, str(interval)))
        self.intervals[gpu_uuid] = interval


def _state_on_disk(path: Path, uid: str) -> str:
    state = CheckpointFile(path).load()
    entry = state.claims.get(uid) if state else None
    return entry.state if entry else "absent"


class Node:
    """A preparer and its fakes, sharing one log and one checkpoint file."""

    def __init__(self, tmp_path: Path, boot_id: str = "boot-1", **options: Any) -> None:
        self.path = tmp_path / "plugins" / DRIVER / "checkpoint.json"
        self.log: Log = []
        self.api = FakeApi(self.log)
        self.cdi = FakeCdi(self.log, self.path)
        self.mps = FakeMps(self.log, self.path)
        self.timeslicer = FakeTimeSlicer(self.log)
        self.options = options
        self.preparer = self.restart(boot_id)

    def restart(self, boot_id: str = "boot-1", **options: Any) -> ClaimPreparer:
        """A new preparer on the same file and fakes: nvdp restarted."""
        merged = {"timeslicer": self.timeslicer, **self.options, **options}
        self.preparer = ClaimPreparer(DRIVER, NODE, self.path, boot_id, self.api, self.cdi,
                                      merged.pop("mps", self.mps), DEVICES, **merged)
        return self.preparer

    def on_disk(self) -> cp.Checkpoint | None:
        return CheckpointFile(self.path).load()


def cdi_id(uid: str, device: str) -> str:
    return f"k8s.gpu.nvidia.com/claim={uid}-{device}"


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


async def test_a_whole_gpu_claim_is_prepared_with_started_before_side_effects(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0")]))
    answers = await node.preparer.prepare([ref])
    device = PreparedDevice(("gpu",), NODE, "gpu-0", (cdi_id("u1", "gpu-0"),))
    assert answers == {"u1": PrepareResult(devices=(device,))}
    assert node.log == [("get", "claim-u1"), ("cdi-write", "u1", "started")]
    on_disk = node.on_disk()
    assert on_disk is not None and on_disk.claims["u1"].state == "completed"
    assert [name for name, _, _ in node.cdi.specs["u1"]] == ["gpu-0"]


async def test_an_empty_request_is_an_empty_map(node: Node, autojump_clock: trio.testing.MockClock) -> None:
    assert await node.preparer.prepare([]) == {}
    assert await node.preparer.unprepare([]) == {}


async def test_prepare_of_a_completed_claim_answers_the_same_with_no_side_effect(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0"), result(MIG_NAME, request="mig")]))
    first = await node.preparer.prepare([ref])
    node.log.clear()
    assert await node.preparer.prepare([ref]) == first
    # After nvdp restarts too, and without the API (the claim is not even read).
    node.api.unreachable = True
    assert await node.restart().prepare([ref]) == first
    assert node.log == []


async def test_every_claim_gets_its_own_answer(node: Node, autojump_clock: trio.testing.MockClock) -> None:
    good = node.api.add(claim("u1", [result("gpu-0")]))
    replaced = node.api.add(claim("u2-new", [result("gpu-2")], name="claim-u2"))
    answers = await node.preparer.prepare([
        good, ClaimRef("default", "u2", "claim-u2"), ClaimRef("default", "u3", "gone"),
        node.api.add(claim("u4", [result("gpu-9")]))])
    assert set(answers) == {"u1", "u2", "u3", "u4"}
    assert answers["u1"].devices and not answers["u1"].error
    assert "got replaced" in answers["u2"].error and replaced.uid == "u2-new"
    assert answers["u3"].error == "claim default/gone not found in the API"
    assert "gpu-9 is not served" in answers["u4"].error
    node.api.unreachable = True
    answer = await node.preparer.prepare([node.api.add(claim("u5", [result("gpu-2")]))])
    assert answer["u5"].error == "claim default/claim-u5: cannot read it from the API: connection refused"


async def test_a_failed_side_effect_rolls_back_at_once(node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0")], [opaque(gpu_config("MPS"))]))
    node.cdi.fail_write = SideEffectError("disk full")
    [answer] = (await node.preparer.prepare([ref])).values()
    assert answer.error == "error preparing devices for claim default/claim-u1:u1: disk full"
    assert node.log[-2:] == [("mps-release", "u1"), ("cdi-remove", "u1")]
    assert node.on_disk() == cp.fresh("boot-1")
    node.cdi.fail_write = None
    assert not (await node.preparer.prepare([ref]))["u1"].error


async def test_a_crash_between_started_and_completed_is_rolled_back_before_the_retry(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0")], [opaque(gpu_config("MPS"))]))
    # The checkpoint a crash after the MPS acquire and a half-written spec leaves behind.
    plan = plan_claim(node.api.claims[("default", "claim-u1")], ref, DRIVER, NODE, DEVICES)
    assert isinstance(plan, ClaimPlan)
    CheckpointFile(node.path).save(cp.started(cp.fresh("boot-1"), plan))
    node.cdi.specs["u1"] = []
    preparer = node.restart()
    answer = await preparer.prepare([ref])
    assert answer["u1"].devices[0].cdi_device_ids == (cdi_id("u1", "gpu-0"),)
    assert [e[:2] for e in node.log] == [("get", "claim-u1"), ("mps-release", "u1"), ("cdi-remove", "u1"),
                                         ("mps-acquire", "u1"), ("cdi-write", "u1")]


async def test_a_failed_rollback_leaves_started_for_the_next_try(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0")]))
    node.cdi.fail_write = SideEffectError("disk full")
    node.cdi.fail_remove = True
    assert "disk full" in (await node.preparer.prepare([ref]))["u1"].error
    on_disk = node.on_disk()
    assert on_disk is not None and on_disk.claims["u1"].state == "started"
    # The retry rolls back first; while that fails, nothing new is done.
    node.cdi.fail_write = None
    node.log.clear()
    error = (await node.preparer.prepare([ref]))["u1"].error
    assert "rolling back an earlier attempt failed: read-only file system" in error
    assert ("cdi-write", "u1", "started") not in node.log
    node.cdi.fail_remove = False
    assert not (await node.preparer.prepare([ref]))["u1"].error
    # Unprepare of a started claim also rolls it back.
    node.cdi.fail_write = SideEffectError("disk full")
    node.cdi.fail_remove = True
    ref2 = node.api.add(claim("u2", [result("gpu-2")]))
    await node.preparer.prepare([ref2])
    node.cdi.fail_remove = False
    assert await node.preparer.unprepare([ref2]) == {"u2": UnprepareResult()}
    assert "u2" not in node.preparer.checkpoint.claims


async def test_unprepare_tears_down_and_forgets_and_unknown_claims_succeed(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ts = opaque(gpu_config("TimeSlicing", timeSlicingConfig={"interval": "Long"}), requests=["ts"])
    ref = node.api.add(claim("u1", [result("gpu-0", request="ts"), result("gpu-2", request="mps")],
                             [ts, opaque(gpu_config("MPS"), requests=["mps"])]))
    assert not (await node.preparer.prepare([ref]))["u1"].error
    assert node.timeslicer.intervals == {GPU0.uuid: 3}
    node.log.clear()
    answers = await node.preparer.unprepare([ref, ClaimRef("default", "never", "seen")])
    assert answers == {"u1": UnprepareResult(), "never": UnprepareResult()}
    assert node.log == [("mps-release", "u1"), ("cdi-remove", "u1"), ("timeslice", GPU0.uuid, "0")]
    assert node.cdi.specs == {} and node.mps.clients == {}
    on_disk = node.on_disk()
    assert on_disk is not None and on_disk.claims == {}
    node.cdi.fail_remove = True
    await node.preparer.prepare([ref])
    assert "read-only file system" in (await node.preparer.unprepare([ref]))["u1"].error
    assert "u1" in node.preparer.checkpoint.claims


async def test_mps_is_acquired_per_device_and_its_edits_reach_the_cdi_spec(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    config = gpu_config("MPS", mpsConfig={"defaultActiveThreadPercentage": 25,
                                          "defaultPinnedDeviceMemoryLimit": "4Gi"})
    ref = node.api.add(claim("u1", [result("gpu-0"), result(MIG_NAME, request="mig")],
                             [opaque(config), opaque({**config, "kind": "MigDeviceConfig"})]))
    assert not (await node.preparer.prepare([ref]))["u1"].error
    assert node.mps.clients["u1"] == [(GPU0.uuid, MpsLimits(GPU0.uuid, 25, 4096)),
                                      (DEVICES[MIG_NAME].gpu.uuid, MpsLimits(MIG.uuid, 25, 4096))]
    assert [e[3] for e in node.log if e[0] == "mps-acquire"] == ["started", "started"]
    edits = {name: e for name, _, e in node.cdi.specs["u1"]}
    assert edits["gpu-0"].env == (f"CUDA_MPS_PIPE_DIRECTORY=/mps/{GPU0.uuid}",)


async def test_what_cannot_be_applied_is_a_claim_error_that_says_why(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    node = Node(tmp_path, mps=None, timeslicer=None)
    mps = node.api.add(claim("u1", [result("gpu-0")], [opaque(gpu_config("MPS"))]))
    long = node.api.add(claim("u2", [result("gpu-2")], [opaque(gpu_config(
        "TimeSlicing", timeSlicingConfig={"interval": "Long"}))]))
    default = node.api.add(claim("u3", [result(MIG_NAME)], [opaque({**gpu_config("TimeSlicing"),
                                                                    "kind": "MigDeviceConfig"})]))
    answers = await node.preparer.prepare([mps, long, default])
    assert "MPS is not available on this node" in answers["u1"].error
    assert "time-slice interval Long cannot be set on this node" in answers["u2"].error
    assert not answers["u3"].error
    node2 = Node(tmp_path / "other", timeslicer=None)
    ref = node2.api.add(claim("u4", [result("gpu-0")], [opaque(gpu_config("TimeSlicing"))]))
    assert not (await node2.preparer.prepare([ref]))["u4"].error


async def test_a_device_held_by_a_completed_claim_is_refused_unless_shared(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    first = node.api.add(claim("u1", [result("gpu-0")]))
    second = node.api.add(claim("u2", [result("gpu-0")]))
    assert not (await node.preparer.prepare([first]))["u1"].error
    error = (await node.preparer.prepare([second]))["u2"].error
    assert error == "unable to prepare claim default/claim-u2: requested device gpu-0 is already allocated to " \
                    "different claim u1"
    assert "u2" not in node.preparer.checkpoint.claims
    shared = [opaque(gpu_config("TimeSlicing"))]
    a = node.api.add(claim("u3", [result("gpu-2")], shared))
    b = node.api.add(claim("u4", [result("gpu-2")], shared))
    answers = await node.preparer.prepare([a, b])
    assert not answers["u3"].error and not answers["u4"].error


async def test_two_claims_racing_for_one_device_do_not_both_get_it(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    answers = await node.preparer.prepare([node.api.add(claim("u1", [result("gpu-0")])),
                                           node.api.add(claim("u2", [result("gpu-0")]))])
    assert sorted(bool(a.error) for a in answers.values()) == [False, True]
    assert "is being prepared for different claim" in (answers["u1"].error or answers["u2"].error)


async def test_claims_of_one_request_are_prepared_concurrently_within_the_bound(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    node = Node(tmp_path, concurrency=3)
    shared = [opaque(gpu_config("MPS"))]
    refs = [node.api.add(claim(f"u{i}", [result("gpu-0")], shared)) for i in range(10)]
    node.cdi.gate = trio.Event()
    node.cdi.watch_active = 3
    async with trio.open_nursery() as nursery:
        results: dict[str, PrepareResult] = {}

        async def run() -> None:
            results.update(await node.preparer.prepare(refs))

        nursery.start_soon(run)
        with trio.fail_after(5):
            await node.cdi.active_reached.wait()
        await trio.sleep(1)  # the others wait for a place, however long the first three take
        assert node.cdi.active == 3 and not results
        node.cdi.gate.set()
    assert node.cdi.most_active == 3
    assert len(results) == 10 and not any(r.error for r in results.values())


async def test_the_same_claim_in_two_calls_is_prepared_once(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0")]))
    answers: list[dict[str, PrepareResult]] = []
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(lambda: _append(answers, node.preparer.prepare([ref, ref])))
    assert answers[0] == answers[1] and not answers[0]["u1"].error
    assert [e[0] for e in node.log].count("cdi-write") == 1


async def _append(answers: list[dict[str, PrepareResult]], call: Any) -> None:
    answers.append(await call)


async def test_a_claim_not_done_by_the_deadline_is_an_error_and_rolled_back(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    slow = node.api.add(claim("u1", [result("gpu-0")]))
    start = trio.current_time()
    node.cdi.hang_write = True
    answers = await node.preparer.prepare([slow])
    assert trio.current_time() - start == pytest.approx(30.0)
    assert "did not finish within 30 s" in answers["u1"].error
    assert node.log[-1] == ("cdi-remove", "u1")
    assert node.on_disk() == cp.fresh("boot-1")
    node.api.hang = True
    answers = await node.preparer.prepare([node.api.add(claim("u2", [result("gpu-2")]))])
    assert "did not finish within 30 s" in answers["u2"].error


async def test_a_bug_in_one_claim_is_that_claims_error(node: Node, autojump_clock: trio.testing.MockClock) -> None:
    broken = node.api.add(claim("u1", [result("gpu-0")]))
    fine = node.api.add(claim("u2", [result("gpu-2")]))
    node.cdi.fail_write = KeyError("bug")
    answers = await node.preparer.prepare([broken])
    assert answers["u1"].error.startswith("internal error in nvdp for claim default/claim-u1")
    assert node.preparer.checkpoint.claims == {}
    node.cdi.fail_write = None
    assert not (await node.preparer.prepare([fine]))["u2"].error


async def test_recover_discards_another_boots_checkpoint_and_its_specs(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0")]))
    await node.preparer.prepare([ref])
    preparer = node.restart(boot_id="boot-2")
    await preparer.recover()
    assert node.on_disk() == cp.fresh("boot-2")
    assert node.cdi.specs == {}
    # The kubelet asks again after the reboot: prepared afresh.
    node.log.clear()
    assert not (await preparer.prepare([ref]))["u1"].error
    assert ("cdi-write", "u1", "started") in node.log


async def test_recover_removes_orphaned_specs_and_restores_completed_claims(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-0")], [opaque(gpu_config("MPS"))]))
    await node.preparer.prepare([ref])
    kept = node.api.add(claim("u2", [result("gpu-2")]))
    await node.preparer.prepare([kept])
    node.cdi.specs["orphan"] = []
    del node.cdi.specs["u1"]  # a tmpfs /var/run/cdi lost it
    node.mps.clients.clear()
    node.log.clear()
    await node.restart().recover()
    assert set(node.cdi.specs) == {"u1", "u2"}
    assert [name for name, _, _ in node.cdi.specs["u1"]] == ["gpu-0"]
    assert node.cdi.specs["u1"][0][2].env == (f"CUDA_MPS_PIPE_DIRECTORY=/mps/{GPU0.uuid}",)
    assert ("cdi-remove", "orphan") in node.log
    assert node.mps.clients == {"u1": [(GPU0.uuid, MpsLimits(GPU0.uuid))]}


async def test_recover_rolls_back_started_claims_that_are_gone_or_replaced(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    state = cp.fresh("boot-1")
    refs = {uid: ClaimRef("default", uid, f"claim-{uid}") for uid in ("gone", "replaced", "alive", "unknowable")}
    bodies = {uid: claim(uid, [result(device)]) for uid, device in
              zip(refs, ["gpu-0", "gpu-2", MIG_NAME, "gpu-0"], strict=True)}
    for uid, ref in refs.items():
        plan = plan_claim(bodies[uid], ref, DRIVER, NODE, DEVICES)
        assert isinstance(plan, ClaimPlan)
        state = cp.started(state, plan)
        node.cdi.specs[uid] = []
    CheckpointFile(node.path).save(state)
    node.api.add(claim("replaced-new", [result("gpu-2")], name="claim-replaced"))
    node.api.add(bodies["alive"])
    api_get = node.api.get

    async def get(namespace: str, name: str) -> Mapping[str, object] | None:
        if name == "claim-unknowable":
            raise ClaimFetchError("503")
        return await api_get(namespace, name)

    node.api.get = get  # type: ignore[method-assign]
    preparer = node.restart()
    await preparer.recover()
    assert set(preparer.checkpoint.claims) == {"alive", "unknowable"}
    assert set(node.cdi.specs) == {"alive", "unknowable"}


async def test_update_devices_changes_what_later_prepares_accept(
        node: Node, autojump_clock: trio.testing.MockClock) -> None:
    ref = node.api.add(claim("u1", [result("gpu-2")]))
    node.preparer.update_devices({"gpu-0": DEVICES["gpu-0"]})
    assert "gpu-2 is not served" in (await node.preparer.prepare([ref]))["u1"].error
    node.preparer.update_devices({"gpu-2": NodeDevice(GPU2)})
    assert not (await node.preparer.prepare([ref]))["u1"].error
    assert "completed=1" in repr(node.preparer)


def test_the_checkpoint_records_what_the_answer_was(tmp_path: Path) -> None:
    # The completed entry alone reproduces the answer: nothing else is needed after a restart.
    async def main() -> None:
        node = Node(tmp_path)
        ref = node.api.add(claim("u1", [result("gpu-0", request="gpu/a", shareID="s1")]))
        answer = (await node.preparer.prepare([ref]))["u1"]
        on_disk = node.on_disk()
        assert on_disk is not None
        assert cp.prepared_devices(on_disk.claims["u1"]) == answer.devices
        assert answer.devices[0].request_names == ("gpu",) and answer.devices[0].share_id == "s1"
        assert msgspec.json.decode(node.path.read_bytes())["claims"]["u1"]["devices"][0]["cdiDeviceIds"] == [
            cdi_id("u1", "gpu-0")]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
