"""The device plugin's CDI specs on disk follow the plan: found, built, written (or removed) in one call.

`update_device_plugin_specs` is what the controller calls whenever it applies a plan (start, reload, MIG change, a
GPU gone), before servers advertise devices. Failures are logged here, precisely, and never stop serving: the specs
already on disk stay as they were.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from nvdp.cdi import CdiError
from nvdp.cdi.discover import SCAN_TIMEOUT_S, ScanRoots, choose_roots, discover_driver_files
from nvdp.cdi.writer import SyncResult, sync_specs
from nvdp.core.cdi.build import VENDOR, CdiOptions, DevicePluginSpecs, DriverFiles, device_plugin_specs
from nvdp.core.config.settings import Settings
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.model import Plan

log = logging.getLogger(__name__)

#: Every device-plugin spec file nvdp writes starts with this; nothing else in the CDI root is touched.
OWNED_PREFIX = f"{VENDOR}-"


def cdi_options(settings: Settings, host_driver_root: str, host_dev_root: str) -> CdiOptions:
    config_imex = settings.config.imex.channel_ids if settings.config.imex is not None else None
    # `imex_channel_ids` is the resolved setting once IMEX options exist; the config file's list until then.
    imex = getattr(settings, "imex_channel_ids", None) or config_imex or ()
    return CdiOptions(
        hook_path=settings.nvidia_cdi_hook_path,
        disabled_hooks=frozenset(settings.cdi_disable_hooks),
        feature_flags=frozenset(settings.cdi_feature_flags),
        host_driver_root=host_driver_root,
        host_dev_root=host_dev_root,
        device_id_strategy=settings.device_id_strategy,
        imex_channel_ids=tuple(imex),
        gds_enabled=settings.gds_enabled,
        mofed_enabled=settings.mofed_enabled,
        gdrcopy_enabled=settings.gdrcopy_enabled,
    )


def scan_roots(settings: Settings, simulated_root: Path | None) -> tuple[ScanRoots, str, str]:
    """(where to scan, host driver root, host dev root). A simulated node's root is its own host."""
    if simulated_root is not None:
        roots = ScanRoots(simulated_root, simulated_root, sys_root=simulated_root, proc_root=simulated_root,
                          plain_file_nodes=True, kernel_release="simulated")
        return roots, str(simulated_root), str(simulated_root)
    roots, how = choose_roots(settings.container_driver_root, settings.driver_root, settings.dev_root)
    log.debug("CDI: %s", how)
    return roots, str(settings.driver_root), str(settings.dev_root)


async def load_driver_files(settings: Settings, inventory: NodeInventory,
                            simulated_root: Path | None = None) -> tuple[DriverFiles, CdiOptions]:
    """The node's driver files and the options to build edits from them (what DRA's per-claim specs need too:
    `common_edits(files, options)`, `gpu_edits(gpu, files, options)`, `mig_edits(...)`). What was not found is
    logged as warnings. Raises trio.TooSlowError past the scan's bound."""
    roots, host_driver, host_dev = scan_roots(settings, simulated_root)
    files = await discover_driver_files(roots, inventory)
    for note in files.notes:
        log.warning("CDI: %s", note)
    return files, cdi_options(settings, host_driver, host_dev)


async def build_specs(settings: Settings, inventory: NodeInventory, plan: Plan,
                      simulated_root: Path | None) -> DevicePluginSpecs:
    files, options = await load_driver_files(settings, inventory, simulated_root)
    return device_plugin_specs(inventory, plan.resources, files, options)


async def update_device_plugin_specs(
    settings: Settings, inventory: NodeInventory, plan: Plan, simulated_root: Path | None = None
) -> SyncResult | None:
    """Write the specs the plan needs into `--cdi-root` (with a CDI device list strategy), or remove nvdp's old
    ones (without). Returns what changed; None when nothing was attempted or it failed (logged)."""
    root = settings.cdi_root
    if root is None:
        return None
    try:
        if settings.cdi_enabled:
            built = await build_specs(settings, inventory, plan, simulated_root)
            for note in built.notes:
                log.warning("CDI: %s", note)
            specs = built.specs
        else:
            specs = {}
        result = await sync_specs(root, specs, OWNED_PREFIX)
    except (CdiError, trio.TooSlowError, OSError) as exc:
        reason = (f"scanning the driver root took longer than {SCAN_TIMEOUT_S:.0f} s"
                  if isinstance(exc, trio.TooSlowError) else str(exc))
        log.error("CDI specs in %s not updated: %s; the specs already there stay as they were, so a container asking "
                  "for a %s device they do not define fails to start (its runtime reports unresolvable CDI devices); "
                  "serving continues", root, reason, VENDOR)
        return None
    for name in result.written:
        log.info("CDI: wrote %s", root / name)
    for name in result.removed:
        log.info("CDI: removed %s (no longer needed)", root / name)
    for name, why in result.failed_removals:
        log.error("CDI: stale spec %s not removed: %s", root / name, why)
    return result
