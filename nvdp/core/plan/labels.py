"""Node labels that describe sharing, in the form GPU Feature Discovery writes them, as an NFD local feature file.

Schedulers and the MPS/time-slicing tooling built around upstream read these labels (nos, for one, reads
`nvidia.com/gpu.product`-style labels; upstream's MPS daemonset is gated on `nvidia.com/mps.capable`). nvdp knows the
plan, so it writes them itself and node-feature-discovery's worker publishes them, with no GFD deployment:

- `nvidia.com/<resource>.replicas`: replicas per physical device (1 when not shared);
- `nvidia.com/<resource>.sharing-strategy`: `time-slicing`, `mps` or `none` (`none` unless replicas > 1);
- `nvidia.com/<resource>.product`: the GPU's sanitised product name, `-MIG-<profile>` for MIG resources, and
  `-SHARED` when the resource is replicated under its own name (a renamed shared resource gets no suffix, as
  upstream);
- `nvidia.com/mps.capable`: `true` when a resource is shared through MPS, else `false`.

`sharing_labels()` and `render_features()` are pure; `nvdp.nfd.write_features_file()` puts them on disk.
"""

from __future__ import annotations

import re
from collections import Counter

from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.build import mig_resource_name
from nvdp.core.plan.model import RESOURCE_PREFIX, Device, Plan, Resource, Sharing

MPS_CAPABLE = "nvidia.com/mps.capable"

_UNWANTED = re.compile(r"[^A-Za-z0-9\-_. ]")
_SPACES = re.compile(r"\s+")


def sanitise(name: str) -> str:
    """GFD's label-value form of a product name: characters outside `[A-Za-z0-9-_. ]` dropped, runs of
    whitespace made one `-`."""
    return _SPACES.sub("-", _UNWANTED.sub("", name).strip())


def _mig_profile(device: Device, inventory: NodeInventory) -> str | None:
    gpu = inventory.gpu_by_uuid(device.gpu_uuid)
    if gpu is None:
        return None
    return next((m.profile for m in gpu.mig_devices if m.uuid == device.physical_id), None)


def _replicas(resource: Resource) -> int:
    """Per physical device, as upstream emits it (not the node total: upstream issue #732)."""
    if not resource.devices:
        return 0
    counts = Counter(d.physical_id for d in resource.devices)
    return max(counts.values())


def _product(resource: Resource, inventory: NodeInventory, shared: bool) -> str | None:
    device = resource.devices[0]
    gpu = inventory.gpu_by_uuid(device.gpu_uuid)
    if gpu is None:
        return None
    product = sanitise(gpu.name)
    # Upstream's own names: `gpu` (whole GPUs, or MIG devices under the single strategy) and `mig-<profile>`.
    own_names = {"gpu"}
    if device.mig_placement is not None:
        profile = _mig_profile(device, inventory)
        if profile is not None:
            product += f"-MIG-{profile}"
            own_names.add(mig_resource_name(profile).removeprefix(RESOURCE_PREFIX))
    renamed = resource.short_name not in own_names
    if shared and not renamed:
        product += "-SHARED"
    return product


def sharing_labels(plan: Plan, inventory: NodeInventory) -> dict[str, str]:
    """The labels for `plan` on this node, sorted by key. A resource with no devices gets none."""
    labels: dict[str, str] = {}
    mps = False
    for resource in plan.resources:
        if not resource.devices:
            continue
        replicas = _replicas(resource)
        shared = resource.sharing is not Sharing.NONE and replicas > 1
        prefix = RESOURCE_PREFIX + resource.short_name
        labels[f"{prefix}.replicas"] = str(replicas)
        labels[f"{prefix}.sharing-strategy"] = str(resource.sharing) if shared else "none"
        product = _product(resource, inventory, shared)
        if product:
            labels[f"{prefix}.product"] = product
        mps |= shared and resource.sharing is Sharing.MPS
    labels[MPS_CAPABLE] = "true" if mps else "false"
    return dict(sorted(labels.items()))


def render_features(labels: dict[str, str]) -> str:
    """NFD's local feature file format: one `key=value` per line."""
    return "".join(f"{key}={value}\n" for key, value in sorted(labels.items()))
