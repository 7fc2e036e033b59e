"""MPS for DRA claims through nvdp's own per-GPU control daemons (`nvdp.mps`), as for the device plugin.

NVIDIA's DRA driver starts a Deployment per claim, which needs RBAC to create workloads; nvdp runs one supervised
control daemon per GPU that some claim shares with MPS, under the same supervisor as the device plugin's daemons
(`MpsDaemons`, owned by the controller). A claim's MPS device gets the daemon's pipe directory and the node's MPS
shm as mounts, `CUDA_MPS_PIPE_DIRECTORY`, and its limits as the clients' environment:
`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` and `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` (ordinal 0: the container's first GPU).

`DraMps` keeps which claims use which GPU; the controller turns `specs()` into daemons (`apply`) and tells it when
a daemon answers (`daemon_health`). Whole GPUs only: nvdp does not run MPS on MIG devices.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from nvdp.core.dra.claims import DeviceEdits, Mount
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.allocate import MPS_SHM_CONTAINER_PATH
from nvdp.core.plan.model import MpsDaemonSpec
from nvdp.core.plan.sharing import mps_dirs
from nvdp.dra.prepare import MpsLimits, SideEffectError

#: How long a claim waits for its GPU's control daemon to answer before its prepare fails (the kubelet retries).
READY_TIMEOUT_S = 10.0


class DraMps:
    """`MpsProvider` over the controller's MPS daemons (see the module docstring)."""

    def __init__(self, mps_root: str, apply: Callable[[], Awaitable[None]], *,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.mps_root = mps_root
        self._apply = apply
        self.ready_timeout_s = ready_timeout_s
        #: claim UID -> GPU UUIDs it uses MPS on.
        self.claims: dict[str, set[str]] = {}
        self.inventory = NodeInventory(driver_version="", cuda_driver_version=0, gpus=())
        self._healthy: dict[str, bool] = {}
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<DraMps gpus={sorted(self.gpus)} claims={len(self.claims)}>"

    @property
    def gpus(self) -> set[str]:
        return {gpu for used in self.claims.values() for gpu in used}

    def specs(self) -> tuple[MpsDaemonSpec, ...]:
        """One control daemon per GPU some claim uses MPS on, by GPU index."""
        specs = []
        for gpu in sorted(self.inventory.gpus, key=lambda g: g.index):
            if gpu.uuid not in self.gpus:
                continue
            pipe, log, _ = mps_dirs(self.mps_root, gpu.uuid)
            # Each client sets its own limits (environment); the daemon's defaults are the whole GPU.
            specs.append(MpsDaemonSpec(gpu.uuid, gpu.index, pipe, log, gpu.memory_mib, 100))
        return tuple(specs)

    def daemon_health(self, gpu_uuid: str, healthy: bool) -> None:
        """The controller's MPS health callback: a daemon answers (or stopped answering)."""
        self._healthy[gpu_uuid] = healthy
        self._changed.set()
        self._changed = trio.Event()

    async def acquire(self, claim_uid: str, gpu_uuid: str, limits: MpsLimits) -> DeviceEdits:
        if not self.mps_root:
            raise SideEffectError("MPS needs --mps-root (MPS_ROOT): nvdp has no directory for its control daemons")
        if limits.device_uuid != gpu_uuid:
            raise SideEffectError("MPS on MIG devices is not supported by nvdp; share the whole GPU")
        if self.inventory.gpu_by_uuid(gpu_uuid) is None:
            raise SideEffectError(f"GPU {gpu_uuid} is not on this node")
        self.claims.setdefault(claim_uid, set()).add(gpu_uuid)
        await self._apply()
        with trio.move_on_after(self.ready_timeout_s):
            while not self._healthy.get(gpu_uuid):
                await self._changed.wait()
        if not self._healthy.get(gpu_uuid):
            raise SideEffectError(f"the MPS control daemon of GPU {gpu_uuid} did not answer within "
                                  f"{self.ready_timeout_s:g} s; the kubelet will retry")
        pipe, _, shm = mps_dirs(self.mps_root, gpu_uuid)
        env = [f"CUDA_MPS_PIPE_DIRECTORY={pipe}"]
        if limits.active_thread_percentage is not None:
            env.append(f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={limits.active_thread_percentage}")
        if limits.pinned_memory_limit_mib is not None:
            env.append(f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={limits.pinned_memory_limit_mib}M")
        return DeviceEdits(env=tuple(env), mounts=(Mount(host_path=pipe, container_path=pipe),
                                                   Mount(host_path=shm, container_path=MPS_SHM_CONTAINER_PATH)))

    async def release(self, claim_uid: str) -> None:
        if self.claims.pop(claim_uid, None) is not None:
            await self._apply()

    def set_inventory(self, inventory: NodeInventory) -> None:
        self.inventory = inventory
