"""NodePrepareResources and NodeUnprepareResources: one `ClaimPreparer` per driver, between the DRA gRPC servers
and what changes the node (CDI specs, MPS, time slices).

Rules (docs/dra.md, "Preparing claims"; the reference's §2.4 and §5):

* Every claim of a request gets an entry, each its own answer: one bad claim is that claim's error, never the
  call's. Claims of one request are prepared concurrently, at most `concurrency` at a time, and the whole call
  ends by `deadline_s` (default 30 s, inside the kubelet's 45 s): a claim still running then is cancelled, rolled
  back (bounded by `rollback_s`) and answered with an error the kubelet retries.
* A claim `completed` in the checkpoint is answered from it: the same devices and CDI IDs, no side effect, no API
  call. Otherwise the claim is read from the API (its UID must match, it must be allocated), planned
  (`nvdp.core.dra.claims.plan_claim`), checked against the devices other claims hold (`checkpoint.conflict`),
  an earlier unfinished attempt is rolled back, `started` is written, then MPS and time slices are applied, the
  claim's CDI spec written, `completed` written, and only then the answer given. A failure after `started` rolls
  back at once; if the rollback fails too, `started` stays and the next attempt (or Unprepare) rolls back first.
* Unprepare of a claim nvdp does not know succeeds. Of a known one: MPS released, the CDI spec removed, time
  slices nobody else relies on reset to `Default`, then the entry dropped.
* `recover()` at start: a checkpoint of another boot is discarded, CDI specs of claims the checkpoint does not
  know are removed, completed claims get their MPS back (and their CDI spec if it vanished, e.g. a tmpfs
  `/var/run/cdi`), and `cleanup()` runs: each `started` claim is read from the API and rolled back if it is gone
  or has another UID.

MPS shares (`dra.sharing.mps`, `nvdp.core.dra.shares`): a result with a `shareID` on a share host becomes an MPS
device whose limits come from its `consumedCapacity`; before `started` its amounts are added to those of the shares
prepared (or being prepared) on that GPU, and a claim that would over-commit the GPU gets an error naming the
totals. The MPS provider (`nvdp.dra.mps_shares`) runs one daemon per GPU for every MPS claim on it.

Time slices: NVIDIA's driver runs `nvidia-smi compute-policy --set-timeslice`; nvdp does it through a
`TimeSlicer` when the daemon gives one (`nvdp.dra.timeslice.NvidiaSmiTimeSlicer` where nvidia-smi is found),
only on whole GPUs (MIG devices have no time slice of their own, as there). Without one, a TimeSlicing config
with interval `Default` is accepted (the GPU's own setting, nothing to change: the claim still counts as
time-sliced for sharing) and any other interval fails the claim with an error that says the interval cannot be
set on this node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import trio

from nvdp.core.dra import checkpoint as cp
from nvdp.core.dra.claims import ClaimPlan, DeviceEdits, NodeDevice, plan_claim
from nvdp.core.dra.config import INTERVALS, MPS, TIME_SLICING
from nvdp.core.dra.shares import ShareAmount, SharePolicy, over_commit, plan_shares
from nvdp.core.dra.types import ClaimRef, PrepareResult, UnprepareResult
from nvdp.dra.checkpoint_file import CheckpointFile, CheckpointWriteError

log = logging.getLogger(__name__)

#: Default bounds: the kubelet gives a call 45 s; prepare and rollback together stay well inside it.
DEFAULT_DEADLINE_S = 30.0
DEFAULT_ROLLBACK_S = 5.0
DEFAULT_CONCURRENCY = 8

_R = TypeVar("_R", PrepareResult, UnprepareResult)


class ClaimFetchError(Exception):
    """The API could not be asked for a claim (unreachable, refused, an error status); the message says which."""


class SideEffectError(Exception):
    """A CDI spec, MPS daemon or time slice could not be set up or torn down; the message is shown to the user."""


class ClaimGetter(Protocol):
    async def get(self, namespace: str, name: str) -> Mapping[str, object] | None:
        """The ResourceClaim as the API returns it (resource.k8s.io/v1 JSON), or None when it is NotFound.
        Raises `ClaimFetchError` for anything else."""
        ...


class ClaimCdi(Protocol):
    async def write(self, claim_uid: str,
                    devices: Sequence[tuple[str, NodeDevice, DeviceEdits]]) -> Mapping[str, tuple[str, ...]]:
        """Write (or replace) the claim's CDI spec with one device per entry; the CDI IDs of each device name.
        Raises `SideEffectError`."""
        ...

    async def remove(self, claim_uid: str) -> None:
        """Remove the claim's CDI spec; nothing to do if there is none. Raises `SideEffectError`."""
        ...

    async def list_claims(self) -> set[str]:
        """UIDs of the claims that have a CDI spec on the node."""
        ...


