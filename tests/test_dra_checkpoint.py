"""nvdp's DRA checkpoint: pure transitions, the sharing rule between claims, and the file (atomic, never crashes)."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from nvdp.core.dra import checkpoint as cp
from nvdp.core.dra.claims import ClaimPlan, DeviceEdits, Mount, plan_claim
from nvdp.core.dra.types import ClaimRef, PreparedDevice
from nvdp.dra.checkpoint_file import CheckpointFile, CheckpointWriteError
from tests.dra_fixtures import DEVICES, DRIVER, GPU0, NODE, claim, gpu_config, opaque, result


def planned(uid: str, devices: list[str], config: list[dict[str, object]] | None = None,
            **extra: object) -> ClaimPlan:
    ref = ClaimRef("default", uid, f"claim-{uid}")
    plan = plan_claim(claim(uid, [result(d, **extra) for d in devices], config), ref, DRIVER, NODE, DEVICES)
    assert isinstance(plan, ClaimPlan), plan
    return plan


def complete(state: cp.Checkpoint, plan: ClaimPlan) -> cp.Checkpoint:
    state = cp.started(state, plan)
    records = tuple(msgspec.structs.replace(cp.planned_record(d), cdi_device_ids=(f"k8s.gpu.nvidia.com/claim="
                                                                                  f"{plan.ref.uid}-{d.device}",))
                    for d in plan.devices)
    return cp.completed(state, plan.ref.uid, records)


def test_started_then_completed_then_removed() -> None:
    plan = planned("u1", ["gpu-0"])
    state = cp.started(cp.fresh("boot-1"), plan)
    entry = state.claims["u1"]
    assert (entry.namespace, entry.name, entry.state) == ("default", "claim-u1", "started")
    assert [(d.device, d.uuid, d.cdi_device_ids) for d in entry.devices] == [("gpu-0", GPU0.uuid, ())]
    state = complete(cp.fresh("boot-1"), plan)
    assert cp.prepared_devices(state.claims["u1"]) == (PreparedDevice(
        request_names=("gpu",), pool_name=NODE, device_name="gpu-0",
        cdi_device_ids=("k8s.gpu.nvidia.com/claim=u1-gpu-0",)),)
    assert cp.removed(state, "u1").claims == {}
    assert cp.removed(state, "unknown") is state


def test_transitions_leave_the_old_checkpoint_alone() -> None:
    before = cp.fresh("boot-1")
    after = cp.started(before, planned("u1", ["gpu-0"]))
    assert before.claims == {} and set(after.claims) == {"u1"}


def test_another_boots_checkpoint_is_discarded() -> None:
    state = complete(cp.fresh("boot-1"), planned("u1", ["gpu-0"]))
    assert cp.for_boot(state, "boot-1") == (state, False)
    again, discarded = cp.for_boot(state, "boot-2")
    assert discarded and again == cp.fresh("boot-2")


def test_a_checkpoint_without_boot_id_is_kept_and_takes_this_one() -> None:
    state = msgspec.structs.replace(complete(cp.fresh(""), planned("u1", ["gpu-0"])))
    kept, discarded = cp.for_boot(state, "boot-7")
    assert not discarded and kept.boot_id == "boot-7" and set(kept.claims) == {"u1"}


def test_encode_decode_round_trip_and_versions() -> None:
    edits = DeviceEdits(env=("CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps",),
                        mounts=(Mount(host_path="/run/nvdp/mps/x/pipe", container_path="/tmp/nvidia-mps",
                                      options=("rw", "bind")),))
    state = complete(cp.fresh("boot-1"), planned("u1", ["gpu-0"]))
    entry = state.claims["u1"]
    state = cp.completed(state, "u1", tuple(msgspec.structs.replace(d, edits=edits) for d in entry.devices))
    assert cp.decode(cp.encode(state)) == state
    assert b'"bootId":"boot-1"' in cp.encode(state) and b'"state":"completed"' in cp.encode(state)
    with pytest.raises(cp.CheckpointFormatError, match="version 2"):
        cp.decode(cp.encode(state).replace(b'"version":1', b'"version":2'))
    with pytest.raises(cp.CheckpointFormatError):
        cp.decode(b'{"version": 1, "claims": {"u1": {"state": "half"}}}')
    # Keys a newer nvdp adds are ignored.
    assert cp.decode(b'{"version": 1, "bootId": "b", "later": true}') == cp.fresh("b")


TIME_SLICED = [opaque(gpu_config("TimeSlicing"))]
LONG = [opaque(gpu_config("TimeSlicing", timeSlicingConfig={"interval": "Long"}))]
MPS = [opaque(gpu_config("MPS"))]


@pytest.mark.parametrize(("held", "wanted", "allowed"), [
    pytest.param({}, {}, False, id="exclusive-exclusive"),
    pytest.param({"config": TIME_SLICED}, {}, False, id="time-sliced-then-exclusive"),
    pytest.param({}, {"config": TIME_SLICED}, False, id="exclusive-then-time-sliced"),
    pytest.param({"config": TIME_SLICED}, {"config": TIME_SLICED}, True, id="time-sliced-alike"),
    pytest.param({"config": TIME_SLICED}, {"config": LONG}, False, id="time-slice-intervals-differ"),
    pytest.param({"config": MPS}, {"config": MPS}, True, id="mps-mps"),
    pytest.param({"config": MPS}, {"config": TIME_SLICED}, False, id="mps-then-time-sliced"),
    pytest.param({"adminAccess": True}, {}, True, id="admin-access-held"),
    pytest.param({}, {"adminAccess": True}, True, id="admin-access-wanted"),
    pytest.param({"shareID": "a"}, {"shareID": "b"}, True, id="consumable-shares-alike"),
    pytest.param({"shareID": "a", "config": TIME_SLICED}, {"shareID": "b"}, False, id="consumable-shares-differ"),
    pytest.param({"shareID": "a"}, {}, False, id="one-share-one-whole"),
])
def test_a_held_device_is_shared_only_when_the_rules_allow(held: dict[str, object], wanted: dict[str, object],
                                                           allowed: bool) -> None:
    held_config = held.pop("config", None)
    wanted_config = wanted.pop("config", None)
    state = complete(cp.fresh("b"), planned("u1", ["gpu-0"], held_config, **held))  # type: ignore[arg-type]
    why = cp.conflict(state, planned("u2", ["gpu-0", "gpu-2"], wanted_config, **wanted))  # type: ignore[arg-type]
    assert (why is None) == allowed
    if not allowed:
        assert why == "requested device gpu-0 is already allocated to different claim u1"


def test_only_completed_or_in_flight_claims_hold_devices() -> None:
    stale = cp.started(cp.fresh("b"), planned("u1", ["gpu-0"]))
    assert cp.conflict(stale, planned("u2", ["gpu-0"])) is None
    in_flight = {"u3": tuple(cp.planned_record(d) for d in planned("u3", ["gpu-0"]).devices)}
    assert cp.conflict(stale, planned("u2", ["gpu-0"]), in_flight) == (
        "requested device gpu-0 is being prepared for different claim u3")
    # A claim never conflicts with itself.
    assert cp.conflict(complete(cp.fresh("b"), planned("u2", ["gpu-0"])), planned("u2", ["gpu-0"])) is None


def test_time_slices_are_reset_only_when_nobody_else_relies_on_them() -> None:
    state = complete(cp.fresh("b"), planned("u1", ["gpu-0", "gpu-2"], TIME_SLICED))
    state = complete(state, planned("u2", ["gpu-0"], TIME_SLICED))
    assert cp.timeslice_resets(state, "u1") == (DEVICES["gpu-2"].gpu.uuid,)
    assert cp.timeslice_resets(cp.removed(state, "u1"), "u2") == (GPU0.uuid,)
    assert cp.timeslice_resets(state, "unknown") == ()


# -- the file -------------------------------------------------------------------------------------------------


def test_the_file_round_trips_and_leaves_no_temporary(tmp_path: Path) -> None:
    file = CheckpointFile(tmp_path / "dra" / "checkpoint.json")
    assert file.load() is None
    state = complete(cp.fresh("boot-1"), planned("u1", ["gpu-0"]))
    file.save(state)
    assert CheckpointFile(file.path).load() == state
    assert sorted(p.name for p in file.path.parent.iterdir()) == ["checkpoint.json"]
    assert (file.path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 9}', b"x" * 2000, b""])
def test_a_corrupt_file_is_moved_aside_and_read_as_empty(tmp_path: Path, content: bytes,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    file = CheckpointFile(tmp_path / "checkpoint.json", max_bytes=1000)
    file.path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        assert file.load() is None
    assert not file.path.exists() and file.aside_path.read_bytes() == content
    assert "moved it to" in caplog.text
    # The next save starts a good file again.
    file.save(cp.fresh("b"))
    assert file.load() == cp.fresh("b")


def test_an_unreadable_file_is_read_as_empty(tmp_path: Path) -> None:
    file = CheckpointFile(tmp_path / "checkpoint.json")
    file.path.mkdir()  # reading a directory fails with an OSError
    (file.path / "x").write_text("")
    assert file.load() is None


def test_a_checkpoint_over_the_bound_is_not_written(tmp_path: Path) -> None:
    file = CheckpointFile(tmp_path / "checkpoint.json", max_bytes=100)
    file.save(cp.fresh("b"))
    with pytest.raises(CheckpointWriteError, match="over the bound of 100"):
        file.save(complete(cp.fresh("b"), planned("u1", ["gpu-0"])))
    assert file.load() == cp.fresh("b")


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    file = CheckpointFile(tmp_path / "checkpoint.json")
    file.save(cp.fresh("b"))
    # The temporary file's name taken by a directory: the write fails (even as root).
    (tmp_path / ".checkpoint.json.tmp").mkdir()
    with pytest.raises(CheckpointWriteError, match="cannot write the checkpoint"):
        file.save(complete(cp.fresh("b"), planned("u1", ["gpu-0"])))
    assert file.load() == cp.fresh("b")
