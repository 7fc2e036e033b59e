"""`nvdp mps-host`: the process that owns the MPS control daemons when they must outlive nvdp (docs/mps.md).

An entry point: it puts the MPS host server (`nvdp.mps.host`) together with NVML (to restore compute modes) and,
with --simulate, the simulated node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from functools import partial
from pathlib import Path

import trio

from nvdp.mps.control_daemon import ComputeModeControl
from nvdp.mps.host import serve_mps_host
from nvdp.mps.launcher import LaunchError

log = logging.getLogger(__name__)


def host_main(
    mps_root: str, *, socket_path: str | None, driver_root: Path, simulate: Path | None, search_path: str,
) -> int:
    """`nvdp mps-host`: serve until SIGTERM or SIGINT (then remove every daemon); exit 0. 1 on a start-up error."""
    import tempfile

    from nvdp.mps.control_daemon import MpsError, NvmlComputeMode, find_control_binary
    from nvdp.nvml import adapter

    if not mps_root or not mps_root.startswith("/"):
        log.error("nvdp mps-host needs an absolute MPS root (--mps-root or MPS_ROOT), got %r", mps_root)
        return 1
    with contextlib.ExitStack() as stack:
        if simulate is not None:
            from nvdp import sim  # only the simulation needs a C compiler

            # The simulated node brings a fake nvidia-cuda-mps-control beside its fake libnvidia-ml.
            search_path = f"{Path(sim.__file__).parent}{os.pathsep}{search_path}"
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdp-sim-")))
            handle = sim.activate(sim.load_node(simulate), workdir)
            driver_root = handle.host_root
        try:
            control = find_control_binary(driver_root, search_path)
        except MpsError as exc:
            log.error("%s", exc)
            return 1
        compute_mode: ComputeModeControl | None = None
        try:
            adapter.init()
        except adapter.NvmlError as exc:
            log.warning("NVML is not available (%s): compute modes are not restored when the daemons are removed",
                        exc)
        else:
            stack.callback(adapter.shutdown)
            compute_mode = NvmlComputeMode()

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    await nursery.start(partial(serve_mps_host, Path(mps_root), control=control,
                                                compute_mode=compute_mode,
                                                socket_path=Path(socket_path) if socket_path else None,
                                                path_env=search_path))
                    async for signum in signals:
                        log.info("MPS host: received %s", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break

        try:
            trio.run(run)
        except BaseExceptionGroup as group:
            failed, rest = group.split(LaunchError)
            if failed is None or rest is not None:
                raise
            leaf: BaseException = failed
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            log.error("%s", leaf)
            return 1
    return 0