@dataclass(frozen=True, slots=True)
class MpsLimits:
    """What one device of a claim asks of MPS: the device's UUID (a GPU's or a MIG device's) and its limits."""

    device_uuid: str
    active_thread_percentage: int | None = None
    pinned_memory_limit_mib: int | None = None


class MpsProvider(Protocol):
    async def acquire(self, claim_uid: str, gpu_uuid: str, limits: MpsLimits) -> DeviceEdits:
        """Make sure GPU `gpu_uuid`'s control daemon runs for this claim (again, after a restart: idempotent) and
        return the edits a client container needs for it. Raises `SideEffectError`."""
        ...

    async def release(self, claim_uid: str) -> None:
        """The claim no longer uses MPS anywhere; nothing to do if it never did. Raises `SideEffectError`."""
        ...

    async def restore(self, holdings: Sequence[tuple[str, str, MpsLimits]]) -> None:
        """nvdp (re)started: every (claim UID, GPU UUID, limits) the checkpoint's claims hold (completed, and started
        ones, whose rollback releases them), all at once, so that each GPU's daemon is adopted as it runs (not
        restarted for the first claim's limits).
        Never raises: what cannot be restored is logged, and the claim's next acquire tries again."""
        ...


class TimeSlicer(Protocol):
    async def set_interval(self, gpu_uuid: str, interval: int) -> None:
        """Put a whole GPU in compute mode DEFAULT with this time slice (`INTERVALS`' values: 0 Default .. 3 Long;
        NVIDIA's driver runs `nvidia-smi -c DEFAULT` and `nvidia-smi compute-policy --set-timeslice`). Raises
        `SideEffectError`."""
        ...


