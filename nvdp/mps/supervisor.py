"""The node's MPS control daemons: one supervised child per MPS-shared GPU (`nvdp.supervise`), like the resource
servers.

A child is one life of its GPU's daemon (`run_mps_daemon`: adopt the running daemon or start one, probe it); when a
life ends (`DaemonFailed`: the daemon exited, lost its pipe directory, never answered) the supervisor starts the
next one after its backoff, and the GPU's slices are Unhealthy meanwhile. Ending a life never ends the daemon: the
daemon runs detached from nvdp (docs/mps.md), so nvdp's own restart leaves MPS clients alone.

`MpsDaemons.apply(specs)` reconciles: removed or changed daemons are *removed* first (`stop_mps_daemon`: quit, the
compute mode restored), new ones started second, unchanged ones left alone. It returns once every new daemon has
answered or failed its first life (then it is retried in the background); new daemons start concurrently, so a
node of 8 GPUs waits for the slowest, not for the sum. It raises `MpsError` only when a daemon cannot be set up at
all (its directories cannot be created); the others are running by then.

`release()` is what nvdp's clean exit does: with a launcher that owns the daemons (nvdp's own, `LocalLauncher`),
remove them all (SIGTERM means removal); with the MPS host, leave them to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from nvdp.core.plan.model import MpsDaemonSpec
from nvdp.core.supervision import Backoff, reconcile
from nvdp.mps.control_daemon import (
    DEFAULT_PATH,
    DEFAULT_TIMINGS,
    ComputeModeControl,
    DaemonFailed,
    DaemonState,
    DaemonTimings,
    MpsError,
    gpu_label,
    run_mps_daemon,
    served_limits,
    set_daemon_limits,
    stop_mps_daemon,
)
from nvdp.mps.launcher import DaemonPaths, Launcher, LocalLauncher, make_dirs
from nvdp.supervise import ChildFailed, SupervisionReporter, Supervisor

log = logging.getLogger(__name__)


def child_name(gpu_uuid: str) -> str:
    """How a daemon's child is named in logs, metrics (`child` label) and /readyz."""
    return f"mps {gpu_uuid}"


@dataclass(eq=False)
class RunningDaemon:
    """A wanted daemon, as its supervisor sees it (the state lives across lives)."""

    spec: MpsDaemonSpec
    state: DaemonState

    def __repr__(self) -> str:
        return (f"<RunningDaemon {gpu_label(self.spec)} pid={self.state.pid} healthy={self.state.healthy} "
                f"starts={self.state.starts} adoptions={self.state.adoptions}>")


