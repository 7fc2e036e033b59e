"""`nvdp config validate FILE [--simulate NODE]`: check a config file and print the resource plan."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import load_config_file
from nvdp.core.config.settings import resolve
from nvdp.core.plan.build import PlanError, build_plan
from nvdp.core.plan.model import Device, Plan, Sharing


def _device_line(device: Device) -> str:
    line = f"  {device.id}  index {device.index}  paths {' '.join(device.paths)}"
    mps = device.mps
    if mps is not None:
        size = f"{mps.memory_gb} GB" if mps.memory_gb is not None else f"{mps.memory_limit_mib} MiB"
        line += f"  mps memory {size}  compute {mps.active_thread_percentage}%  pipe {mps.pipe_dir}"
    return line


def format_plan(plan: Plan) -> str:
    if not plan.resources:
        return "no resources: this node would advertise nothing"
    lines = []
    for resource in plan.resources:
        header = (f"{resource.name}  ({len(resource.devices)} devices, socket {resource.socket_name}, "
                  f"sharing {resource.sharing.value}")
        if resource.sharing is not Sharing.NONE:
            header += f", failRequestsGreaterThanOne {str(resource.fail_requests_greater_than_one).lower()}"
        lines.append(header + ")")
        lines += [_device_line(d) for d in resource.devices]
    for daemon in plan.mps_daemons:
        lines.append(f"MPS control daemon for GPU {daemon.gpu_index} ({daemon.gpu_uuid}): "
                     f"pinned memory limit {daemon.pinned_mem_limit_mib} MiB, "
                     f"active thread percentage {daemon.active_thread_percentage}%, "
                     f"pipe {daemon.pipe_dir}, log {daemon.log_dir}")
    return "\n".join(lines)


def validate_config(path: Path, simulate: Path | None) -> int:
    """Exit code 0 when the file is valid (and makes a plan on the simulated node, if given), else 1."""
    try:
        config = load_config_file(path)
        # Only the file is checked: flags and env vars of this shell must not mask its errors.
        settings = resolve({}, {}, config, config_source=str(path))
        print(f"{path}: valid")
        if simulate is None:
            return 0
        from nvdp import sim
        from nvdp.nvml import adapter

        with tempfile.TemporaryDirectory(prefix="nvdp-validate-") as tmp:
            handle = sim.activate(sim.load_node(simulate), Path(tmp))
            adapter.init()
            try:
                inventory = adapter.read_inventory(handle.host_root, handle.host_root)
            finally:
                adapter.shutdown()
        print(format_plan(build_plan(inventory, settings)))
        return 0
    except (ConfigError, PlanError) as exc:
        print(f"nvdp: {exc}", file=sys.stderr)
        return 1