class ClaimPreparer:
    """Prepares and unprepares one driver's claims on this node, with its checkpoint (module docstring)."""

    def __init__(
        self,
        driver_name: str,
        node_name: str,
        checkpoint_path: Path,
        boot_id: str,
        getter: ClaimGetter,
        cdi: ClaimCdi,
        mps: MpsProvider | None,
        devices: Mapping[str, NodeDevice],
        *,
        timeslicer: TimeSlicer | None = None,
        share_hosts: Mapping[str, SharePolicy] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        deadline_s: float = DEFAULT_DEADLINE_S,
        rollback_s: float = DEFAULT_ROLLBACK_S,
    ) -> None:
        self.driver_name = driver_name
        self.node_name = node_name
        self.boot_id = boot_id
        self._file = CheckpointFile(checkpoint_path)
        self._getter = getter
        self._cdi = cdi
        self._mps = mps
        self._timeslicer = timeslicer
        self._devices = dict(devices)
        #: Device name -> policy of the GPUs published for MPS shares (`nvdp.core.dra.shares`).
        self._share_hosts = dict(share_hosts or {})
        self._concurrency = concurrency
        self._deadline_s = deadline_s
        self._rollback_s = rollback_s
        self._state: cp.Checkpoint | None = None
        self._claim_locks: dict[str, trio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._in_flight: dict[str, tuple[cp.DeviceRecord, ...]] = {}

    def __repr__(self) -> str:
        state = self._state
        if state is None:
            return f"<ClaimPreparer {self.driver_name} checkpoint not loaded>"
        done = sum(entry.state == cp.COMPLETED for entry in state.claims.values())
        return (f"<ClaimPreparer {self.driver_name} completed={done} started={len(state.claims) - done} "
                f"in_flight={len(self._in_flight)}>")

    @property
    def checkpoint(self) -> cp.Checkpoint:
        """The checkpoint as it is now (read from disk on first use)."""
        if self._state is None:
            loaded = self._file.load() or cp.fresh(self.boot_id)
            state, discarded = cp.for_boot(loaded, self.boot_id)
            if discarded:
                log.warning("DRA checkpoint %s is from boot %s, this is boot %s: discarding its %d claim(s), "
                            "the kubelet prepares them again", self._file.path, loaded.boot_id, self.boot_id,
                            len(loaded.claims))
            self._state = state
        return self._state

    def update_devices(self, devices: Mapping[str, NodeDevice],
                       share_hosts: Mapping[str, SharePolicy] | None = None) -> None:
        """The devices served through DRA changed (plan, MIG layout, `dra.sharing.mps`): later prepares use these.
        `share_hosts` None leaves the share hosts as they are."""
        self._devices = dict(devices)
        if share_hosts is not None:
            self._share_hosts = dict(share_hosts)

    def _save(self, state: cp.Checkpoint) -> None:
        self._file.save(state)
        self._state = state

    # -- Prepare ---------------------------------------------------------------------------------------------

    async def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, PrepareResult]:
        """An answer for every claim (by UID); never raises for a claim's failure."""
        answers: dict[str, PrepareResult] = {}
        await self._each(claims, self._prepare_bounded, answers)
        return answers

    async def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, UnprepareResult]:
        """An answer for every claim (by UID); a claim nvdp never prepared succeeds."""
        answers: dict[str, UnprepareResult] = {}
        await self._each(claims, self._unprepare_bounded, answers)
        return answers

    async def _each(self, claims: Sequence[ClaimRef],
                    work: Callable[[ClaimRef, float, trio.CapacityLimiter, Any], Awaitable[None]],
                    answers: Any) -> None:
        unique: dict[str, ClaimRef] = {}
        for ref in claims:
            unique.setdefault(ref.uid, ref)
        deadline = trio.current_time() + self._deadline_s
        limiter = trio.CapacityLimiter(self._concurrency)
        async with trio.open_nursery() as nursery:
            for ref in unique.values():
                nursery.start_soon(work, ref, deadline, limiter, answers)

    async def _prepare_bounded(self, ref: ClaimRef, deadline: float, limiter: trio.CapacityLimiter,
                               answers: dict[str, PrepareResult]) -> None:
        with trio.move_on_at(deadline):
            async with limiter:
                answers[ref.uid] = await self._guarded(ref, self._prepare_one, PrepareResult)
                return
        answers[ref.uid] = PrepareResult(error=self._late(ref, "prepare"))

    async def _unprepare_bounded(self, ref: ClaimRef, deadline: float, limiter: trio.CapacityLimiter,
                                 answers: dict[str, UnprepareResult]) -> None:
        with trio.move_on_at(deadline):
            async with limiter:
                answers[ref.uid] = await self._guarded(ref, self._unprepare_one, UnprepareResult)
                return
        answers[ref.uid] = UnprepareResult(error=self._late(ref, "unprepare"))

    def _late(self, ref: ClaimRef, what: str) -> str:
        log.warning("DRA %s of claim %s/%s (%s) did not finish within %g s; answered with an error, the kubelet "
                    "retries", what, ref.namespace, ref.name, ref.uid, self._deadline_s)
        return (f"{what} of claim {ref.namespace}/{ref.name} did not finish within {self._deadline_s:g} s; "
                "nvdp rolls back what it did and the kubelet will retry")

    @asynccontextmanager
    async def _claim_lock(self, uid: str) -> AsyncIterator[None]:
        """One claim's work at a time (a kubelet retry may overlap a slow first call); locks live while used."""
        lock = self._claim_locks.setdefault(uid, trio.Lock())
        self._lock_users[uid] = self._lock_users.get(uid, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[uid] -= 1
            if not self._lock_users[uid]:
                del self._lock_users[uid]
                del self._claim_locks[uid]

    async def _guarded(self, ref: ClaimRef, work: Callable[[ClaimRef], Awaitable[_R]], result_type: type[_R]) -> _R:
        """One claim's work under its lock; a bug in it becomes that claim's error, not the call's."""
        try:
            async with self._claim_lock(ref.uid):
                return await work(ref)
        except Exception as e:
            log.exception("DRA claim %s/%s (%s): unexpected error", ref.namespace, ref.name, ref.uid)
            return result_type(error=f"internal error in nvdp for claim {ref.namespace}/{ref.name}: {e!r}")

    async def _prepare_one(self, ref: ClaimRef) -> PrepareResult:
        entry = self.checkpoint.claims.get(ref.uid)
        if entry is not None and entry.state == cp.COMPLETED:
            return PrepareResult(devices=cp.prepared_devices(entry))
        where = f"claim {ref.namespace}/{ref.name}"
        try:
            claim = await self._getter.get(ref.namespace, ref.name)
        except ClaimFetchError as e:
            return PrepareResult(error=f"{where}: cannot read it from the API: {e}")
        if claim is None:
            return PrepareResult(error=f"{where} not found in the API")
        plan = plan_claim(claim, ref, self.driver_name, self.node_name, self._devices)
        if isinstance(plan, str):
            return PrepareResult(error=plan)
        if self._share_hosts:
            plan = plan_shares(plan, self._share_hosts)
            if isinstance(plan, str):
                return PrepareResult(error=plan)
        why = cp.conflict(self.checkpoint, plan, self._in_flight) or self._over_commit(plan)
        if why is not None:
            return PrepareResult(error=f"unable to prepare {where}: {why}")
        self._in_flight[ref.uid] = tuple(cp.planned_record(device) for device in plan.devices)
        try:
            return await self._prepare_plan(plan)
        finally:
            del self._in_flight[ref.uid]

    def _over_commit(self, plan: ClaimPlan) -> str | None:
        """Why a share of `plan` does not fit its GPU beside the shares prepared or being prepared there, or None:
        the scheduler's bookkeeping is checked, not trusted. Checked and then marked in flight with no await in
        between, so two claims racing for the last GiB cannot both get it."""
        held = cp.held_shares(self.checkpoint, plan, self._in_flight)
        mine: dict[str, list[ShareAmount]] = {}
        for device in plan.devices:
            if not device.share_memory_bytes:
                continue
            policy = self._share_hosts[device.device]
            before = [ShareAmount(r.share_memory_bytes, r.share_compute) for r in held[device.device]]
            before += mine.get(device.device, [])
            new = ShareAmount(device.share_memory_bytes, device.share_compute)
            why = over_commit(device.device, policy, before, new)
            if why is not None:
                return why
            mine.setdefault(device.device, []).append(new)
        return None

    async def _prepare_plan(self, plan: ClaimPlan) -> PrepareResult:
        ref = plan.ref
        where = f"claim {ref.namespace}/{ref.name}:{ref.uid}"
        if ref.uid in self.checkpoint.claims:
            log.info("DRA claim %s: an earlier prepare did not finish; rolling it back first", where)
            error = await self._undo(ref.uid)
            if error:
                return PrepareResult(error=f"error preparing devices for {where}: rolling back an earlier "
                                           f"attempt failed: {error}")
        try:
            self._save(cp.started(self.checkpoint, plan))
        except CheckpointWriteError as e:
            return PrepareResult(error=f"error preparing devices for {where}: {e}")
        try:
            records = await self._apply(plan)
            self._save(cp.completed(self.checkpoint, ref.uid, records))
        except (SideEffectError, CheckpointWriteError) as e:
            log.warning("DRA claim %s: prepare failed (%s); rolling back", where, e)
            await self._undo_bounded(ref.uid)
            return PrepareResult(error=f"error preparing devices for {where}: {e}")
        except BaseException:
            # Cancelled (the call's deadline) or a bug: undo what was done before the error travels on.
            await self._undo_bounded(ref.uid)
            raise
        log.info("DRA claim %s prepared: %s", where, ", ".join(r.device for r in records) or "no devices")
        return PrepareResult(devices=cp.prepared_devices(self.checkpoint.claims[ref.uid]))

    async def _apply(self, plan: ClaimPlan) -> tuple[cp.DeviceRecord, ...]:
        uid = plan.ref.uid
        edits: dict[str, DeviceEdits] = {}
        for device in plan.devices:
            sharing = device.config.sharing
            if sharing is None:
                continue
            gpu_uuid = device.node_device.gpu.uuid
            if sharing.strategy == TIME_SLICING and device.node_device.mig is None:
                await self._set_timeslice(gpu_uuid, sharing.interval)
            elif sharing.strategy == MPS:
                if self._mps is None:
                    raise SideEffectError("MPS is not available on this node (nvdp runs no MPS control daemons for "
                                          "DRA here)")
                mps = sharing.mps
                limits = MpsLimits(device.node_device.uuid, mps.active_thread_percentage if mps else None,
                                   device.mps_pinned_mib)
                edits[device.device] = await self._mps.acquire(uid, gpu_uuid, limits)
        cdi_ids: Mapping[str, tuple[str, ...]] = {}
        if plan.devices:
            unique = {d.device: (d.device, d.node_device, edits.get(d.device, DeviceEdits())) for d in plan.devices}
            cdi_ids = await self._cdi.write(uid, list(unique.values()))
            missing = sorted(set(unique) - set(cdi_ids))
            if missing:
                raise SideEffectError(f"the CDI spec has no device for {', '.join(missing)}")
        return tuple(msgspec.structs.replace(cp.planned_record(d), cdi_device_ids=tuple(cdi_ids[d.device]),
                                             edits=edits.get(d.device, DeviceEdits())) for d in plan.devices)

    async def _set_timeslice(self, gpu_uuid: str, interval: str) -> None:
        if self._timeslicer is not None:
            await self._timeslicer.set_interval(gpu_uuid, INTERVALS[interval])
        elif interval != "Default":
            raise SideEffectError(f"time-slice interval {interval} cannot be set on this node: nvdp has no "
                                  "time-slice control here (only Default is accepted)")

    # -- Undo: rollback and unprepare ------------------------------------------------------------------------

    async def _undo(self, uid: str) -> str:
        """Tear down what the claim's entry says may exist and drop the entry; "" when done, else why not."""
        entry = self.checkpoint.claims.get(uid)
        if entry is None:
            return ""
        try:
            if self._mps is not None and any(d.sharing is not None and d.sharing.strategy == MPS
                                             for d in entry.devices):
                await self._mps.release(uid)
            await self._cdi.remove(uid)
            if self._timeslicer is not None:
                for gpu_uuid in cp.timeslice_resets(self.checkpoint, uid):
                    await self._timeslicer.set_interval(gpu_uuid, INTERVALS["Default"])
            self._save(cp.removed(self.checkpoint, uid))
        except (SideEffectError, CheckpointWriteError) as e:
            log.warning("DRA claim %s/%s (%s): tear-down failed: %s; the entry stays for the next try",
                        entry.namespace, entry.name, uid, e)
            return str(e)
        return ""

    async def _undo_bounded(self, uid: str) -> None:
        with trio.move_on_after(self._rollback_s) as scope:
            scope.shield = True
            await self._undo(uid)
        if scope.cancelled_caught:
            log.warning("DRA claim %s: rollback did not finish within %g s; the entry stays for the next try",
                        uid, self._rollback_s)

    async def _unprepare_one(self, ref: ClaimRef) -> UnprepareResult:
        entry = self.checkpoint.claims.get(ref.uid)
        if entry is None:
            return UnprepareResult()
        error = await self._undo(ref.uid)
        if error:
            return UnprepareResult(error=f"error unpreparing claim {ref.namespace}/{ref.name}:{ref.uid}: {error}")
        log.info("DRA claim %s/%s (%s) unprepared", ref.namespace, ref.name, ref.uid)
        return UnprepareResult()

    # -- Start-up and periodic cleanup -----------------------------------------------------------------------

    async def recover(self) -> None:
        """At start, before serving: the boot check, orphaned specs, completed claims' MPS and specs, cleanup."""
        state = self.checkpoint
        try:
            self._save(state)
        except CheckpointWriteError as e:
            log.error("DRA checkpoint cannot be written (%s): every prepare will fail until it can", e)
        try:
            with_specs = await self._cdi.list_claims()
        except SideEffectError as e:
            log.warning("DRA recovery: cannot list claim CDI specs (%s); orphans stay until the next start", e)
            with_specs = None
        if with_specs is not None:
            for uid in sorted(with_specs - set(state.claims)):
                try:
                    await self._cdi.remove(uid)
                    log.info("DRA recovery: removed the CDI spec of claim %s, which nvdp has not prepared", uid)
                except SideEffectError as e:
                    log.warning("DRA recovery: cannot remove the orphaned CDI spec of claim %s: %s", uid, e)
        if self._mps is not None:
            await self._mps.restore([
                (uid, device.gpu_uuid, MpsLimits(device.uuid, device.sharing.active_thread_percentage,
                                                 device.sharing.pinned_memory_limit_mib))
                # Started ones too: they may have changed a daemon's limits before the crash; their rollback
                # (cleanup, or the kubelet's retry) releases them.
                for uid, entry in sorted(state.claims.items())
                for device in entry.devices if device.sharing is not None and device.sharing.strategy == MPS])
        for uid, entry in sorted(state.claims.items()):
            if entry.state == cp.COMPLETED:
                await self._restore(uid, entry, spec_missing=with_specs is not None and uid not in with_specs)
        await self.cleanup()

    async def _restore(self, uid: str, entry: cp.ClaimEntry, spec_missing: bool) -> None:
        """Give a completed claim back a lost CDI spec (its MPS came back with `MpsProvider.restore`)."""
        where = f"{entry.namespace}/{entry.name} ({uid})"
        try:
            if spec_missing and entry.devices:
                devices = {d.device: (d.device, self._devices[d.device], d.edits) for d in entry.devices
                           if d.device in self._devices}
                if len(devices) < len({d.device for d in entry.devices}):
                    log.warning("DRA recovery: claim %s has devices this node no longer serves; its CDI spec "
                                "is not written again", where)
                    return
                await self._cdi.write(uid, list(devices.values()))
                log.info("DRA recovery: wrote the missing CDI spec of claim %s again", where)
        except SideEffectError as e:
            log.warning("DRA recovery: claim %s: %s", where, e)

    async def cleanup(self) -> None:
        """Roll back each `started` claim that is gone from the API or was re-created under another UID (a
        crash mid-prepare whose pod went away); the others wait for their own retry. Run at start and
        periodically."""
        for uid, entry in sorted(self.checkpoint.claims.items()):
            if entry.state != cp.STARTED:
                continue
            async with self._claim_lock(uid):
                if uid in self._in_flight or self.checkpoint.claims.get(uid) != entry:
                    continue
                with trio.move_on_after(self._deadline_s):
                    try:
                        claim = await self._getter.get(entry.namespace, entry.name)
                    except ClaimFetchError as e:
                        log.info("DRA cleanup: cannot read claim %s/%s (%s): %s; keeping it", entry.namespace,
                                 entry.name, uid, e)
                        continue
                    current_uid = _uid_of(claim)
                    if current_uid == uid:
                        continue
                    log.info("DRA cleanup: claim %s/%s (%s) was left half-prepared and is %s; rolling it back",
                             entry.namespace, entry.name, uid,
                             "gone" if claim is None else f"now UID {current_uid}")
                    await self._undo(uid)


def _uid_of(claim: Mapping[str, object] | None) -> str | None:
    if claim is None:
        return None
    metadata = claim.get("metadata")
    if isinstance(metadata, Mapping):
        uid = metadata.get("uid")
        return uid if isinstance(uid, str) else None
    return None

