"""`nvdp config validate FILE [--simulate NODE]`: check a config file and print the resource plan."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from nvdp.config.errors import ConfigError
from nvdp.config.load import load_config_file
from nvdp.config.settings import resolve
from nvdp.plan.build import PlanError, build_plan
from nvdp.plan.model import Plan


def format_plan(plan: Plan) -> str:
    if not plan.resources:
        return "no resources: this node would advertise nothing"
    lines = []
    for resource in plan.resources:
        lines.append(f"{resource.name}  ({len(resource.devices)} devices, socket {resource.socket_name}, "
                     f"sharing {resource.sharing.value})")
        lines += [f"  {d.id}  index {d.index}  paths {' '.join(d.paths)}" for d in resource.devices]
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
