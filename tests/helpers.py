"""Helpers shared by the tests: simulated-node files and the daemon running in-process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
import yaml

from nvdp.core.config.settings import Settings
from nvdp.daemon import run_daemon
from nvdp.kubelet.servers import ResourceServers
from nvdp.testing.kubelet_emulator import KubeletEmulator

ROOT = Path(__file__).resolve().parent.parent
def gpu(index: int, **overrides: Any) -> dict[str, Any]:
    entry = {
        "uuid": f"GPU-{index:08d}-aaaa-bbbb-cccc-000000000000",
        "name": "NVIDIA A100-SXM4-40GB",
        "memoryMiB": 40960,
        "computeCapability": "8.0",
        "pciBusId": f"00000000:{0x10 + index:02x}:00.0",
        "minorNumber": index,
        "numaNode": index // 2,
    }
    entry.update(overrides)
    return entry


def write_node(path: Path, gpus: list[dict[str, Any]], **extra: Any) -> Path:
    node = {"driverVersion": "580.82.07", "cudaDriverVersion": 13000, "gpus": gpus, **extra}
    path.write_text(yaml.safe_dump(node, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[ResourceServers]:
    """Run the daemon in-process until the block ends; yields once every resource is registered."""
    async with trio.open_nursery() as nursery:
        servers = await nursery.start(
            lambda task_status: run_daemon(settings, handle_signals=False, task_status=task_status))
        yield servers
        nursery.cancel_scope.cancel()


async def wait_for(kubelet: KubeletEmulator, predicate: Any, limit_s: float = 5.0) -> bool:
    """Wait (in a thread) until the emulator's state satisfies `predicate`, for at most `limit_s`."""
    return await trio.to_thread.run_sync(kubelet.wait_for, predicate, limit_s)
