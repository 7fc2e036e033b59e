"""Which IMEX channels containers get: those the settings ask for that the node has (pure).

Upstream's rules (`internal/imex`): a requested channel whose device node is missing is skipped with a warning, or,
with `imex.required`, refuses the config with `requested IMEX channel channel<N> does not exist`. The refusal is a
`PlanError` raised while the plan is built (`build_plan` calls `require_imex_channels`), so it behaves as any other
refused config (docs/compatibility.md): nvdp exits at start with a static config file, serves nothing until it is
fixed with a config directory or ConfigMap, and keeps the running config on a reload. The channels themselves go
into each resource server's `AllocateOptions` (`select_imex_channels`, once per applied plan).
"""

from __future__ import annotations

import logging

from nvdp.core.config.settings import Settings
from nvdp.core.inventory import NodeInventory, imex_channel_path
from nvdp.core.plan.build import PlanError

log = logging.getLogger(__name__)


def _missing(inventory: NodeInventory, settings: Settings) -> list[int]:
    return [c for c in dict.fromkeys(settings.imex_channel_ids) if c not in inventory.imex_channels]


def _where(channel: int, settings: Settings) -> str:
    return f"no character device {imex_channel_path(channel)} under the dev root {settings.dev_root}"


def require_imex_channels(inventory: NodeInventory, settings: Settings) -> None:
    """Raises PlanError, in upstream's words, when a required channel is missing."""
    missing = _missing(inventory, settings) if settings.imex_required else []
    if missing:
        channel = missing[0]
        raise PlanError(f"requested IMEX channel channel{channel} does not exist ({_where(channel, settings)}); it "
                        "is required (--imex-required, IMEX_REQUIRED or $.imex.required): load the driver with the "
                        "channel or stop requiring it")


def select_imex_channels(inventory: NodeInventory, settings: Settings) -> tuple[int, ...]:
    """The requested channels the node has, in request order; a missing one is skipped with upstream's warning."""
    for channel in _missing(inventory, settings):
        log.warning("Ignoring requested IMEX channel channel%d (%s)", channel, _where(channel, settings))
    return tuple(c for c in dict.fromkeys(settings.imex_channel_ids) if c in inventory.imex_channels)
