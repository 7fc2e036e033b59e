"""`nvdp config validate [FILE ...]`: check configs with the deployed settings and print what the node will do.

It takes the same flags and environment variables as `nvdp run` (`nvdp.cli._add_options`, from `OPTIONS`), so the
deployed settings (`MIG_STRATEGY`, `MPS_ROOT`, `--device-list-strategy`, ...) are reproduced. Each config gets one
report, in this order, and nothing after its verdict:

1. `errors`: every error found, not only the first: each flag and environment variable is checked on its own, the
   config file's keys are decoded again with each faulty key left out, and on a node (`--simulate`) each sharing
   entry is planned on its own before the whole config is (cross-entry checks: overlaps, memory per GPU);
2. `warnings`: those of the config (`load_config` and `collect_warnings`, the hooks for the config warnings of the
   pure core) and what planning logs as a warning (a resource this node lacks, MPS on a pre-Volta GPU);
3. `notes`: what was assumed (the chart's MPS root when none is given) and, without a node, which checks need one;
4. `plan`: per MPS resource the memory limit and compute percentage of each client and where the percentage came
   from; on a node, the whole resource plan;
5. the verdict: `valid` (exit 0, warnings allowed) or `invalid` (exit 1). With `--strict` warnings are errors.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import yaml

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import parse_config_with_warnings, read_config_bytes
from nvdp.core.config.schema import Config
from nvdp.core.config.selection import check_fallbacks
from nvdp.core.config.settings import OPTIONS, Settings, resolve
from nvdp.core.config.sharing import Mps, ReplicatedResource, TimeSlicing
from nvdp.core.dra.split import split_gpus
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.build import PlanError, build_plan
from nvdp.core.plan.imex import select_imex_channels
from nvdp.core.plan.model import Device, Plan, Sharing
from nvdp.core.plan.sharing import gb

#: The Helm chart's `mps.root`, which it passes as MPS_ROOT: assumed when a config uses MPS and no MPS root is given.
CHART_MPS_ROOT = "/run/nvidia/mps"

#: What cannot be checked without a node; printed when `--simulate` is not given.
NODE_CHECKS = (
    "the devices each sharing entry selects exist on the node (indices, UUIDs, MIG devices)",
    "MPS slices fit each GPU's memory and its MPS client limit (48, or 16 before Volta)",
    "the node's MIG layout suits the MIG strategy",
    "the resource plan: resources, device IDs, MPS daemons and each slice's limits on real GPUs",
    "requested IMEX channels exist on the node (imex.channelIDs; a missing one is an error with imex.required)",
)

#: Stop decoding again after this many errors, or for files larger than this (each pass parses the whole file).
MAX_DECODE_ERRORS = 20
_REDECODE_MAX_BYTES = 64 * 1024


# --- the hook for config warnings ----------------------------------------------------------------------------


def load_config(data: bytes, source: str) -> tuple[Config, list[str]]:
    """The one place validate parses a config: the config and its warnings (the pure core's, lenient: what upstream
    or the fork accepts is served with a warning), each a line naming the file and the key path
    (`config.yaml: $.sharing.timeSlicing.resources[0].devices: ...`). validate applies `--strict` itself
    (`Report.valid`), after listing every warning."""
    config, warnings = parse_config_with_warnings(data, source)
    return config, [str(w) for w in warnings]


def collect_warnings(config: Config, source: str, settings: Settings | None) -> list[str]:
    """Warnings that need the resolved settings too (`settings` is None when they are invalid), in the same form as
    `load_config`'s. The core's warnings all come from the file alone today, so there are none."""
    del config, source, settings
    return []


# --- the report ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    source: str
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: The settings the plan is made with (flags > env > file > default), one line.
    settings: str = ""
    plan: list[str] = dataclasses.field(default_factory=list)

    def error(self, message: str) -> None:
        if message not in self.errors:
            self.errors.append(message)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def valid(self, strict: bool) -> bool:
        return not self.errors and not (strict and self.warnings)

    def render(self, strict: bool) -> str:
        lines = [f"{self.source}:"]
        for title, items in (("errors", self.errors), ("warnings" + (" (errors under --strict)" if strict else ""),
                                                                   self.warnings), ("notes", self.notes)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    - {item}" for item in items]
        if self.settings:
            lines.append(f"  {self.settings}")
        if self.plan:
            lines.append("  plan:")
            lines += [f"    {line}" for line in self.plan]
        if self.valid(strict):
            verdict = "valid"
            if self.warnings:
                verdict += f", with {_count(len(self.warnings), 'warning')}"
        else:
            parts = [_count(len(self.errors), "error")] if self.errors else []
            if strict and self.warnings:
                parts.append(f"{_count(len(self.warnings), 'warning')} (--strict)")
            verdict = "invalid: " + " and ".join(parts)
        lines.append(f"{self.source}: {verdict}")
        return "\n".join(lines)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- loading -------------------------------------------------------------------------------------------------


_PATH_TOKEN = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")
_UNKNOWN = re.compile(r"unknown field `([^`<]+)`")
_ENTRY = re.compile(r"^resources\[(\d+)\]")
#: Replaces a sharing entry that is in error, so that the entries after it keep their indices and are checked too.
_PLACEHOLDER_ENTRY = {"name": "nvidia.com/gpu", "replicas": 2}


def _decode_errors(data: bytes, source: str, first: ConfigError) -> tuple[list[str], Config | None]:
    """`first` and the errors after it: decode again with each faulty key left out (or each faulty sharing entry
    replaced), until the document decodes, the same error comes back, or `MAX_DECODE_ERRORS`. Also the config
    that decoded in the end, if any: its settings can still be checked."""
    errors = [str(first)]
    if len(data) > _REDECODE_MAX_BYTES:
        return errors, None
    try:
        doc = yaml.safe_load(data)
    except Exception:  # YAML errors: `first` says where; nothing more can be decoded
        return errors, None
    if not isinstance(doc, dict):
        return errors, None
    error = first
    while len(errors) < MAX_DECODE_ERRORS:
        if not _drop(doc, source, str(error)):
            break
        try:
            return errors, load_config(yaml.safe_dump(doc).encode(), source)[0]
        except ConfigError as exc:
            if str(exc) in errors:
                break
            errors.append(str(exc))
            error = exc
    return errors, None


def _drop(doc: dict[str, Any], source: str, message: str) -> bool:
    """Remove from `doc` what `message` (a decode error at a `$.` key path) is about. False when it cannot."""
    rest = message.removeprefix(f"{source}: ")
    if not rest.startswith("$"):
        return False
    where, _, what = rest.partition(": ")
    tokens = [(m.group(1), m.group(2)) for m in _PATH_TOKEN.finditer(where)]
    parent: Any = None
    key: str | int | None = None
    node: Any = doc
    try:
        for name, index in tokens:
            parent, key = node, (name if name is not None else int(index))
            node = node[key]
    except (KeyError, IndexError, TypeError):
        return False
    unknown = _UNKNOWN.search(what)
    entry = _ENTRY.match(what)
    if unknown and isinstance(node, dict) and unknown.group(1) in node:
        del node[unknown.group(1)]
    elif entry and isinstance(node, dict) and isinstance(node.get("resources"), list) \
            and int(entry.group(1)) < len(node["resources"]):
        node["resources"][int(entry.group(1))] = dict(_PLACEHOLDER_ENTRY)
    elif isinstance(parent, list) and isinstance(key, int) and tokens[-2:-1] == [("resources", None)]:
        parent[key] = dict(_PLACEHOLDER_ENTRY)
    elif isinstance(parent, dict) and key in parent:
        del parent[key]
    else:
        return False
    return True


# --- settings ------------------------------------------------------------------------------------------------


def _uses_mps(config: Config) -> bool:
    return config.sharing is not None and config.sharing.mps is not None


def _settings(cli: Mapping[str, str | None], env: Mapping[str, str], config: Config, source: str,
              report: Report) -> Settings | None:
    """Resolve as `nvdp run` does, collecting each flag's and variable's error, then those of the file."""
    cli = dict(cli)
    env = dict(env)
    if _uses_mps(config) and not (cli.get("mps_root") or env.get("MPS_ROOT")
                                  or (config.flags is not None and config.flags.mps_root)):
        cli["mps_root"] = CHART_MPS_ROOT
        report.notes.append(
            f"MPS root: none given (--mps-root, MPS_ROOT or flags.mpsRoot): assuming {CHART_MPS_ROOT}, the Helm "
            "chart's default (mps.root); `nvdp run` without one refuses this config")
    for option in OPTIONS:
        given = cli.get(option.dest)
        env_name = next((name for name in option.envs if name in env), None)
        one: tuple[dict[str, str | None], dict[str, str]]
        if given is not None:
            one = ({option.dest: given}, {})
        elif env_name is not None:
            one = ({}, {env_name: env[env_name]})
        else:
            continue
        try:
            resolve(*one)
        except ConfigError as exc:
            report.error(str(exc))
            cli.pop(option.dest, None)
            for name in option.envs:
                env.pop(name, None)
    # The file's own values: each error, with the key it names left out for the next try.
    by_path = {o.yaml_path: o.config_path for o in OPTIONS if o.config_path}
    by_path.update({"$.version": ("version",), "$.imex": ("imex",)})
    settings = None
    for _ in range(MAX_DECODE_ERRORS):
        try:
            settings = resolve(cli, env, config, config_source=source)
            break
        except ConfigError as exc:
            report.error(str(exc))
            where = str(exc).removeprefix(f"{source}: ").partition(":")[0]
            if not str(exc).startswith(f"{source}: $.") or where not in by_path:
                break
            # An MPS root in error stands in as the chart's, so that MPS is not also refused for having none.
            stand_in = CHART_MPS_ROOT if by_path[where] == ("flags", "mps_root") else None
            config = _without(config, by_path[where], stand_in)
    if settings is not None:
        try:
            check_fallbacks(settings.fallback_strategies)
        except ConfigError as exc:
            report.error(str(exc))
    return settings if not report.errors else None


def _without(struct: Any, path: tuple[str, ...], value: Any = None) -> Any:
    """`struct` with the field at `path` (attribute names) set to `value` (default: unset)."""
    if len(path) == 1:
        return msgspec.structs.replace(struct, **{path[0]: value})
    child = getattr(struct, path[0], None)
    if child is None:
        return struct
    return msgspec.structs.replace(struct, **{path[0]: _without(child, path[1:], value)})


def _settings_line(settings: Settings) -> str:
    return (f"settings: migStrategy {settings.mig_strategy}, deviceListStrategy "
            f"{','.join(settings.device_list_strategy)}, deviceIDStrategy {settings.device_id_strategy}, "
            f"passDeviceSpecs {str(settings.pass_device_specs).lower()}, mpsRoot {settings.mps_root or '(none)'}")


# --- the node ------------------------------------------------------------------------------------------------


class NodeError(Exception):
    """The simulated node cannot be read or started."""


def read_simulated_node(path: Path) -> NodeInventory:
    """The inventory of a simulated node (`docs/simulation.md`), through the fake NVML as `nvdp run` reads it."""
    from nvdp import sim
    from nvdp.nvml import adapter
    from nvdp.nvml.adapter import NvmlError

    try:
        node = sim.load_node(path)
    except sim.SimNodeError as exc:
        raise NodeError(f"--simulate {path}: {exc}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="nvdp-validate-") as tmp:
            handle = sim.activate(node, Path(tmp))
            adapter.shutdown()  # the fake reads the node at the next init
            adapter.init()
            try:
                return adapter.read_inventory(handle.host_root, handle.host_root)
            finally:
                adapter.shutdown()
    except (sim.SimBuildError, NvmlError, OSError) as exc:
        raise NodeError(f"--simulate {path}: cannot start the simulated node: {exc}") from None


@contextmanager
def _captured_warnings(into: list[str]) -> Iterator[None]:
    """Warnings that planning logs (nvdp.core.plan.*), as lines of the report instead of log lines."""
    logger = logging.getLogger("nvdp.core.plan")

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            into.append(record.getMessage())

    handler = Catch(logging.WARNING)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _only(settings: Settings, time_slicing: list[ReplicatedResource] | None,
          mps: list[ReplicatedResource] | None) -> Settings:
    """`settings` with only these sharing entries (None: the section left out)."""
    sharing = settings.config.sharing
    assert sharing is not None
    ts = msgspec.structs.replace(sharing.time_slicing, resources=time_slicing) \
        if sharing.time_slicing is not None and time_slicing else None
    mp = msgspec.structs.replace(sharing.mps, resources=mps) if sharing.mps is not None and mps else None
    config = msgspec.structs.replace(settings.config, sharing=msgspec.structs.replace(sharing, time_slicing=ts,
                                                                                      mps=mp))
    return dataclasses.replace(settings, config=config)


def _plan(inventory: NodeInventory, settings: Settings, report: Report) -> Plan | None:
    """The plan, or None with every error found: each sharing entry is planned alone first."""
    logged: list[str] = []
    with _captured_warnings(logged):
        try:
            plan = build_plan(inventory, settings)
        except PlanError as exc:
            plan = None
            first = str(exc)
    for message in logged:
        report.warn(message)
    if plan is not None:
        return plan
    sharing = settings.config.sharing
    if sharing is not None:
        with _captured_warnings([]):
            try:
                build_plan(inventory, dataclasses.replace(
                    settings, config=msgspec.structs.replace(settings.config, sharing=None)))
            except PlanError as exc:
                report.error(str(exc))
            for key, section in (("timeSlicing", sharing.time_slicing), ("mps", sharing.mps)):
                for i, entry in enumerate(section.resources or () if section is not None else ()):
                    alone = _only(settings, [entry] if key == "timeSlicing" else None,
                                  [entry] if key == "mps" else None)
                    try:
                        build_plan(inventory, alone)
                    except PlanError as exc:
                        report.error(str(exc).replace(f"sharing.{key}.resources[0] (",
                                                      f"sharing.{key}.resources[{i}] ("))
    report.error(first)
    return None


# --- what each MPS client gets -------------------------------------------------------------------------------


def _percent_source(entry: ReplicatedResource) -> str:
    if entry.compute_percent is not None:
        return "computePercent"
    if entry.memory_gb is not None:
        return "the memory share"
    return "100/replicas"


def _mps_entries(config: Config) -> list[tuple[int, str, ReplicatedResource]]:
    mps: Mps | None = config.sharing.mps if config.sharing is not None else None
    if mps is None:
        return []
    return [(i, mps.output_name(r), r) for i, r in enumerate(mps.resources or ())]


def time_slicing_lines(config: Config) -> list[str]:
    section: TimeSlicing | None = config.sharing.time_slicing if config.sharing is not None else None
    if section is None:
        return []
    return [f"{section.output_name(r)} (sharing.timeSlicing.resources[{i}]): {r.replicas} replicas of each "
            f"selected {r.name} device" for i, r in enumerate(section.resources or ())]


def mps_lines_without_node(config: Config) -> list[str]:
    """Per MPS resource: what each client gets, as far as the config alone says."""
    lines = []
    for i, output, entry in _mps_entries(config):
        where = f"sharing.mps.resources[{i}]"
        if entry.memory_gb is not None:
            memory = f"memory limit {entry.memory_gb} GB"
            share = f"{entry.memory_gb} GB / the GPU's memory"
        else:
            memory = f"memory limit the GPU's memory / {entry.replicas}"
            share = ""
        if entry.compute_percent is not None:
            compute = f"compute {entry.compute_percent}% (computePercent)"
        elif entry.memory_gb is not None:
            compute = f"compute {share} (the memory share; e.g. {entry.memory_gb * 100 // 40}% of a 40 GB GPU)"
        else:
            compute = f"compute {100 // (entry.replicas or 1)}% (100/replicas)"
        lines.append(f"{output} ({where}): {entry.replicas} per GPU, each client: {memory}, {compute}")
    return lines


def mps_lines(plan: Plan, config: Config, inventory: NodeInventory) -> list[str]:
    """Per MPS resource and GPU: the memory limit and compute percentage each client gets, and their source."""
    entries = _mps_entries(config)
    gpus = {g.uuid: g for g in inventory.gpus}
    lines = []
    for resource in plan.resources:
        if resource.sharing is not Sharing.MPS:
            continue
        seen: dict[tuple[str, int | None, int], int] = {}
        for device in resource.devices:
            assert device.mps is not None
            key = (device.gpu_uuid, device.mps.memory_gb, device.mps.active_thread_percentage)
            seen[key] = seen.get(key, 0) + 1
        for (uuid, memory_gb, percent), clients in seen.items():
            device = next(d for d in resource.devices if d.gpu_uuid == uuid and d.mps is not None
                          and d.mps.memory_gb == memory_gb)
            mps = device.mps
            assert mps is not None
            source = _source_for(entries, resource.name, memory_gb, percent)
            gpu = gpus.get(uuid)
            if source == "the memory share" and gpu is not None:
                source += f": {gb(mps.memory_limit_mib)} of {gb(gpu.memory_mib)}"
            elif source == "100/replicas":
                source += f": 100/{clients}"
            lines.append(f"{resource.name} on GPU {device.gpu_index} ({uuid}): {clients} "
                         f"client{'' if clients == 1 else 's'}, each: memory limit {gb(mps.memory_limit_mib)} "
                         f"({mps.memory_limit_mib} MiB), compute {percent}% (from {source})")
    return lines


def _source_for(entries: list[tuple[int, str, ReplicatedResource]], name: str, memory_gb: int | None,
                percent: int) -> str:
    candidates = [e for _, output, e in entries if output == name and e.memory_gb == memory_gb]
    exact = [e for e in candidates if e.compute_percent == percent]
    chosen = exact or candidates
    return _percent_source(chosen[0]) if chosen else "the config"


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


# --- one config ----------------------------------------------------------------------------------------------


def validate_one(data: bytes | None, source: str, cli: Mapping[str, str | None], env: Mapping[str, str],
                 inventory: NodeInventory | None, node_name: str | None, read_error: str | None = None) -> Report:
    report = Report(source)
    if data is None:
        report.error(read_error or f"{source}: cannot read")
        return report
    try:
        config, warnings = load_config(data, source)
    except ConfigError as exc:
        errors, rest = _decode_errors(data, source, exc)
        for message in errors:
            report.error(message)
        # The flags, the variables and what decodes of the file are still checked.
        _settings(cli, env, rest or Config(), source, report)
        report.notes.append("no plan and no node checks: the config does not decode (fix the errors above first)")
        return report
    settings = _settings(cli, env, config, source, report)
    for warning in [*warnings, *collect_warnings(config, source, settings)]:
        report.warn(warning)
    if settings is None:
        report.notes.append("no plan and no node checks: the settings are invalid (fix the errors above first)")
        return report
    report.settings = _settings_line(settings)
    if inventory is None:
        report.notes.append("not checked, as they need a node (give --simulate NODE.yaml):"
                            + "".join(f"\n        {check}" for check in NODE_CHECKS))
        time_sliced = time_slicing_lines(config)
        if time_sliced:
            report.plan.append("time-slicing (no memory or compute limit):")
            report.plan += [f"  {line}" for line in time_sliced]
        if _uses_mps(config):
            report.plan.append("MPS, per client (the GPUs' memory is needed for the rest):")
            report.plan += [f"  {line}" for line in mps_lines_without_node(config)]
        return report
    plan = _plan(inventory, settings, report)
    if plan is None:
        report.notes.append(f"no plan on {node_name}: see the errors")
        return report
    report.plan.append(f"on {node_name}:")
    report.plan += [f"  {line}" for line in format_plan(plan).splitlines()]
    if settings.dra_enabled:
        split = split_gpus(inventory, True, config.dra)
        report.plan.append(f"which API serves each GPU (DRA driver {settings.dra_driver_name}):")
        report.plan += [f"  {line}" for line in split.describe(inventory)]
        if plan.dra_share_hosts:
            report.plan.append("MPS shares (dra.sharing.mps), what each share host publishes:")
            report.plan += [f"  {line}" for line in share_host_lines(plan)]
    per_client = mps_lines(plan, config, inventory)
    if per_client:
        report.plan.append("MPS, per client:")
        report.plan += [f"  {line}" for line in per_client]
    imex = select_imex_channels(inventory, settings)
    if imex:
        report.plan.append("IMEX channels given to every container: " + ", ".join(str(c) for c in imex))
    return report


def share_host_lines(plan: Plan) -> list[str]:
    """One line per DRA share host: its device, GPU and consumable capacities with their request policies."""
    from nvdp.core.dra.shares import format_quantity

    lines = []
    for name, p in plan.dra_share_hosts:
        memory = (f"memory {format_quantity(p.memory_bytes)} (min {format_quantity(p.memory_minimum)}, step "
                  f"{format_quantity(p.memory_step)}, default {format_quantity(p.memory_default)})")
        compute = (f"{p.compute_capacity} {p.compute_total} (min {p.compute_minimum}, step {p.compute_step}, default "
                   f"{p.compute_default})")
        lines.append(f"{name} (GPU {p.gpu_index}, {p.gpu_uuid}): {memory}, {compute}")
    return lines


def _configs(files: Sequence[Path], config_dir: Path | None) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(source, bytes or None, why not) for each file and each config of the directory."""
    for path in files:
        try:
            yield str(path), read_config_bytes(path), None
        except ConfigError as exc:
            yield str(path), None, str(exc)
    if config_dir is not None:
        from nvdp.node_config.sources import read_config_dir

        if not config_dir.is_dir():
            yield str(config_dir), None, f"--config-dir {config_dir}: not a directory"
            return
        entries = read_config_dir(config_dir)
        if not entries:
            yield str(config_dir), None, f"--config-dir {config_dir}: no config in it"
        for name, data in entries.items():
            yield str(config_dir / name), data, None


