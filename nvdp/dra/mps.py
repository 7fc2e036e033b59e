"""MPS for DRA claims where nvdp cannot run control daemons.

Where MPS can run, DRA's `MpsProvider` is `nvdp.dra.mps_shares.MpsShares`: one supervised control daemon per GPU
that some claim shares with MPS (an MPS `GpuConfig`, or a share of a `dra.sharing.mps` host), apart from the device
plugin's daemons (the plan gives the two APIs different GPUs). NVIDIA's DRA driver starts a Deployment per claim,
which needs RBAC to create workloads; nvdp needs none.

`MpsUnavailable` stands in where nvdp has no MPS root or no control program: a claim that asks for MPS fails with
the reason (the kubelet shows it in the pod's events), every other claim is prepared as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nvdp.core.dra.claims import DeviceEdits
from nvdp.dra.prepare import MpsLimits, SideEffectError

log = logging.getLogger(__name__)


class MpsUnavailable:
    """`MpsProvider` of a node where nvdp runs no MPS control daemons for DRA."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"<MpsUnavailable {self.why!r}>"

    async def acquire(self, claim_uid: str, gpu_uuid: str, limits: MpsLimits) -> DeviceEdits:
        raise SideEffectError(self.why)

    async def release(self, claim_uid: str) -> None:
        return None

    async def restore(self, holdings: Sequence[tuple[str, str, MpsLimits]]) -> None:
        for claim_uid, gpu_uuid, _ in holdings:
            log.warning("DRA MPS: claim %s holds MPS on GPU %s, but %s", claim_uid, gpu_uuid, self.why)
