"""Figures, targets, repeat aggregation, and the JSON and Markdown outputs."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Unavailable


@dataclass(frozen=True)
class Figure:
    title: str
    unit: str
    #: The statistics shown in the table, in order.
    stats: tuple[str, ...]
    #: (statistic, upper limit) from the issue's targets, judged on the median of the repeats.
    target: tuple[str, float] | None = None


LATENCY = ("p50", "p90", "p99", "max")

FIGURES: dict[str, Figure] = {
    "allocate.whole_gpu": Figure("Allocate, whole GPU", "ms", LATENCY, ("p99", 1.0)),
    "allocate.time_slicing": Figure("Allocate, time-slicing replica", "ms", LATENCY),
    "allocate.mps": Figure("Allocate, MPS slice", "ms", LATENCY),
    "allocate.four_gpu_volume_mounts": Figure("Allocate, 4 GPUs, volume-mounts + passDeviceSpecs", "ms", LATENCY),
    "preferred.nvlink8_size2": Figure("GetPreferredAllocation, 8-GPU NVLink, size 2", "ms", LATENCY),
    "preferred.nvlink8_size4": Figure("GetPreferredAllocation, 8-GPU NVLink, size 4", "ms", LATENCY),
    "health.xid_to_unhealthy": Figure("Health: XID 48 written -> kubelet holds Unhealthy", "ms",
                                      ("p50", "p99", "max", "n"), ("p99", 50.0)),
    "reload.file": Figure("Reload: config file + SIGHUP -> kubelet holds new devices", "ms",
                          ("p50", "p99", "max", "n"), ("p99", 500.0)),
    "reload.file_broken_unchanged_streams": Figure("Reload (file): unchanged streams broken", "count",
                                                   ("value",), ("value", 0.0)),
    "reload.node_label": Figure("Reload: node label -> kubelet holds new devices", "ms",
                                ("p50", "p99", "max", "n"), ("p99", 500.0)),
    "reload.node_label_broken_unchanged_streams": Figure("Reload (node label): unchanged streams broken", "count",
                                                         ("value",), ("value", 0.0)),
    "allocate.concurrent": Figure("Allocate, whole GPU: 8 clients at once (a connection each)", "calls/s",
                                  ("value", "clients")),
    "allocate.cpu_per_call": Figure("Allocate, whole GPU: plugin CPU per call (all threads)", "µs", ("value",)),
    "startup.process": Figure("Start-up: process start -> registered (byte-compiled)", "ms",
                              ("p50", "max", "devices_p50"), ("p50", 150.0)),
    "startup.process_uncompiled": Figure("Start-up: process start -> registered (no .pyc at all)", "ms",
                                         ("p50", "max")),
    "shutdown.sigterm_to_exit": Figure("SIGTERM -> exited (health checks on, NVML wait in progress)", "ms",
                                       ("p50", "max"), ("p50", 50.0)),
    "startup.kubelet_restart": Figure("Kubelet restart -> re-registered", "ms", ("p50", "max", "n")),
    "memory.rss_registered": Figure("RSS after registration", "MiB", ("value",), ("value", 35.0)),
    "memory.rss_after_allocates": Figure("RSS after N Allocates", "MiB", ("value", "allocates")),
    "memory.rss_growth": Figure("RSS growth, warm (after the timed calls) -> N Allocates", "MiB", ("value",)),
    "memory.rss_after_restarts": Figure("RSS after N Allocates and the kubelet restarts", "MiB",
                                        ("value", "allocates", "restarts")),
    "memory.rss_growth_total": Figure("RSS growth, registration -> after N Allocates and the kubelet restarts",
                                      "MiB", ("value",), ("value", 1.0)),
    "idle_cpu.default": Figure("Idle CPU (health checks on)", "% of a core", ("value",), ("value", 0.1)),
    "idle_cpu.health_checks_disabled": Figure("Idle CPU (DP_DISABLE_HEALTHCHECKS=all)", "% of a core", ("value",),
                                              ("value", 0.1)),
    "scale.list_and_watch_encode": Figure("Scale: ListAndWatch encode per update, 2 688 devices", "ms",
                                          ("p50", "max", "encode_build_ms", "betterproto2_ms", "bytes"),
                                          ("p50", 50.0)),
    "scale.startup": Figure("Scale: process start -> registered / devices held", "ms",
                            ("registered", "devices", "device_count")),
    "scale.allocate": Figure("Scale: Allocate, 1 of 2 688 replicas", "ms", LATENCY, ("p99", 1.5)),
    "scale.rss_registered": Figure("Scale: RSS after registration", "MiB", ("value",)),
}


#: Figures of the foreign plugin (`--against`) are keyed `against:<figure key>`.
AGAINST = "against:"


def figure_of(key: str) -> Figure:
    return FIGURES[key.removeprefix(AGAINST)]


def aggregate(key: str, repeats: list[dict[str, float | str] | Unavailable | str]) -> dict[str, Any]:
    """One figure over its repeats: status, per-repeat values, min/median/max of each statistic, the target (nvdp's
    figures only: a foreign plugin's are there to compare with)."""
    figure = figure_of(key)
    foreign = key.startswith(AGAINST)
    entry: dict[str, Any] = {"title": ("Go plugin: " if foreign else "") + figure.title, "unit": figure.unit}
    if figure.target is not None and not foreign:
        entry["target"] = {"stat": figure.target[0], "max": figure.target[1]}
    errors = [r for r in repeats if isinstance(r, str)]
    ok = [r for r in repeats if isinstance(r, dict)]
    unavailable = [r for r in repeats if isinstance(r, Unavailable)]
    if errors:
        entry.update(status="error", reason=errors[0])
        return entry
    if not ok:
        entry.update(status="unavailable", reason=str(unavailable[0]) if unavailable else "not run")
        return entry
    entry["status"] = "ok"
    notes = sorted({str(r["note"]) for r in ok if "note" in r})
    if notes:
        entry["note"] = "; ".join(notes)
    ok = [{k: v for k, v in r.items() if k != "note"} for r in ok]
    entry["repeats"] = ok
    summary = {}
    for stat in ok[0]:
        values = [r[stat] for r in ok if stat in r]
        summary[stat] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    entry["summary"] = summary
    if figure.target is not None and figure.target[0] in summary:
        median = summary[figure.target[0]]["median"]
        entry["met"] = median <= figure.target[1]
    return entry


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    versions = {}
    for package in ("grpcio", "grpclib", "betterproto2", "trio"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "host": socket.gethostname(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "commit": commit + ("-dirty" if dirty else ""),
    }


def _fmt(value: float, unit: str, stat: str) -> str:
    if stat in ("n", "allocates", "bytes", "device_count", "calls", "restarts", "clients") or unit in ("count",
                                                                                                     "calls/s"):
        return f"{value:,.0f}"
    if unit == "% of a core":
        return f"{value:.3f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _unit(unit: str, stat: str) -> str:
    return {"n": "calls", "allocates": "calls", "bytes": "bytes", "device_count": "devices", "calls": "calls",
            "restarts": "restarts", "clients": "clients"}.get(stat, unit)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Run {result['date']} on `{m['host']}`: {m['cpu'] or 'unknown CPU'}, {m['cpus']} CPUs, Linux {m['kernel']}, "
        f"Python {m['python']}, grpcio {m['packages'].get('grpcio')}, nvdp {m['commit'] or '?'}; "
        f"mode {result['mode']}, {result['repeats']} repeat(s), {result['elapsed_s']:.0f} s.",
        f"Command: `{result['command']}`",
        "",
        "| Figure | Stat | Min | Median | Max | Unit | Target | Status |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for key, entry in result["figures"].items():
        target = entry.get("target")
        target_text = f"{target['stat']} ≤ {target['max']:g}" if target else ""
        if entry["status"] != "ok":
            reason = entry["reason"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {entry['title']} | | | | | {entry['unit']} | {target_text} | "
                         f"{entry['status']}: {reason} |")
            continue
        figure = figure_of(key)
        title = entry["title"] + (f" ({entry['note']})" if entry.get("note") else "")
        for i, stat in enumerate(s for s in figure.stats if s in entry["summary"]):
            s = entry["summary"][stat]
            status = ""
            if target and stat == target["stat"]:
                status = "met" if entry["met"] else "**missed**"
                if not entry["met"] and target["max"]:
                    status += f" ({s['median'] / target['max']:.1f} x)"
            lines.append(
                f"| {title if i == 0 else ''} | {stat} | {_fmt(s['min'], entry['unit'], stat)} | "
                f"{_fmt(s['median'], entry['unit'], stat)} | {_fmt(s['max'], entry['unit'], stat)} | "
                f"{_unit(entry['unit'], stat)} | {target_text if status else ''} | {status} |")
    rows = comparison(result["figures"])
    if rows:
        lines += ["", f"nvdp against the plugin at `{result.get('against', '?')}` (medians over the repeats, run in "
                  "alternating order on the same fake NVML and kubelet emulator):", "",
                  "| Figure | Stat | nvdp | Go | nvdp/Go | Unit |", "|---|---|---:|---:|---:|---|"]
        for title, stat, ours, theirs, unit in rows:
            ratio = f"{ours / theirs:.2f}" if theirs else "n/a"
            lines.append(f"| {title} | {stat} | {_fmt(ours, unit, stat)} | {_fmt(theirs, unit, stat)} | {ratio} | "
                         f"{_unit(unit, stat)} |")
    return "\n".join(lines) + "\n"


def comparison(figures: dict[str, Any]) -> list[tuple[str, str, float, float, str]]:
    """(title, statistic, nvdp median, foreign median, unit) for every statistic both measured."""
    rows = []
    for key, ours in figures.items():
        theirs = figures.get(AGAINST + key)
        if key.startswith(AGAINST) or theirs is None or ours["status"] != "ok" or theirs["status"] != "ok":
            continue
        for stat in figure_of(key).stats:
            if stat in ours["summary"] and stat in theirs["summary"] and stat not in (
                    "n", "calls", "allocates", "restarts", "clients"):
                rows.append((ours["title"], stat, ours["summary"][stat]["median"],
                             theirs["summary"][stat]["median"], ours["unit"]))
    return rows
