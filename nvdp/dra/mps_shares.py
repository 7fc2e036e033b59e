"""The `MpsProvider` of DRA claims: one supervised MPS control daemon per GPU, shared by every MPS claim on it (MPS
shares of a share host, and claims with an MPS `GpuConfig`).

* The first claim on a GPU starts its daemon (`MpsDaemons`: compute mode EXCLUSIVE_PROCESS, the daemon detached,
  probed, restarted after a crash); `acquire` returns once it answers, with the client edits of the claim
  (`nvdp.core.dra.shares.client_edits`: pipe directory and shm mounts, the claim's own limits in its env).
* The daemon's default limits are the largest of its claims' (`daemon_defaults`), because a client's env can only
  lower them: a claim that raises the largest sends the new defaults before its answer (`MpsDaemons.update_limits`,
  no restart: MPS applies them to servers started afterwards, and nvdp also sets them on the servers running now);
  one whose release lowers it sends the lower ones.
* After the last claim on a GPU goes, its daemon is removed (quit, compute mode restored) at once, or after
  `keep_warm_s` if no claim came back meanwhile.
* After nvdp restarts, `restore` receives every claim the checkpoint holds at once; each daemon is *adopted* with
  the limits it serves (never restarted for them: that would end every client), then set to the largest claim's
  if they differ (a crash between a limit change and the checkpoint write).

Only whole GPUs: MPS on a MIG device needs a daemon per MIG device, which this provider does not run (the claim
gets an error saying so). One lock serialises the provider's calls: `MpsDaemons` has one caller at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import trio

from nvdp.core.dra.claims import DeviceEdits
from nvdp.core.dra.shares import client_edits, daemon_defaults
from nvdp.core.inventory import Gpu
from nvdp.core.plan.model import MpsDaemonSpec
from nvdp.core.plan.sharing import mps_dirs
from nvdp.dra.prepare import MpsLimits, SideEffectError
from nvdp.mps.control_daemon import MpsError
from nvdp.mps.supervisor import MpsDaemons

log = logging.getLogger(__name__)


class MpsShares:
    """An `MpsProvider` over its own `MpsDaemons` (which it alone drives: do not `apply` to it elsewhere)."""

    def __init__(self, nursery: trio.Nursery, daemons: MpsDaemons, gpus: Sequence[Gpu], mps_root: str, *,
                 keep_warm_s: float = 0.0) -> None:
        self._nursery = nursery
        self.daemons = daemons
        self._gpus = {gpu.uuid: gpu for gpu in gpus}
        self.mps_root = mps_root
        self.keep_warm_s = keep_warm_s
        #: GPU UUID -> claim UID -> the limits of each of its devices there.
        self._holders: dict[str, dict[str, list[MpsLimits]]] = {}
        self._lock = trio.Lock()
        #: GPUs whose idle daemon waits out `keep_warm_s`: cancelling the scope keeps it.
        self._warm: dict[str, trio.CancelScope] = {}

    def __repr__(self) -> str:
        held = ", ".join(f"{uuid}: {len(claims)} claim(s)" for uuid, claims in self._holders.items())
        return f"<MpsShares {held or 'idle'} warm={len(self._warm)}>"

    def update_gpus(self, gpus: Sequence[Gpu], keep_warm_s: float | None = None) -> None:
        """The node's GPUs (or `keep_warm_s`) changed: later acquires use these."""
        self._gpus = {gpu.uuid: gpu for gpu in gpus}
        if keep_warm_s is not None:
            self.keep_warm_s = keep_warm_s

    @property
    def holders(self) -> Mapping[str, Mapping[str, Sequence[MpsLimits]]]:
        return self._holders

    def spec(self, gpu_uuid: str) -> MpsDaemonSpec:
        """The daemon GPU `gpu_uuid` needs for the claims it holds now."""
        gpu = self._gpus[gpu_uuid]
        pipe_dir, log_dir, _ = mps_dirs(self.mps_root, gpu_uuid)
        limits = [(limit.pinned_memory_limit_mib, limit.active_thread_percentage)
                  for claims in [self._holders.get(gpu_uuid, {})] for held in claims.values() for limit in held]
        pinned, percentage = daemon_defaults(limits, gpu.memory_mib)
        return MpsDaemonSpec(gpu_uuid=gpu_uuid, gpu_index=gpu.index, pipe_dir=pipe_dir, log_dir=log_dir,
                             pinned_mem_limit_mib=pinned, active_thread_percentage=percentage)

    def edits(self, gpu_uuid: str, limits: MpsLimits) -> DeviceEdits:
        pipe_dir, _, shm_dir = mps_dirs(self.mps_root, gpu_uuid)
        return client_edits(pipe_dir, shm_dir, limits.pinned_memory_limit_mib, limits.active_thread_percentage)

    # -- MpsProvider -----------------------------------------------------------------------------------------------

    async def acquire(self, claim_uid: str, gpu_uuid: str, limits: MpsLimits) -> DeviceEdits:
        gpu = self._gpus.get(gpu_uuid)
        if gpu is None:
            raise SideEffectError(f"GPU {gpu_uuid} is not on this node")
        if limits.device_uuid != gpu_uuid:
            raise SideEffectError(f"MPS on MIG device {limits.device_uuid} is not supported: nvdp runs MPS control "
                                  "daemons for whole GPUs only")
        async with self._lock:
            claims = self._holders.setdefault(gpu_uuid, {})
            before = list(claims.get(claim_uid, []))
            # Idempotent: the same device of the same claim again (a retry) replaces its entry.
            claims[claim_uid] = [held for held in before if held.device_uuid != limits.device_uuid] + [limits]
            try:
                await self._converge(gpu_uuid)
            except SideEffectError:
                if before:
                    claims[claim_uid] = before
                else:
                    del claims[claim_uid]
                await self._settle(gpu_uuid)
                raise
        return self.edits(gpu_uuid, limits)

    async def release(self, claim_uid: str) -> None:
        async with self._lock:
            for gpu_uuid in [uuid for uuid, claims in self._holders.items() if claim_uid in claims]:
                del self._holders[gpu_uuid][claim_uid]
                await self._settle(gpu_uuid)

    async def restore(self, holdings: Sequence[tuple[str, str, MpsLimits]]) -> None:
        async with self._lock:
            for claim_uid, gpu_uuid, limits in holdings:
                if gpu_uuid not in self._gpus or limits.device_uuid != gpu_uuid:
                    log.warning("DRA MPS: claim %s holds MPS on %s, which this node no longer runs a daemon for",
                                claim_uid, limits.device_uuid)
                    continue
                self._holders.setdefault(gpu_uuid, {}).setdefault(claim_uid, []).append(limits)
            running = self.daemons.supervisor.specs
            new = [self.spec(uuid) for uuid in self._holders if uuid not in running]
            # Adopt each daemon with the limits it serves: a crash between a limit change and the checkpoint write
            # leaves them off from what the checkpoint implies, and adoption with other limits would restart the
            # daemon (ending every client). They are changed in place afterwards.
            first = []
            for wanted in new:
                served = await self.daemons.served_limits(wanted)
                first.append(wanted if served is None else replace(
                    wanted, pinned_mem_limit_mib=served[0], active_thread_percentage=served[1]))
            try:
                await self.daemons.apply([*running.values(), *first])
            except MpsError as e:
                log.warning("DRA MPS: restoring the daemons: %s; they are retried", e)
            for adopted, wanted in zip(first, new, strict=True):
                if adopted != wanted and wanted.gpu_uuid in self.daemons.supervisor.specs:
                    try:
                        await self.daemons.update_limits(wanted)
                    except MpsError as e:
                        log.warning("DRA MPS: %s; the next claim on the GPU tries again", e)

    # -- the daemons -----------------------------------------------------------------------------------------------

    async def _converge(self, gpu_uuid: str) -> None:
        """The GPU's daemon runs, answers, and has the limits its claims need; else `SideEffectError`."""
        warm = self._warm.pop(gpu_uuid, None)
        if warm is not None:
            warm.cancel()
        wanted = self.spec(gpu_uuid)
        running = self.daemons.supervisor.specs
        label = f"GPU {wanted.gpu_index} ({gpu_uuid})"
        try:
            if gpu_uuid not in running:
                await self.daemons.apply([*running.values(), wanted])
            elif running[gpu_uuid] != wanted:
                await self.daemons.update_limits(wanted)
        except MpsError as e:
            raise SideEffectError(f"MPS control daemon for {label}: {e}") from None
        if not self.daemons.healthy.get(gpu_uuid):
            child = self.daemons.supervisor.children.get(gpu_uuid)
            why = child.last_error if child is not None and child.last_error else "it does not answer"
            raise SideEffectError(f"MPS control daemon for {label} is not serving: {why}")

    async def _settle(self, gpu_uuid: str) -> None:
        """After a claim left the GPU: lower its limits, or remove (or keep warm) an idle daemon. Never raises: a
        release must not fail on the daemon (a lower default that did not take stays higher, and is logged)."""
        if self._holders.get(gpu_uuid):
            wanted = self.spec(gpu_uuid)
            running = self.daemons.supervisor.specs.get(gpu_uuid)
            if running is not None and running != wanted:
                try:
                    await self.daemons.update_limits(wanted)
                except MpsError as e:
                    log.warning("DRA MPS: %s; the higher default stays until the daemon takes it", e)
            return
        self._holders.pop(gpu_uuid, None)
        if gpu_uuid not in self.daemons.supervisor.specs:
            return
        if self.keep_warm_s > 0:
            if gpu_uuid not in self._warm:
                scope = trio.CancelScope()
                self._warm[gpu_uuid] = scope
                self._nursery.start_soon(self._stop_when_cold, gpu_uuid, scope)
            return
        await self._remove(gpu_uuid)

    async def _stop_when_cold(self, gpu_uuid: str, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.keep_warm_s)
            async with self._lock:
                if self._warm.get(gpu_uuid) is scope and not self._holders.get(gpu_uuid):
                    del self._warm[gpu_uuid]
                    log.info("DRA MPS: GPU %s had no claim for %g s: removing its daemon", gpu_uuid,
                             self.keep_warm_s)
                    await self._remove(gpu_uuid)

    async def _remove(self, gpu_uuid: str) -> None:
        remaining = [spec for uuid, spec in self.daemons.supervisor.specs.items() if uuid != gpu_uuid]
        try:
            await self.daemons.apply(remaining)
        except MpsError as e:  # pragma: no cover - apply raises only for daemons it starts, and none starts here
            log.warning("DRA MPS: removing the daemon of %s: %s", gpu_uuid, e)
