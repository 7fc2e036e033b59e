"""Time slices of whole GPUs for DRA claims with `sharing.strategy: TimeSlicing`, the way NVIDIA's driver sets them.

NVML has no public call for the compute policy's time slice; NVIDIA's DRA driver runs `nvidia-smi -i <uuid> -c
DEFAULT` and then `nvidia-smi compute-policy -i <uuid> --set-timeslice <0-3>`, and so does `NvidiaSmiTimeSlicer`.
Without `nvidia-smi` (`find_nvidia_smi` returns None) the daemon gives the preparer no time slicer, and only the
`Default` interval is accepted (`nvdp.dra.prepare`).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from nvdp.dra.prepare import SideEffectError

NVIDIA_SMI = "nvidia-smi"
#: nvidia-smi can take seconds on a busy node (it initialises NVML); past this a call is killed and the claim fails.
DEFAULT_TIMEOUT_S = 10.0
#: What is kept of nvidia-smi's output in an error message.
_MAX_OUTPUT = 300


def find_nvidia_smi(driver_root: Path, path_env: str) -> Path | None:
    """`nvidia-smi` from PATH, else from the driver root's `usr/bin` or `bin`; None when there is none."""
    searched = [Path(entry) for entry in path_env.split(os.pathsep) if entry]
    searched += [driver_root / "usr/bin", driver_root / "bin"]
    for directory in searched:
        candidate = directory / NVIDIA_SMI
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class NvidiaSmiTimeSlicer:
    """A `TimeSlicer` that runs nvidia-smi, each call bounded by `timeout_s`."""

    def __init__(self, binary: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.binary = binary
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"NvidiaSmiTimeSlicer({str(self.binary)!r})"

    async def set_interval(self, gpu_uuid: str, interval: int) -> None:
        await self._run("-i", gpu_uuid, "-c", "DEFAULT")
        await self._run("compute-policy", "-i", gpu_uuid, "--set-timeslice", str(interval))

    async def _run(self, *args: str) -> None:
        command = [str(self.binary), *args]
        shown = " ".join([NVIDIA_SMI, *args])
        try:
            with trio.move_on_after(self.timeout_s) as scope:
                result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                                deliver_cancel=_kill_now)
        except OSError as e:
            raise SideEffectError(f"cannot run {shown}: {e}") from e
        if scope.cancelled_caught:
            raise SideEffectError(f"{shown} did not finish within {self.timeout_s:g} s")
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode(errors="replace").strip()
            output = output[:_MAX_OUTPUT].encode("unicode_escape").decode("ascii")
            raise SideEffectError(f"{shown} failed with exit status {result.returncode}: {output or 'no output'}")


async def _kill_now(process: trio.Process) -> None:
    # nvidia-smi keeps no state a kill could leave half-done beyond the setting it was changing.
    process.kill()
