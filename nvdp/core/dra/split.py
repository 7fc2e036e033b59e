"""Which GPU goes where: DRA or the device plugin, never both.

With DRA on, `dra.devices` chooses GPUs (all by default, the first N by index, or GPU indices and UUIDs); each
chosen GPU, with every MIG device on it, is served through DRA only, and the device plugin plans the rest as
if the chosen GPUs were not there. `nvdp config validate` prints the split and the plan records it
(`Plan.dra_gpus`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nvdp.core.config.dra import Dra
from nvdp.core.config.sharing import device_ref_kind
from nvdp.core.inventory import Gpu, NodeInventory


class DraSplitError(ValueError):
    """`dra.devices` names a GPU this node does not have, or more GPUs than it has."""


@dataclass(frozen=True, slots=True)
class GpuSplit:
    #: UUIDs of the GPUs served through DRA, by GPU index.
    dra: tuple[str, ...]
    #: UUIDs of the GPUs left to the device plugin, by GPU index.
    device_plugin: tuple[str, ...]

    def describe(self, inventory: NodeInventory) -> list[str]:
        """One line per GPU: `GPU 0 (GPU-…): DRA`."""
        where = dict.fromkeys(self.dra, "DRA") | dict.fromkeys(self.device_plugin, "device plugin")
        return [f"GPU {g.index} ({g.uuid}): {where.get(g.uuid, '?')}"
                for g in sorted(inventory.gpus, key=lambda g: g.index)]


def split_gpus(inventory: NodeInventory, enabled: bool, config: Dra | None) -> GpuSplit:
    """The GPUs DRA serves and those the device plugin serves (pure; `DraSplitError` names what does not fit)."""
    gpus = sorted(inventory.gpus, key=lambda g: g.index)
    if not enabled:
        return GpuSplit(dra=(), device_plugin=tuple(g.uuid for g in gpus))
    chosen = _chosen(gpus, config or Dra())
    return GpuSplit(dra=tuple(g.uuid for g in gpus if g.uuid in chosen),
                    device_plugin=tuple(g.uuid for g in gpus if g.uuid not in chosen))


def _chosen(gpus: Sequence[Gpu], config: Dra) -> set[str]:
    selection = config.selection()
    if selection.is_all:
        return {g.uuid for g in gpus}
    if selection.count is not None:
        if selection.count > len(gpus):
            raise DraSplitError(f"$.dra.devices: {selection.count} GPUs requested for DRA, but this node has "
                                f"{len(gpus)}")
        # The first N by index, so the choice is the same on every start.
        return {g.uuid for g in gpus[:selection.count]}
    chosen: set[str] = set()
    for ref in selection.refs:
        kind = device_ref_kind(ref)
        hit = next((g for g in gpus if (str(g.index) == str(int(ref)) if kind == "gpu-index" else g.uuid == ref)),
                   None)
        if hit is None:
            known = ", ".join(str(g.index) for g in gpus) or "none"
            raise DraSplitError(f"$.dra.devices: {ref!r}: no such GPU on this node (GPU indices: {known})")
        chosen.add(hit.uuid)
    return chosen
