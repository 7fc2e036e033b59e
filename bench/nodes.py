"""The simulated nodes and config files the benchmark runs nvdp on (written as YAML into the run's work directory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

DRIVER = {"driverVersion": "580.82.07", "cudaDriverVersion": 13000}

#: A100 40GB MIG profiles: (profile, memory MiB, GPU-instance ids in placement order).
MIG_1G_5GB = ("1g.5gb", 4864, (7, 8, 9, 10, 11, 12, 13))
MIG_2G_10GB = ("2g.10gb", 9856, (3, 4, 5))


def gpu_uuid(index: int) -> str:
    return f"GPU-{index:08d}-bbbb-4ccc-8ddd-000000000000"


def mig_uuid(gpu: int, slot: int) -> str:
    return f"MIG-{gpu:08d}-{slot:04d}-4eee-8fff-000000000000"


def gpu(index: int, mig: tuple[str, int, tuple[int, ...]] | None = None, mig_count: int = 0,
        numa_per: int = 4) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uuid": gpu_uuid(index),
        "name": "NVIDIA A100-SXM4-40GB",
        "memoryMiB": 40960,
        "computeCapability": "8.0",
        "pciBusId": f"00000000:{0x10 + index:02X}:00.0",
        "minorNumber": index,
        "numaNode": index // numa_per,
    }
    if mig is not None:
        profile, memory, gis = mig
        entry["migEnabled"] = True
        entry["migDevices"] = [
            {"uuid": mig_uuid(index, slot), "profile": profile, "memoryMiB": memory, "gi": gis[slot], "ci": 0}
            for slot in range(mig_count or len(gis))]
    return entry


def write(path: Path, data: dict[str, Any]) -> Path:
    # JSON (which is YAML): nvdp's simulator reads it without importing PyYAML, as a real node reads no node file;
    # the Go plugin under `--against` reads none either.
    path.write_text(json.dumps(data, indent=1))
    return path


def four_gpus(path: Path) -> Path:
    """4 whole A100s, two per NUMA node, NVLink all-to-all (the shape of nvdp's default node)."""
    links = [[i, j, 12] for i in range(4) for j in range(i + 1, 4)]
    return write(path, {**DRIVER, "gpus": [gpu(i, numa_per=2) for i in range(4)], "nvlinks": links})


#: DGX-1-like hybrid cube mesh: each GPU has NVLinks to four peers, one of them doubled.
HYBRID_CUBE_MESH = [
    [0, 1, 1], [0, 2, 1], [0, 3, 2], [0, 4, 2], [1, 2, 2], [1, 3, 1], [1, 5, 2], [2, 3, 1], [2, 6, 2],
    [3, 7, 2], [4, 5, 1], [4, 6, 1], [4, 7, 2], [5, 6, 2], [5, 7, 1], [6, 7, 1],
]


def eight_gpus_nvlink(path: Path) -> Path:
    """8 whole GPUs, two NUMA nodes, NVLink hybrid cube mesh: GetPreferredAllocation has choices to weigh."""
    return write(path, {**DRIVER, "gpus": [gpu(i) for i in range(8)], "nvlinks": HYBRID_CUBE_MESH})


def eight_gpus_mig(path: Path) -> Path:
    """8 A100s, each split into 7 MIG 1g.5gb devices: 56 MIG devices."""
    return write(path, {**DRIVER, "gpus": [gpu(i, MIG_1G_5GB) for i in range(8)], "nvlinks": HYBRID_CUBE_MESH})


def mixed_mig(path: Path) -> Path:
    """GPUs 0-1 whole, GPU 2 as 7 x 1g.5gb, GPU 3 as 3 x 2g.10gb: three resources under --mig-strategy mixed."""
    gpus = [gpu(0, numa_per=2), gpu(1, numa_per=2), gpu(2, MIG_1G_5GB, numa_per=2),
            gpu(3, MIG_2G_10GB, numa_per=2)]
    return write(path, {**DRIVER, "gpus": gpus})


def config(path: Path, data: dict[str, Any]) -> Path:
    """Writes a v1 config file atomically (a reload never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"version": "v1", **data}, sort_keys=False))
    tmp.replace(path)
    return path


def time_slicing(resources: list[dict[str, Any]], **flags: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"sharing": {"timeSlicing": {"resources": resources}}}
    if flags:
        data["flags"] = flags
    return data
