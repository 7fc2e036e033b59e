"""What only sysfs knows about a GPU for its DRA attributes: the PCIe root complex it hangs off.

`resource.kubernetes.io/pcieRoot` lets a claim ask for devices under one root (a GPU and a NIC for GPUDirect). The
root is the `pci<domain>:<bus>` directory under `/sys/devices` that the PCI device's sysfs path goes through
(`/sys/bus/pci/devices/0000:07:00.0` -> `/sys/devices/pci0000:00/0000:00:01.0/0000:07:00.0` -> `pci0000:00`),
the value Kubernetes' `deviceattribute` helper publishes. A device sysfs does not show gets no attribute.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_ROOT = re.compile(r"^pci[0-9a-f]{4}:[0-9a-f]{2}$")


def pcie_roots(bus_ids: Iterable[str], sys_root: Path = Path("/sys")) -> dict[str, str]:
    """Standard PCI bus ID (`0000:07:00.0`) -> its PCIe root (`pci0000:00`), for those sysfs resolves."""
    roots: dict[str, str] = {}
    for bus_id in bus_ids:
        link = sys_root / "bus" / "pci" / "devices" / bus_id
        try:
            parts = link.resolve(strict=True).relative_to((sys_root / "devices").resolve()).parts
        except (OSError, ValueError) as exc:
            log.debug("no PCIe root for %s: %s", bus_id, exc)
            continue
        if parts and _ROOT.match(parts[0]):
            roots[bus_id] = parts[0]
    return roots
