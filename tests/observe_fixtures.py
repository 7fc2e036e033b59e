"""A small node and plan for the observability tests: two GPUs, a whole-GPU resource and a shared one."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest

from nvdp.core.inventory import Gpu, NodeInventory
from nvdp.core.plan.model import Device, MpsDaemonSpec, Plan, Resource, Sharing
from nvdp.observe.metrics import Metrics
from nvdp.observe.status import Samples

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
GPU1 = "GPU-00000001-aaaa-bbbb-cccc-000000000000"


def inventory() -> NodeInventory:
    gpus = tuple(Gpu(i, uuid, "NVIDIA A100-SXM4-40GB", 40960, i, f"00000000:1{i}:00.0", "8.0", mig_enabled=i == 1)
                 for i, uuid in enumerate((GPU0, GPU1)))
    return NodeInventory("580.82.07", 13000, gpus)


def _device(uuid: str, index: int, replica: int | None = None) -> Device:
    device_id = uuid if replica is None else f"{uuid}::{replica}"
    return Device(device_id, uuid, str(index), uuid, index, (f"/dev/nvidia{index}",), replica=replica)


def plan(replicas: int = 2, mps: bool = False) -> Plan:
    whole = Resource("nvidia.com/gpu", (_device(GPU0, 0),))
    shared = Resource("nvidia.com/gpu.shared", tuple(_device(GPU1, 1, n) for n in range(replicas)),
                      Sharing.MPS if mps else Sharing.TIME_SLICING)
    daemons = (MpsDaemonSpec(GPU1, 1, "/mps/pipe", "/mps/log", 20000, 50),) if mps else ()
    return Plan((whole, shared), daemons)


def scrape(metrics: Metrics) -> Samples:
    """Render with prometheus-client and read back with its text parser: what Prometheus would see."""
    return Samples.parse(generate_latest(metrics.registry).decode())