class NothingValidated(Exception):
    """validate could not even start (the simulated node is unreadable): one line on stderr, exit 1."""


def validate_configs(files: Sequence[Path], config_dir: Path | None, cli: Mapping[str, str | None],
                     env: Mapping[str, str], simulate: Path | None, strict: bool) -> tuple[int, str]:
    """(exit code, text): 0 when every config is valid (warnings allowed unless `strict`), else 1."""
    out: list[str] = []
    inventory = None
    node_name = None
    if simulate is not None:
        try:
            inventory = read_simulated_node(simulate)
            node_name = f"the simulated node {simulate}"
        except NodeError as exc:
            raise NothingValidated(f"{exc}; nothing validated: fix the node file or leave --simulate out") from None
    # The file is named on the command line: a CONFIG_FILE of this shell must not stand in for it.
    cli = {**cli, "config_file": None, "simulate": None, "config_dir": None}
    env = {k: v for k, v in env.items() if k not in ("CONFIG_FILE", "NVDP_SIMULATE", "CONFIG_FILE_SRCDIR")}
    ok = True
    count = 0
    for source, data, why in _configs(files, config_dir):
        report = validate_one(data, source, cli, env, inventory, node_name, why)
        ok = ok and report.valid(strict)
        count += 1
        out.append(report.render(strict))
    if count > 1:
        out.append(f"{count} configs: {'all valid' if ok else 'some invalid'}")
    return (0 if ok else 1), "\n\n".join(out)
