"""HealthTracker: faults onto devices, permanence and recovery, with time passed in by hand."""

from __future__ import annotations

import pytest

from nvdp.core.health import ALL_GPUS, Fault, HealthTracker, XidPolicy
from nvdp.core.health.events import XidEvent
from nvdp.core.health.xids import EVENT_DOUBLE_BIT_ECC, EVENT_XID_CRITICAL
from nvdp.core.plan.model import Device

GPU0 = "GPU-0"
GPU1 = "GPU-1"
QUIET = 300.0


def device(device_id: str, gpu_uuid: str, *, replica: int | None = None,
           mig: tuple[int, int] | None = None) -> Device:
    return Device(id=device_id, physical_id=device_id.split("::")[0], index="0", gpu_uuid=gpu_uuid, gpu_index=0,
                  paths=(), replica=replica, mig_placement=mig)


# GPU 0: MIG with two instances, each shared by two replicas. GPU 1: whole, two replicas.
MIG_A = [device("MIG-a::0", GPU0, replica=0, mig=(1, 0)), device("MIG-a::1", GPU0, replica=1, mig=(1, 0))]
MIG_B = [device("MIG-b::0", GPU0, replica=0, mig=(2, 0)), device("MIG-b::1", GPU0, replica=1, mig=(2, 0))]
WHOLE1 = [device("GPU-1::0", GPU1, replica=0), device("GPU-1::1", GPU1, replica=1)]
DEVICES = [*MIG_A, *MIG_B, *WHOLE1]


def xid(gpu_uuid: str, code: int, gi: int | None = None, ci: int | None = None) -> XidEvent:
    return XidEvent(gpu_uuid=gpu_uuid, event_type=EVENT_XID_CRITICAL, xid=code, gi=gi, ci=ci)


def ids(unhealthy: dict[str, str]) -> set[str]:
    return set(unhealthy)


@pytest.fixture
def tracker() -> HealthTracker:
    return HealthTracker(XidPolicy(), quiet_period_s=QUIET)


def test_a_gpu_wide_xid_marks_every_device_of_that_gpu_replicas_included(tracker: HealthTracker) -> None:
    assert tracker.on_xid(xid(GPU0, 48), now=10.0)
    assert tracker.unhealthy(DEVICES) == {d.id: "XID 48 (double-bit ECC error)" for d in MIG_A + MIG_B}
    assert tracker.on_xid(xid(GPU1, 48), now=11.0)
    assert ids(tracker.unhealthy(DEVICES)) == {d.id for d in DEVICES}


def test_a_mig_scoped_xid_marks_only_that_instance_and_its_replicas(tracker: HealthTracker) -> None:
    assert tracker.on_xid(xid(GPU0, 94, gi=2, ci=0), now=1.0)
    assert tracker.unhealthy(DEVICES) == {
        d.id: "XID 94 (contained ECC error) in MIG instance (gi 2, ci 0)" for d in MIG_B
    }


def test_a_mig_scoped_xid_also_marks_the_whole_gpu_when_advertised_whole(tracker: HealthTracker) -> None:
    whole = device("GPU-0", GPU0)
    tracker.on_xid(xid(GPU0, 94, gi=1, ci=0), now=1.0)
    assert ids(tracker.unhealthy([whole, *DEVICES])) == {"GPU-0", *(d.id for d in MIG_A)}


def test_ignored_xids_change_nothing(tracker: HealthTracker) -> None:
    assert not tracker.on_xid(xid(GPU0, 13), now=1.0)
    assert tracker.unhealthy(DEVICES) == {}
    assert tracker.faults == ()
    assert tracker.next_probe_at() is None


def test_nothing_is_ever_marked_with_checks_disabled() -> None:
    tracker = HealthTracker(XidPolicy.from_env("all", None))
    for code in (13, 48, 79):
        assert not tracker.on_xid(xid(GPU0, code), now=1.0)
    assert not tracker.on_xid(XidEvent(GPU0, EVENT_DOUBLE_BIT_ECC, 0), now=1.0)
    assert tracker.unhealthy(DEVICES) == {}


def test_a_double_bit_ecc_event_is_a_recoverable_gpu_fault(tracker: HealthTracker) -> None:
    assert tracker.on_xid(XidEvent(GPU1, EVENT_DOUBLE_BIT_ECC, 0), now=1.0)
    assert tracker.unhealthy(WHOLE1) == {d.id: "double-bit ECC error" for d in WHOLE1}
    assert tracker.next_probe_at() == 1.0 + QUIET


def test_unknown_event_types_are_ignored(tracker: HealthTracker) -> None:
    assert not tracker.on_xid(XidEvent(GPU1, 0x1, 0), now=1.0)  # single-bit ECC: never registered for


def test_recovery_after_the_quiet_period(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU0, 48), now=100.0)
    assert tracker.due_for_probe(100.0 + QUIET - 0.001) == []
    assert tracker.due_for_probe(100.0 + QUIET) == [GPU0]
    assert tracker.on_probe(GPU0, ok=True, now=400.0)
    assert tracker.unhealthy(DEVICES) == {}
    assert tracker.next_probe_at() is None
    assert not tracker.on_probe(GPU0, ok=True, now=401.0)  # nothing left to clear


