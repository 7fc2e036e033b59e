"""The `dra` section of the config file: which GPUs nvdp serves through DRA (`resource.k8s.io/v1`).

`devices` takes the selector syntax of `sharing.*.devices` (`all`, a count, or a list of references), at the
granularity DRA is switched on: whole GPUs. A MIG reference is refused here, with what to write instead: a GPU's MIG
devices go wherever their GPU goes.
"""

from __future__ import annotations

import msgspec

from nvdp.core.config.sharing import DeviceSelection, _check_devices, device_ref_kind
from nvdp.core.dra.shares import MpsSharesSpec

DEFAULT_DRIVER_NAME = "gpu.nvidia.com"


class DraSharing(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """`dra.sharing`: how GPUs served through DRA are shared between claims."""

    #: Dynamic MPS shares through consumable capacity (`nvdp.core.dra.shares`, docs/dra.md "MPS shares").
    mps: MpsSharesSpec | None = None


class Dra(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    enabled: bool | None = None
    #: The DRA driver name (`--dra-driver-name`); NVIDIA's by default, so its DeviceClasses and claims work as they are.
    driver_name: str | None = None
    #: `all` (the default), the first N GPUs by index, or a list of GPU indices and UUIDs.
    devices: str | int | list[int | str] | None = None
    sharing: DraSharing | None = None

    def __post_init__(self) -> None:
        self.devices = _check_devices(self.devices)
        if isinstance(self.devices, list):
            for ref in self.devices:
                if device_ref_kind(str(ref)) in ("mig-index", "mig-uuid"):
                    raise ValueError(
                        f"devices: {ref!r} is a MIG device: DRA is chosen per GPU (its MIG devices go with it); "
                        "name the GPU by index or UUID")

    def selection(self) -> DeviceSelection:
        return DeviceSelection.of(self.devices)
