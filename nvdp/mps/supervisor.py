"""The node's MPS control daemons, reconciled by diff like the resource servers.

`MpsDaemons.apply(specs)` compares the wanted daemons (one per MPS-shared GPU, keyed by GPU UUID) with the running
ones: removed or changed daemons are stopped first (quit, compute mode restored), new ones started second, and
unchanged ones are left alone, so their MPS clients keep running.

`apply()` returns once every new daemon has either answered (healthy) or failed its first start attempt (reported
unhealthy through `on_health`, bounded by `DaemonTimings.start_timeout_s`, and still retrying in the background).
New daemons start concurrently, so a node of 8 GPUs waits for the slowest, not for the sum. It raises `MpsError`
only when a daemon cannot be set up at all (its directories cannot be created); the others are running by then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from nvdp.core.plan.model import MpsDaemonSpec
from nvdp.mps.control_daemon import (
    DEFAULT_PATH,
    DEFAULT_TIMINGS,
    ComputeModeControl,
    DaemonState,
    DaemonTimings,
    MpsError,
    gpu_label,
    serve_mps_daemon,
)
from nvdp.mps.launcher import Launcher, LocalLauncher

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RunningDaemon:
    spec: MpsDaemonSpec
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: DaemonState = field(default_factory=DaemonState)
    stopped: trio.Event = field(default_factory=trio.Event)
    # h2-mps: set before a removal (the plan no longer wants it): its daemon is quit, not just left running.
    removing: bool = False

    def __repr__(self) -> str:
        return (f"<RunningDaemon {gpu_label(self.spec)} pid={self.state.pid} healthy={self.state.healthy} "
                f"starts={self.state.starts}>")


class MpsDaemons:
    """Owns the running MPS control daemons; only one task (the daemon's controller) calls its async methods."""

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
    ) -> None:
        self._nursery = nursery
        # h2-mps: who starts the daemons; local (nvdp's own, removed on cancellation) unless the MPS host.
        self.launcher = launcher or LocalLauncher(control, path_env)
        self.control = control
        self._compute_mode = compute_mode
        self._on_health = on_health
        self._on_probe = on_probe
        self._timings = timings
        self._path_env = path_env
        self._running: dict[str, RunningDaemon] = {}

    def __repr__(self) -> str:
        states = ", ".join(
            f"GPU {r.spec.gpu_index}: pid {r.state.pid} {_health_word(r.state.healthy)}"
            for r in self._running.values())
        return f"<MpsDaemons {states or 'none'}>"

    @property
    def running(self) -> Mapping[str, RunningDaemon]:
        return self._running

    @property
    def healthy(self) -> Mapping[str, bool]:
        """GPU UUID -> whether its daemon answers now."""
        return {uuid: r.state.healthy is True for uuid, r in self._running.items()}

    async def apply(self, specs: Sequence[MpsDaemonSpec]) -> None:
        wanted: dict[str, MpsDaemonSpec] = {}
        for spec in specs:
            if spec.gpu_uuid in wanted:
                raise ValueError(f"two MPS daemons for one GPU: {spec.gpu_uuid}")
            wanted[spec.gpu_uuid] = spec
        stale = [uuid for uuid, running in self._running.items() if wanted.get(uuid) != running.spec]
        await self._stop_many(stale)
        await self._start_many([spec for uuid, spec in wanted.items() if uuid not in self._running])

    async def stop_all(self) -> None:
        await self._stop_many(list(self._running))

    async def _start_many(self, specs: list[MpsDaemonSpec]) -> None:
        errors: list[str] = []

        async def start(spec: MpsDaemonSpec) -> None:
            try:
                await self._start(spec)
            except MpsError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as starting:
            for spec in specs:
                starting.start_soon(start, spec)
        if errors:
            raise MpsError("; ".join(errors))

    async def _start(self, spec: MpsDaemonSpec) -> None:
        running = RunningDaemon(spec)
        self._running[spec.gpu_uuid] = running
        try:
            await self._nursery.start(self._serve, running)
        except BaseException:
            self._running.pop(spec.gpu_uuid, None)
            raise

    async def _stop_many(self, uuids: list[str]) -> None:
        # Concurrently: each stop may wait its full bound (a hung daemon), and they are independent.
        async with trio.open_nursery() as stopping:
            for uuid in uuids:
                stopping.start_soon(self._stop, uuid)

    async def _stop(self, uuid: str) -> None:
        running = self._running.pop(uuid)
        log.info("stopping the MPS daemon for %s", gpu_label(running.spec))
        running.removing = True  # h2-mps
        running.scope.cancel()
        await running.stopped.wait()

    async def _serve(self, running: RunningDaemon, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with running.scope:
                await serve_mps_daemon(
                    running.spec,
                    control=self.control,
                    compute_mode=self._compute_mode,
                    on_health=self._on_health,
                    timings=self._timings,
                    path_env=self._path_env,
                    state=running.state,
                    on_probe=self._on_probe,
                    # h2-mps: cancelled for a removal, or at shutdown with daemons nvdp owns: quit the daemon.
                    launcher=self.launcher,
                    removal=lambda: running.removing or self.launcher.owns_daemons,
                    task_status=task_status,
                )
        finally:
            running.stopped.set()


def _health_word(healthy: bool | None) -> str:
    return {True: "healthy", False: "unhealthy", None: "starting"}[healthy]