class MpsDaemons:
    """Owns the MPS control daemons; only one task (the daemon's controller) calls its async methods."""

    def __init__(
        self,
        nursery: trio.Nursery,
        control: Path,
        compute_mode: ComputeModeControl,
        on_health: Callable[[str, bool], None],
        *,
        on_probe: Callable[[str, float], None] | None = None,
        timings: DaemonTimings = DEFAULT_TIMINGS,
        path_env: str = DEFAULT_PATH,
        launcher: Launcher | None = None,
        reporter: SupervisionReporter | None = None,
    ) -> None:
        #: Who starts the daemons: nvdp itself (local) unless the MPS host.
        self.launcher = launcher or LocalLauncher(control, path_env)
        self.control = control
        self._compute_mode = compute_mode
        self._on_health = on_health
        self._on_probe = on_probe
        self._timings = timings
        self._path_env = path_env
        self._states: dict[str, DaemonState] = {}
        #: GPUs whose daemon is being removed: a life cancelled for them quits the daemon.
        self._removing: set[str] = set()
        backoff = Backoff(first_s=timings.restart_first_s, max_s=timings.restart_max_s,
                          reset_after_s=timings.restart_max_s)
        self._supervisor: Supervisor[str, MpsDaemonSpec] = Supervisor(
            nursery, self._life, name=child_name, backoff=backoff, reporter=reporter)

    def __repr__(self) -> str:
        states = ", ".join(
            f"GPU {r.spec.gpu_index}: pid {r.state.pid} {_health_word(r.state.healthy)}"
            for r in self.running.values())
        return f"<MpsDaemons {states or 'none'}>"

    @property
    def supervisor(self) -> Supervisor[str, MpsDaemonSpec]:
        return self._supervisor

    @property
    def running(self) -> Mapping[str, RunningDaemon]:
        return {uuid: RunningDaemon(child.spec, self._states[uuid])
                for uuid, child in self._supervisor.children.items()}

    @property
    def healthy(self) -> Mapping[str, bool]:
        """GPU UUID -> whether its daemon answers now."""
        return {uuid: self._states[uuid].healthy is True for uuid in self._supervisor.children}

    async def apply(self, specs: Sequence[MpsDaemonSpec]) -> None:
        wanted: dict[str, MpsDaemonSpec] = {}
        for spec in specs:
            if spec.gpu_uuid in wanted:
                raise ValueError(f"two MPS daemons for one GPU: {spec.gpu_uuid}")
            wanted[spec.gpu_uuid] = spec
        actions = reconcile(wanted, self._supervisor.specs)
        await self._remove_many(list(actions.stop))
        new = [wanted[uuid] for uuid in actions.start]
        # What cannot be set up at all is an error of this reconcile, not a child to retry forever.
        errors: list[str] = []
        ready: list[tuple[str, MpsDaemonSpec]] = []
        for spec in new:
            try:
                await trio.to_thread.run_sync(make_dirs, DaemonPaths.of(spec))
            except OSError as exc:
                errors.append(f"cannot create the MPS directories of {gpu_label(spec)}: {exc}")
                continue
            self._states[spec.gpu_uuid] = DaemonState()
            ready.append((spec.gpu_uuid, spec))
        await self._supervisor.start_many(ready)
        if errors:
            raise MpsError("; ".join(errors))

    async def update_limits(self, spec: MpsDaemonSpec) -> None:
        """Change the limits of a GPU's daemon in place (`set_daemon_limits`: no restart, its clients untouched);
        its later lives, and adoption after nvdp restarts, use `spec`. Raises `MpsError` when the daemon does not
        take them (it keeps the old defaults then)."""
        old = self._supervisor.specs[spec.gpu_uuid]
        if (old.pipe_dir, old.log_dir) != (spec.pipe_dir, spec.log_dir):
            raise ValueError(f"update_limits cannot move the daemon of {spec.gpu_uuid} to other directories")
        self._supervisor.update_spec(spec.gpu_uuid, spec)
        try:
            await set_daemon_limits(spec, control=self.control, launcher=self.launcher, timings=self._timings,
                                    path_env=self._path_env)
        except MpsError:
            self._supervisor.update_spec(spec.gpu_uuid, old)
            raise

    async def served_limits(self, spec: MpsDaemonSpec) -> tuple[int, int] | None:
        """(pinned MiB, active thread percentage) a daemon on `spec`'s pipe directory serves now (running or not
        under this `MpsDaemons`), or None when none answers."""
        return await served_limits(spec, control=self.control, launcher=self.launcher, timings=self._timings,
                                   path_env=self._path_env)

    async def stop_all(self) -> None:
        """Remove every daemon (quit, compute modes restored)."""
        await self._remove_many(list(self._supervisor.children))

    async def release(self) -> None:
        """nvdp is exiting cleanly: remove the daemons it owns; leave the MPS host's to the host."""
        if self.launcher.owns_daemons:
            await self.stop_all()
        else:
            log.info("leaving the MPS control daemons to %s", self.launcher.describe())
            await self._supervisor.stop_all()

    async def _remove_many(self, uuids: list[str]) -> None:
        # Concurrently: each removal may wait its full bound (a hung daemon), and they are independent.
        async with trio.open_nursery() as removing:
            for uuid in uuids:
                removing.start_soon(self._remove, uuid)

    async def _remove(self, uuid: str) -> None:
        spec = self._supervisor.specs[uuid]
        log.info("removing the MPS daemon for %s", gpu_label(spec))
        self._removing.add(uuid)
        try:
            await self._supervisor.stop(uuid)
            # Also when the child was between two lives (its life's own removal did not run then); a daemon that
            # is gone already costs one failed lookup.
            with trio.CancelScope(shield=True):
                await self._stop_daemon(spec)
        finally:
            self._removing.discard(uuid)
            self._states.pop(uuid, None)

    async def _stop_daemon(self, spec: MpsDaemonSpec) -> None:
        await stop_mps_daemon(spec, control=self.control, launcher=self.launcher, compute_mode=self._compute_mode,
                              timings=self._timings, path_env=self._path_env, state=self._states.get(spec.gpu_uuid))

    async def _life(self, uuid: str, spec: MpsDaemonSpec, *, task_status: trio.TaskStatus[None]) -> None:
        """One life (a child run of the supervisor)."""
        state = self._states.setdefault(uuid, DaemonState())
        try:
            await run_mps_daemon(spec, control=self.control, launcher=self.launcher, compute_mode=self._compute_mode,
                                 on_health=self._on_health, timings=self._timings,
                                 path_env=self._path_env, state=state, on_probe=self._on_probe,
                                 task_status=task_status)
        except (DaemonFailed, MpsError) as exc:
            state.last_exit = str(exc)
            state.pid = None
            if state.healthy is not False:
                state.healthy = False
                self._on_health(uuid, False)
            raise ChildFailed(f"MPS daemon for {gpu_label(spec)}: {exc}") from None
        except BaseException as exc:
            # Cancelled (possibly inside the life's own nursery's group): a removal, or nvdp ending.
            cancelled = isinstance(exc, trio.Cancelled) or (
                isinstance(exc, BaseExceptionGroup) and exc.subgroup(trio.Cancelled) is not None)
            if cancelled and (uuid in self._removing or self.launcher.owns_daemons):
                # Cancelled for a removal, or nvdp ending with daemons it owns: quit it now, while its pid is known.
                with trio.CancelScope(shield=True):
                    await self._stop_daemon(spec)
            raise


def _health_word(healthy: bool | None) -> str:
    return {True: "healthy", False: "unhealthy", None: "starting"}[healthy]