def test_a_new_xid_during_the_quiet_period_restarts_it(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU0, 48), now=0.0)
    assert not tracker.on_xid(xid(GPU0, 48), now=200.0)  # same reason: no change to publish...
    assert tracker.due_for_probe(QUIET) == []  # ...but the quiet period starts again
    assert tracker.next_probe_at() == 200.0 + QUIET
    assert tracker.fault(GPU0) == Fault(GPU0, None, "XID 48 (double-bit ECC error)", False, since=0.0,
                                        last_event=200.0)


def test_an_xid_on_one_mig_instance_restarts_the_quiet_period_of_its_gpu(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU0, 48), now=0.0)
    assert tracker.on_xid(xid(GPU0, 94, gi=1, ci=0), now=100.0)
    assert tracker.due_for_probe(QUIET) == []
    assert tracker.due_for_probe(100.0 + QUIET) == [GPU0]
    tracker.on_probe(GPU0, ok=True, now=100.0 + QUIET)
    assert tracker.faults == ()


def test_a_different_xid_changes_the_reason(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU1, 48), now=0.0)
    assert tracker.on_xid(xid(GPU1, 94), now=1.0)
    assert set(tracker.unhealthy(WHOLE1).values()) == {"XID 94 (contained ECC error)"}


def test_a_failed_probe_keeps_the_devices_unhealthy_and_waits_another_period(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU1, 48), now=0.0)
    assert not tracker.on_probe(GPU1, ok=False, now=QUIET)
    assert ids(tracker.unhealthy(DEVICES)) == {d.id for d in WHOLE1}
    assert tracker.due_for_probe(QUIET + 1) == []
    assert tracker.next_probe_at() == 2 * QUIET


def test_xid_79_is_permanent_and_never_probed(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU1, 48), now=0.0)
    assert tracker.on_xid(xid(GPU1, 79), now=1.0)  # escalates the existing fault
    assert tracker.due_for_probe(10 * QUIET) == []
    assert tracker.next_probe_at() is None
    assert not tracker.on_probe(GPU1, ok=True, now=10 * QUIET)  # a stray probe result does not revive it
    assert set(tracker.unhealthy(WHOLE1).values()) == {"XID 79 (GPU has fallen off the bus)"}
    # A later recoverable XID neither hides the permanent reason nor makes the GPU probe-able.
    assert not tracker.on_xid(xid(GPU1, 48), now=2.0)
    fault = tracker.fault(GPU1)
    assert fault is not None and fault.permanent


def test_a_permanent_mig_fault_keeps_the_whole_gpu_from_being_probed(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU0, 48), now=0.0)
    tracker.on_xid(xid(GPU0, 79, gi=1, ci=0), now=0.0)
    assert tracker.due_for_probe(10 * QUIET) == []


def test_a_lost_gpu_is_permanent(tracker: HealthTracker) -> None:
    assert tracker.on_error(GPU1, "GPU is lost", now=5.0, permanent=True)
    assert tracker.unhealthy(DEVICES) == {d.id: "GPU is lost" for d in WHOLE1}
    assert tracker.due_for_probe(10 * QUIET) == []


def test_other_gpus_recover_while_one_is_lost(tracker: HealthTracker) -> None:
    tracker.on_error(GPU1, "GPU is lost", now=0.0, permanent=True)
    tracker.on_xid(xid(GPU0, 48), now=0.0)
    assert tracker.due_for_probe(QUIET) == [GPU0]
    tracker.on_probe(GPU0, ok=True, now=QUIET)
    assert ids(tracker.unhealthy(DEVICES)) == {d.id for d in WHOLE1}


def test_a_node_wide_error_marks_every_device_and_recovers_as_one(tracker: HealthTracker) -> None:
    assert tracker.on_error(None, "waiting for NVML health events failed", now=0.0)
    assert ids(tracker.unhealthy(DEVICES)) == {d.id for d in DEVICES}
    assert not tracker.on_error(None, "waiting for NVML health events failed", now=10.0)  # repeats: no change
    assert tracker.due_for_probe(QUIET) == []
    assert tracker.due_for_probe(10.0 + QUIET) == [ALL_GPUS]
    assert tracker.on_probe(ALL_GPUS, ok=True, now=10.0 + QUIET)
    assert tracker.unhealthy(DEVICES) == {}


def test_the_permanent_reason_wins_over_the_latest(tracker: HealthTracker) -> None:
    tracker.on_error(GPU1, "GPU is lost", now=0.0, permanent=True)
    tracker.on_error(None, "waiting for NVML health events failed", now=5.0)
    assert set(tracker.unhealthy(WHOLE1).values()) == {"GPU is lost"}
    assert set(tracker.unhealthy(MIG_A).values()) == {"waiting for NVML health events failed"}


def test_probes_are_due_in_a_stable_order(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU1, 48), now=0.0)
    tracker.on_xid(xid(GPU0, 48), now=1.0)
    assert tracker.next_probe_at() == QUIET
    assert tracker.due_for_probe(1.0 + QUIET) == [GPU0, GPU1]


def test_repr_shows_the_faults(tracker: HealthTracker) -> None:
    tracker.on_xid(xid(GPU0, 94, gi=1, ci=0), now=1.0)
    text = repr(tracker)
    assert text.startswith("<HealthTracker quiet_period_s=300 faults=[Fault(gpu_uuid='GPU-0', placement=(1, 0),")
    assert "permanent=False" in text
