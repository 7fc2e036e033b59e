"""Which IMEX channels containers get: those the settings ask for that the node has (pure).

Upstream's rules (`internal/imex`): a requested channel whose device node is missing is skipped with a warning, or,
with `imex.required`, refuses the config with `requested IMEX channel channel<N> does not exist`. The refusal is a
`PlanError`, so it behaves as any other refused config (docs/compatibility.md): nvdp exits at start with a static
config file, serves nothing until it is fixed with a config directory or ConfigMap, and keeps the running config on
a reload.
"""

from __future__ import annotations

import logging

from nvdp.core.config.settings import Settings
from nvdp.core.inventory import NodeInventory, imex_channel_path
from nvdp.core.plan.build import PlanError

log = logging.getLogger(__name__)


def select_imex_channels(inventory: NodeInventory, settings: Settings) -> tuple[int, ...]:
    """The requested channels the node has, in request order; raises PlanError for a missing required one."""
    selected = []
    for channel in dict.fromkeys(settings.imex_channel_ids):
        if channel in inventory.imex_channels:
            selected.append(channel)
            continue
        where = f"no character device {imex_channel_path(channel)} under the dev root {settings.dev_root}"
        if settings.imex_required:
            raise PlanError(f"requested IMEX channel channel{channel} does not exist ({where}); it is required "
                            "(--imex-required, IMEX_REQUIRED or $.imex.required): load the driver with the channel "
                            "or stop requiring it")
        log.warning("Ignoring requested IMEX channel channel%d (%s)", channel, where)
    return tuple(selected)
