"""`python -m bench.dra_shares [--shares N] [--cold N] [--json PATH]`: DRA MPS shares, prepare and unprepare.

Measures, in-process (the ClaimPreparer and the MPS provider as the daemon wires them, the API and CDI writer as
in-memory stand-ins, the fake `nvidia-cuda-mps-control` from nvdp/sim as the GPU's control daemon):

* `share_prepare_ms` / `share_unprepare_ms`: one share of 2 GiB on a GPU whose daemon already runs (a share of
  1 GiB holds it): checkpoint writes, accounting, the daemon's limits raised (and lowered again: the new share is
  the largest), the CDI edits;
* `first_share_to_daemon_answering_ms`: the first share of an idle GPU, from the prepare call until it returns,
  which it does once the freshly started daemon has answered and taken its limits (so: daemon start + first
  answer + limits + checkpoint).

The fake daemon is a Python program (each control command starts an interpreter, ~30 ms); NVIDIA's is a C binary,
so on a GPU node the daemon-bound figures are smaller. Compare runs on one machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from bench.harness import SIM_BIN, latency_stats
from nvdp.core.dra.claims import DeviceEdits, NodeDevice
from nvdp.core.dra.shares import decode_mps_shares, share_policy
from nvdp.core.dra.types import ClaimRef
from nvdp.core.inventory import Gpu
from nvdp.dra.mps_shares import MpsShares
from nvdp.dra.prepare import ClaimPreparer
from nvdp.mps.control_daemon import DaemonTimings
from nvdp.mps.launcher import LocalLauncher
from nvdp.mps.supervisor import MpsDaemons

DRIVER = "gpu.nvidia.com"
NODE = "bench-node"
GPU = Gpu(index=0, uuid="GPU-bench000-0000-0000-0000-000000000000", name="A100", memory_mib=81920, minor=0,
          pci_bus_id="00000000:10:00.0", compute_capability="8.0")
CONTROL = SIM_BIN / "nvidia-cuda-mps-control"
PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])


class Api:
    def __init__(self) -> None:
        self.claims: dict[str, dict[str, Any]] = {}

    def add(self, uid: str, memory: str) -> ClaimRef:
        self.claims[uid] = {
            "metadata": {"name": f"claim-{uid}", "namespace": "bench", "uid": uid},
            "status": {"allocation": {"devices": {"results": [
                {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0", "shareID": f"share-{uid}",
                 "consumedCapacity": {"memory": memory}}], "config": []}}}}
        return ClaimRef("bench", uid, f"claim-{uid}")

    async def get(self, namespace: str, name: str) -> Mapping[str, object] | None:
        return self.claims.get(name.removeprefix("claim-"))


class Cdi:
    def __init__(self) -> None:
        self.specs: dict[str, Sequence[tuple[str, NodeDevice, DeviceEdits]]] = {}

    async def write(self, claim_uid: str,
                    devices: Sequence[tuple[str, NodeDevice, DeviceEdits]]) -> Mapping[str, tuple[str, ...]]:
        self.specs[claim_uid] = devices
        return {name: (f"k8s.gpu.nvidia.com/claim={claim_uid}-{name}",) for name, _, _ in devices}

    async def remove(self, claim_uid: str) -> None:
        self.specs.pop(claim_uid, None)

    async def list_claims(self) -> set[str]:
        return set(self.specs)


class ComputeMode:
    def __init__(self) -> None:
        self.mode = 0

    def get(self, gpu_uuid: str) -> int:
        return self.mode

    def set(self, gpu_uuid: str, mode: int) -> None:
        self.mode = mode


async def measure(shares: int, cold: int, root: Path) -> dict[str, dict[str, float]]:
    api, cdi = Api(), Cdi()
    policy = share_policy(GPU, decode_mps_shares({"devices": [0], "memory": {"minimum": "256Mi",
                                                                             "step": "256Mi"}}))
    timings = DaemonTimings(probe_interval_s=1.0, stop_timeout_s=2.0)
    prepare_ms: list[float] = []
    unprepare_ms: list[float] = []
    first_ms: list[float] = []
    async with trio.open_nursery() as nursery:
        daemons = MpsDaemons(nursery, CONTROL, ComputeMode(), lambda uuid, healthy: None, timings=timings,
                             path_env=PATH, launcher=LocalLauncher(CONTROL, PATH))
        provider = MpsShares(nursery, daemons, [GPU], str(root))
        preparer = ClaimPreparer(DRIVER, NODE, root / "checkpoint.json", "bench-boot", api, cdi, provider,
                                 {"gpu-0": NodeDevice(GPU)}, share_hosts={"gpu-0": policy})
        for i in range(cold):
            ref = api.add(f"cold-{i}", "1Gi")
            began = time.perf_counter()
            answer = (await preparer.prepare([ref]))[ref.uid]
            first_ms.append((time.perf_counter() - began) * 1000)
            if answer.error:
                raise RuntimeError(answer.error)
            if i == cold - 1:
                break  # keep the last one: it holds the daemon for the warm figures
            await preparer.unprepare([ref])
        for i in range(shares):
            # Larger than the share that holds the daemon: each prepare raises the daemon's default and each
            # unprepare lowers it again, the costly path.
            ref = api.add(f"s-{i}", "2Gi")
            began = time.perf_counter()
            answer = (await preparer.prepare([ref]))[ref.uid]
            prepare_ms.append((time.perf_counter() - began) * 1000)
            if answer.error:
                raise RuntimeError(answer.error)
            began = time.perf_counter()
            await preparer.unprepare([ref])
            unprepare_ms.append((time.perf_counter() - began) * 1000)
        await preparer.unprepare([ClaimRef("bench", f"cold-{cold - 1}", f"claim-cold-{cold - 1}")])
        await daemons.release()
        nursery.cancel_scope.cancel()
    return {"share_prepare_ms": latency_stats(prepare_ms), "share_unprepare_ms": latency_stats(unprepare_ms),
            "first_share_to_daemon_answering_ms": latency_stats(first_ms)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dra_shares", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=int, default=50, help="warm prepare/unprepare pairs (default 50)")
    parser.add_argument("--cold", type=int, default=5, help="first shares on an idle GPU (default 5)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.shares < 1 or args.cold < 1:
        parser.error("--shares and --cold must be at least 1")
    # Unix socket paths are limited to 107 bytes: a short root.
    with tempfile.TemporaryDirectory(prefix="nvdp-bench-shares-") as directory:
        figures = trio.run(measure, args.shares, args.cold, Path(directory))
    for name, stats in figures.items():
        print(f"{name:38} n={stats['n']:.0f} p50={stats['p50']:.1f} p90={stats['p90']:.1f} "
              f"p99={stats['p99']:.1f} max={stats['max']:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
