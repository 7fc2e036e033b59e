"""The device plugin's CDI specs on disk follow the plan: found, built, written (or removed) in one call.

`update_device_plugin_specs` is what the controller calls whenever it applies a plan (start, reload, MIG change, a
GPU gone), before servers advertise devices. Failures are logged here, precisely, and never stop serving: the specs
already on disk stay as they were. Without a CDI device list strategy it only removes nvdp's old files, so the scan
(`nvdp.cdi.discover`) and the spec model (`nvdp.core.cdi.build`) are imported where specs are built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from nvdp.cdi import CdiError
from nvdp.cdi.writer import SyncResult, sync_specs
from nvdp.core.cdi.names import VENDOR
from nvdp.core.config.settings import Settings
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.model import Plan

if TYPE_CHECKING:
    from nvdp.cdi.discover import ScanRoots
    from nvdp.core.cdi.build import CdiOptions, DevicePluginSpecs, DriverFiles

log = logging.getLogger(__name__)

#: Every device-plugin spec file nvdp writes starts with this; nothing else in the CDI root is touched.
OWNED_PREFIX = f"{VENDOR}-"


def cdi_options(settings: Settings, host_driver_root: str, host_dev_root: str) -> CdiOptions:
    from nvdp.core.cdi.build import CdiOptions

    return CdiOptions(
        hook_path=settings.nvidia_cdi_hook_path,
        disabled_hooks=frozenset(settings.cdi_disable_hooks),
        feature_flags=frozenset(settings.cdi_feature_flags),
        host_driver_root=host_driver_root,
        host_dev_root=host_dev_root,
        device_id_strategy=settings.device_id_strategy,
        imex_channel_ids=settings.imex_channel_ids,
        gds_enabled=settings.gds_enabled,
        mofed_enabled=settings.mofed_enabled,
        gdrcopy_enabled=settings.gdrcopy_enabled,
    )


def scan_roots(settings: Settings, simulated_root: Path | None) -> tuple[ScanRoots, str, str]:
    """(where to scan, host driver root, host dev root). A simulated node's root is its own host."""
    from nvdp.cdi.discover import ScanRoots, choose_roots

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
    from nvdp.cdi.discover import discover_driver_files

    roots, host_driver, host_dev = scan_roots(settings, simulated_root)
    files = await discover_driver_files(roots, inventory)
    for note in files.notes:
        log.warning("CDI: %s", note)
    return files, cdi_options(settings, host_driver, host_dev)


async def build_specs(settings: Settings, inventory: NodeInventory, plan: Plan,
                      simulated_root: Path | None) -> DevicePluginSpecs:
    from nvdp.core.cdi.build import device_plugin_specs

    files, options = await load_driver_files(settings, inventory, simulated_root)
    return device_plugin_specs(inventory, plan.resources, files, options)


async def prepare_device_plugin_specs(
    settings: Settings, inventory: NodeInventory, plan: Plan, simulated_root: Path | None = None
) -> DevicePluginSpecs | None:
    """The specs the plan needs (scanned and built, nothing written yet), or None when nvdp writes no specs or the
    scan failed (logged)."""
    if settings.cdi_root is None or not settings.cdi_enabled:
        return None
    try:
        built = await build_specs(settings, inventory, plan, simulated_root)
    except (CdiError, trio.TooSlowError, OSError) as exc:
        _log_failure(settings.cdi_root, exc)
        return None
    for note in built.notes:
        log.warning("CDI: %s", note)
    return built


async def update_device_plugin_specs(
    settings: Settings, inventory: NodeInventory, plan: Plan, simulated_root: Path | None = None,
    built: DevicePluginSpecs | None = None,
) -> SyncResult | None:
    """Write the specs the plan needs into `--cdi-root` (with a CDI device list strategy), or remove nvdp's old
    ones (without). `built` is what `prepare_device_plugin_specs` returned, when the caller already has it.
    Returns what changed; None when nothing was attempted or it failed (logged)."""
    root = settings.cdi_root
    if root is None:
        return None
    if settings.cdi_enabled and built is None:
        built = await prepare_device_plugin_specs(settings, inventory, plan, simulated_root)
        if built is None:
            return None
    try:
        result = await sync_specs(root, built.specs if built is not None else {}, OWNED_PREFIX)
    except (CdiError, OSError) as exc:
        _log_failure(root, exc)
        return None
    for name in result.written:
        log.info("CDI: wrote %s", root / name)
    for name in result.removed:
        log.info("CDI: removed %s (no longer needed)", root / name)
    for name, why in result.failed_removals:
        log.error("CDI: stale spec %s not removed: %s", root / name, why)
    return result


def _log_failure(root: Path, exc: Exception) -> None:
    from nvdp.cdi.discover import SCAN_TIMEOUT_S

    reason = (f"scanning the driver root took longer than {SCAN_TIMEOUT_S:.0f} s"
              if isinstance(exc, trio.TooSlowError) else str(exc))
    log.error("CDI specs in %s not updated: %s; the specs already there stay as they were, so a container asking "
              "for a %s device they do not define fails to start (its runtime reports unresolvable CDI devices); "
              "serving continues", root, reason, VENDOR)
