"""Helpers shared by the tests: simulated-node files. The daemon in-process and the waits are in tests/harness.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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
