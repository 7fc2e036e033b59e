"""ResourceClaims and node devices for the DRA preparation tests."""

from __future__ import annotations

from typing import Any

from nvdp.core.dra.claims import NodeDevice
from nvdp.core.inventory import Gpu, MigDevice

DRIVER = "gpu.nvidia.com"
NODE = "node-a"
V = "resource.nvidia.com/v1beta1"

MIG = MigDevice(uuid="MIG-11111111-1111-1111-1111-111111111111", index=0, profile="1g.10gb", memory_mib=9728, gi=1,
                ci=0, gi_profile_id=19, placement_start=0)
GPU0 = Gpu(index=0, uuid="GPU-00000000-0000-0000-0000-000000000000", name="A100", memory_mib=40960, minor=0,
           pci_bus_id="00000000:10:00.0", compute_capability="8.0")
GPU1 = Gpu(index=1, uuid="GPU-00000000-0000-0000-0000-000000000001", name="A100", memory_mib=40960, minor=1,
           pci_bus_id="00000000:20:00.0", compute_capability="8.0", mig_enabled=True, mig_devices=(MIG,))
GPU2 = Gpu(index=2, uuid="GPU-00000000-0000-0000-0000-000000000002", name="A100", memory_mib=40960, minor=2,
           pci_bus_id="00000000:30:00.0", compute_capability="8.0")
MIG_NAME = "gpu-1-mig-1g10gb-19-0"
DEVICES = {"gpu-0": NodeDevice(GPU0), "gpu-2": NodeDevice(GPU2), MIG_NAME: NodeDevice(GPU1, MIG)}


def result(device: str, request: str = "gpu", **extra: Any) -> dict[str, Any]:
    return {"request": request, "driver": DRIVER, "pool": NODE, "device": device, **extra}


def opaque(parameters: dict[str, Any], requests: list[str] | None = None, source: str = "FromClaim",
           driver: str = DRIVER) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": source, "opaque": {"driver": driver, "parameters": parameters}}
    if requests is not None:
        entry["requests"] = requests
    return entry


def gpu_config(strategy: str | None = None, **sharing: Any) -> dict[str, Any]:
    parameters: dict[str, Any] = {"apiVersion": V, "kind": "GpuConfig"}
    if strategy is not None:
        parameters["sharing"] = {"strategy": strategy, **sharing}
    return parameters


def mig_config(strategy: str | None = None, **sharing: Any) -> dict[str, Any]:
    parameters: dict[str, Any] = {"apiVersion": V, "kind": "MigDeviceConfig"}
    if strategy is not None:
        parameters["sharing"] = {"strategy": strategy, **sharing}
    return parameters


def claim(uid: str, results: list[dict[str, Any]], config: list[dict[str, Any]] | None = None,
          name: str = "", namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name or f"claim-{uid}", "namespace": namespace, "uid": uid, "resourceVersion": "7"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}},
        "status": {"allocation": {"devices": {"results": results, "config": config or []}},
                   "reservedFor": [{"resource": "pods", "name": "p", "uid": "pod-1"}]},
    }
