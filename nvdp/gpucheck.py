"""The testable half of `scripts/gpu-check`: config text, client reports, judgements with tolerances, the report.

`scripts/gpu-check` runs nvdp on a real NVIDIA GPU (see docs/gpu-validation.md). Everything in it that does not
need a GPU lives here as plain functions so that the tests can exercise it on a CPU-only machine with fabricated
inputs; the script keeps only the orchestration (processes, the kubelet emulator, NVML calls, the cleanup guard).

Nothing here imports trio, grpc or pynvml.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
#: The line prefix `scripts/gpu_check_client.py` puts before its one JSON result, so that CUDA's or PyTorch's own
#: output on stdout cannot be mistaken for it.
CLIENT_PREFIX = "GPUCHECK-RESULT "
#: The words the dry run prints and the CI test looks for.
NO_DRIVER = "skipped: no NVIDIA driver"

#: NVML compute modes by number (nvmlComputeMode_t).
COMPUTE_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}
EXCLUSIVE_PROCESS = 3

#: nvmlGpuTopologyLevel_t, as the report names them.
TOPOLOGY_LEVELS = {0: "same board", 10: "single PCIe switch", 20: "multiple PCIe switches", 30: "host bridge",
                   40: "same NUMA node", 50: "across CPUs"}

# ------------------------------------------------------------------------------------------------ results


@dataclass
class Check:
    """One expectation: what was measured against what was expected, and whether it held."""

    name: str
    status: str
    measured: str = ""
    expected: str = ""


@dataclass
class Step:
    """One numbered step of the check. Its status is derived from its checks unless it was skipped or failed."""

    title: str
    checks: list[Check] = field(default_factory=list)
    #: Markdown lines shown under the step's heading (tables, listings, notes).
    details: list[str] = field(default_factory=list)
    #: Set when the step did not run (SKIP) or broke off (FAIL), with why.
    outcome: str | None = None
    reason: str = ""

    def check(self, name: str, ok: bool | None, measured: object = "", expected: object = "") -> bool:
        """Records a check; `ok=None` means it could not be judged (SKIP). Returns `ok is True`."""
        status = SKIP if ok is None else PASS if ok else FAIL
        self.checks.append(Check(name, status, str(measured), str(expected)))
        return ok is True

    def skip(self, reason: str) -> None:
        self.outcome, self.reason = SKIP, reason

    def fail(self, reason: str) -> None:
        self.outcome, self.reason = FAIL, reason

    @property
    def status(self) -> str:
        if self.outcome == FAIL or any(c.status == FAIL for c in self.checks):
            return FAIL
        if self.outcome == SKIP and not self.checks:
            return SKIP
        return PASS if any(c.status == PASS for c in self.checks) else SKIP

    def summary(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in (PASS, FAIL, SKIP)}
        text = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
        if self.reason:
            text = f"{self.reason}; {text}" if text else self.reason
        return text or "no checks"


def overall(steps: Sequence[Step]) -> str:
    statuses = {s.status for s in steps}
    if FAIL in statuses:
        return FAIL
    return PASS if PASS in statuses else SKIP


# ------------------------------------------------------------------------------------------------ MPS config


@dataclass(frozen=True)
class MpsSliceSpec:
    """One fork-style MPS resource the check configures."""

    rename: str
    memory_gb: int
    replicas: int


def default_slices(slice_gb: int = 10, replicas: int = 2) -> tuple[MpsSliceSpec, ...]:
    """The slices the check asks for: `replicas` of `slice_gb` for the clients, plus one slice twice that size.

    The larger slice is only allocated (to check its limit); no client runs with its env. It is there so that the
    daemon's defaults (the largest slice on the GPU, by the MPS contract) differ from a small slice's: a client
    limited by its env then stops at a different place than one that only connects to the daemon, and the check can
    tell the client's env from the daemon's default.
    """
    small, big = slice_gb, 2 * slice_gb
    return MpsSliceSpec(f"gpu-{small}gb", small, replicas), MpsSliceSpec(f"gpu-{big}gb", big, 1)


def mps_config_yaml(slices: Sequence[MpsSliceSpec], gpu_index: int = 0) -> str:
    """nvdp's v1 config with fork-style MPS resources on one GPU (written by hand: no YAML library needed)."""
    lines = ["version: v1", "sharing:", "  mps:", "    resources:"]
    for s in slices:
        lines += [
            "      - name: nvidia.com/gpu",
            f"        rename: {s.rename}",
            f"        memoryGB: {s.memory_gb}",
            f"        replicas: {s.replicas}",
            f'        devices: ["{gpu_index}"]',
        ]
    return "\n".join(lines) + "\n"


def fits(slices: Sequence[MpsSliceSpec], memory_mib: int) -> bool:
    """Whether the slices fit the GPU's memory (GB = GiB), as nvdp's own validation requires."""
    return sum(s.memory_gb * s.replicas for s in slices) * 1024 <= memory_mib


def parse_mem_limit(value: str, ordinal: int = 0) -> int | None:
    """`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` (`0=10G,1=512M`) -> the limit of `ordinal` in MiB, or None."""
    units = {"M": 1, "G": 1024, "T": 1024 * 1024}
    for part in value.split(","):
        key, _, amount = part.strip().partition("=")
        if not key.strip().isdigit() or int(key) != ordinal or not amount:
            continue
        amount = amount.strip().upper().removesuffix("B")
        unit = units.get(amount[-1:])
        number = amount[:-1] if unit else amount
        try:
            # A bare number is bytes in the CUDA documentation's examples; round down to whole MiB.
            return int(float(number) * unit) if unit else int(number) // (1024 * 1024)
        except ValueError:
            return None
    return None


# -------------------------------------------------------------------------------------------- Allocate -> host


@dataclass(frozen=True)
class AllocateView:
    """What a container gets from one Allocate, as plain data (from the gRPC response)."""

    envs: dict[str, str]
    #: (container path, host path, read only)
    mounts: tuple[tuple[str, str, bool], ...] = ()
    #: (container path, host path, permissions)
    devices: tuple[tuple[str, str, str], ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_response(cls, response: Any) -> AllocateView:
        """From an `AllocateResponse` with one container response (duck-typed: no import of the generated code)."""
        c = response.container_responses[0]
        return cls(
            envs=dict(c.envs),
            mounts=tuple((m.container_path, m.host_path, bool(m.read_only)) for m in c.mounts),
            devices=tuple((d.container_path, d.host_path, d.permissions) for d in c.devices),
            annotations=dict(c.annotations),
        )

    def markdown(self) -> list[str]:
        lines = ["| kind | value |", "|---|---|"]
        lines += [f"| env | `{k}={v}` |" for k, v in sorted(self.envs.items())]
        lines += [f"| mount | `{h}` → `{c}`{' (ro)' if ro else ''} |" for c, h, ro in self.mounts]
        lines += [f"| device | `{h}` → `{c}` ({p}) |" for c, h, p in self.devices]
        lines += [f"| annotation | `{k}={v}` |" for k, v in sorted(self.annotations.items())]
        return lines


def host_env(view: AllocateView) -> tuple[dict[str, str], list[str]]:
    """The MPS environment a container would get, made usable by a process on the host.

    Values that name a path inside the container (the pipe directory, when nvdp mounts it elsewhere) are mapped back
    to the host path of the mount that provides them. The `/dev/shm` mount is deliberately not applied: on the host
    the client and the control daemon (a child of nvdp, also on the host) already share the host's /dev/shm, which
    is what the dedicated tmpfs stands in for inside a container. Returns the env and one note per translation.
    """
    env: dict[str, str] = {}
    notes: list[str] = []
    mounts = sorted(((c, h) for c, h, _ in view.mounts if c != "/dev/shm"), key=lambda m: -len(m[0]))
    for key, value in view.envs.items():
        if not key.startswith("CUDA_MPS_"):
            continue  # NVIDIA_VISIBLE_DEVICES and friends are for the container runtime, not a host process
        for container_path, host_path in mounts:
            if value == container_path or value.startswith(container_path.rstrip("/") + "/"):
                translated = host_path + value[len(container_path):]
                if translated != value:
                    notes.append(f"{key}: container path {value} is {translated} on the host")
                value = translated
                break
        env[key] = value
    return env, notes


def client_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """A client's environment: ours without any MPS or device-selection settings, plus exactly `extra`."""
    env = {k: v for k, v in base.items() if not k.startswith("CUDA_MPS_") and k != "CUDA_VISIBLE_DEVICES"}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- client reports


@dataclass(frozen=True)
class ClientReport:
    """What `scripts/gpu_check_client.py` printed, with defaults for what it could not measure."""

    label: str
    pid: int = 0
    error: str = ""
    cuda_ok: bool = False
    #: True/False: the client's PID was/was not among NVML's MPS compute processes; None: not determinable.
    mps_listed: bool | None = None
    alloc_mib: int | None = None
    alloc_stop: str = ""
    mem_total_mib: int | None = None
    tflops: float | None = None
    matmul_start: float | None = None
    matmul_end: float | None = None
    torch: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientReport:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def parse_client_output(label: str, stdout: str, stderr: str = "", returncode: int = 0) -> ClientReport:
    """The client's result line, or a report that carries why there is none (last lines of its stderr)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(CLIENT_PREFIX):
            try:
                data = json.loads(line[len(CLIENT_PREFIX):])
            except ValueError as exc:
                return ClientReport(label, error=f"unreadable result line: {exc}")
            if isinstance(data, dict):
                return ClientReport.from_dict({**data, "label": label})
    tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no output"
    return ClientReport(label, error=f"exit {returncode}, no result line: {tail}")


def overlap_fraction(a: ClientReport, b: ClientReport) -> float:
    """How much of the shorter matmul window both clients ran at once (0 when either has no window)."""
    if a.matmul_start is None or a.matmul_end is None or b.matmul_start is None or b.matmul_end is None:
        return 0.0
    start = max(a.matmul_start, b.matmul_start)
    end = min(a.matmul_end, b.matmul_end)
    shorter = min(a.matmul_end - a.matmul_start, b.matmul_end - b.matmul_start)
    return max(0.0, end - start) / shorter if shorter > 0 else 0.0


# --------------------------------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Judgement:
    ok: bool | None
    measured: str
    expected: str


#: Allocation under a limit may stop short of it by this much: the CUDA context, PyTorch's own buffers and MPS's
#: per-client reservations come out of the same limit, and the probe only moves in whole steps.
MEMORY_SLACK_MIB = 1536
MEMORY_SLACK_FRACTION = 0.15


def judge_memory(alloc_mib: int | None, limit_mib: int, step_mib: int = 256) -> Judgement:
    """Allocation stops near the limit: within [limit - max(1.5 GiB, 15 %), limit + one step]."""
    low = limit_mib - max(MEMORY_SLACK_MIB, int(limit_mib * MEMORY_SLACK_FRACTION))
    high = limit_mib + step_mib
    expected = f"{low}-{high} MiB (limit {limit_mib} MiB)"
    if alloc_mib is None:
        return Judgement(False, "not measured", expected)
    return Judgement(low <= alloc_mib <= high, f"{alloc_mib} MiB", expected)


#: A client alone at p % of the SMs should reach p % of the whole GPU's matmul rate, within these factors. Wide on
#: purpose: SM counts are rounded to whole TPCs, clocks move with load and a short run is noisy; the check is
#: meant to tell "limited near p %" from "not limited" or "starved", not to benchmark.
SHARE_LOW, SHARE_HIGH, SHARE_SLACK = 0.5, 1.5, 0.05


def judge_share(tflops: float | None, baseline_tflops: float | None, percent: int) -> Judgement:
    """A client alone at `percent` % of the threads gets about that share of the unshared GPU's throughput."""
    share = percent / 100
    low, high = SHARE_LOW * share, min(1.0 + SHARE_SLACK, SHARE_HIGH * share + SHARE_SLACK)
    expected = f"{low:.0%}-{high:.0%} of unshared ({percent} % threads)"
    if not tflops or not baseline_tflops:
        return Judgement(None if not baseline_tflops else False, "not measured", expected)
    measured = tflops / baseline_tflops
    ok = low <= measured <= high
    if ok and high >= 1.0:
        expected += "; too high a percentage to tell a limit from none"
    return Judgement(ok, f"{measured:.0%} ({tflops:.1f} / {baseline_tflops:.1f} TFLOP/s)", expected)


def judge_together(alone: float | None, together: float | None, percents: Sequence[int]) -> Judgement:
    """Running beside the others, a client keeps its rate while the percentages sum to ≤ 100, and is squeezed
    towards its fair part of the GPU beyond that."""
    total = sum(percents) / 100
    expected_ratio = min(1.0, 1.0 / total) if total > 0 else 1.0
    low, high = 0.6 * expected_ratio, min(1.3, 1.3 * expected_ratio)
    expected = f"{low:.0%}-{high:.0%} of its rate alone (threads sum to {total:.0%})"
    if not alone or not together:
        return Judgement(False, "not measured", expected)
    ratio = together / alone
    return Judgement(low <= ratio <= high, f"{ratio:.0%} ({together:.1f} / {alone:.1f} TFLOP/s)", expected)


# ------------------------------------------------------------------------------------------------ processes


INTERPRETER = re.compile(r"^(python[0-9.]*|sh|bash)$")


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        """The program's name; for a script run by its interpreter (a fake MPS control program is a Python
        script), the script's name."""
        if not self.argv:
            return ""
        name = os.path.basename(self.argv[0])
        if INTERPRETER.match(name) and len(self.argv) > 1 and not self.argv[1].startswith("-"):
            return os.path.basename(self.argv[1])
        return name


def list_processes(proc: Path = Path("/proc")) -> list[ProcessInfo]:
    """Every process we can see, from /proc (argv[0]'s name: /proc/*/comm truncates the MPS programs' names)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = tuple(a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a)
            status = (entry / "status").read_text()
        except OSError:
            continue  # gone meanwhile, or a kernel thread we may not read
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)
        found.append(ProcessInfo(int(entry.name), ppid, argv))
    return found


def processes_named(names: Iterable[str], processes: Iterable[ProcessInfo] | None = None) -> list[ProcessInfo]:
    wanted = set(names)
    return [p for p in (list_processes() if processes is None else processes) if p.program in wanted]


def process_env(pid: int) -> dict[str, str]:
    """A process's initial environment (root can read every one); empty when unreadable."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


# --------------------------------------------------------------------------------------------------- report


def inventory_markdown(inventory: Any, compute_modes: Mapping[str, int] | None = None) -> list[str]:
    """Step 1's listing of a `NodeInventory` (duck-typed, so this module stays free of nvdp's NVML imports)."""
    modes = compute_modes or {}
    lines = [
        f"Driver {inventory.driver_version}, CUDA driver API {cuda_version(inventory.cuda_driver_version)}, "
        f"{len(inventory.gpus)} GPU(s).",
        "",
        "| # | name | UUID | memory | CC | MIG | NUMA | PCI | minor | compute mode |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in inventory.gpus:
        mig = f"on ({len(g.mig_devices)} devices)" if g.mig_enabled else "off"
        mode = modes.get(g.uuid)
        lines.append(
            f"| {g.index} | {g.name} | `{g.uuid}` | {g.memory_mib} MiB | {g.compute_capability} | {mig} | "
            f"{'unknown' if g.numa_node is None else g.numa_node} | {g.pci_bus_id} | {g.minor} | "
            f"{'?' if mode is None else COMPUTE_MODES.get(mode, str(mode))} |")
    if inventory.links:
        lines += ["", "| GPUs | NVLinks | PCIe |", "|---|---|---|"]
        for (a, b), link in sorted(inventory.links.items()):
            level = "unknown" if link.pcie_level is None else TOPOLOGY_LEVELS.get(link.pcie_level, str(link.pcie_level))
            lines.append(f"| {a}-{b} | {link.nvlinks} | {level} |")
    elif len(inventory.gpus) == 1:
        lines += ["", "Topology: one GPU, no pairs to report."]
    if inventory.control_devices:
        lines += ["", "Control devices: " + ", ".join(f"`{d}`" for d in inventory.control_devices)]
    return lines


def cuda_version(value: int) -> str:
    """NVML's 12080 as 12.8."""
    return f"{value // 1000}.{value % 1000 // 10}"


def render_report(meta: Mapping[str, str], steps: Sequence[Step], notes: Sequence[str] = ()) -> str:
    result = overall(steps) if steps else SKIP
    lines = ["# nvdp GPU check", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += [f"- **result**: {result}", ""]
    if steps:
        lines += ["| step | result | summary |", "|---|---|---|"]
        lines += [f"| {i}. {s.title} | {s.status} | {s.summary()} |" for i, s in enumerate(steps, 1)]
    for i, s in enumerate(steps, 1):
        lines += ["", f"## {i}. {s.title} — {s.status}", ""]
        if s.reason:
            lines += [f"{s.outcome or s.status}: {s.reason}", ""]
        if s.details:
            lines += [*s.details, ""]
        if s.checks:
            lines += ["| check | result | measured | expected |", "|---|---|---|---|"]
            lines += [f"| {c.name} | {c.status} | {_cell(c.measured)} | {_cell(c.expected)} |" for c in s.checks]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------------------ CDI comparison


def _hook_names(edits: Mapping[str, Any]) -> set[str]:
    names = set()
    for hook in edits.get("hooks") or []:
        args = list(hook.get("args") or [])
        if args[1:2] == ["hook"]:
            args = args[1:]
        if len(args) > 1:
            names.add(args[1])
    return names


def cdi_facets(spec: Mapping[str, Any]) -> dict[str, set[str]]:
    """What two CDI specs of the same node can be compared on, whatever their kind: device names, each device's
    nodes, the spec-wide nodes, mounts (container paths), hooks (by hook command), env variable names."""
    common = spec.get("containerEdits") or {}
    facets: dict[str, set[str]] = {
        "device names": {d["name"] for d in spec.get("devices") or []},
        "spec device nodes": {n["path"] for n in common.get("deviceNodes") or []},
        "spec mounts": {m["containerPath"] for m in common.get("mounts") or []},
        "spec hooks": _hook_names(common),
        "spec env names": {e.split("=", 1)[0] for e in common.get("env") or []},
    }
    for device in spec.get("devices") or []:
        edits = device.get("containerEdits") or {}
        facets[f"device {device['name']} nodes"] = {n["path"] for n in edits.get("deviceNodes") or []}
        facets[f"device {device['name']} hooks"] = _hook_names(edits)
    return facets


def cdi_diff(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """A markdown table of what differs between nvdp's spec and `nvidia-ctk cdi generate`'s, facet by facet (only
    facets both could have: a device only one side names is one row of the device names)."""
    a, b = cdi_facets(ours), cdi_facets(theirs)
    rows = ["| facet | only in nvdp | only in nvidia-ctk |", "|---|---|---|"]
    for facet in sorted(set(a) | set(b), key=lambda f: (not f.startswith("spec"), f)):
        if facet.startswith("device ") and (facet not in a or facet not in b):
            continue
        mine, other = a.get(facet, set()), b.get(facet, set())
        if mine != other:
            rows.append(f"| {facet} | {_cell(', '.join(sorted(mine - other)) or '-')} | "
                        f"{_cell(', '.join(sorted(other - mine)) or '-')} |")
    return rows if len(rows) > 2 else ["nvdp's spec and nvidia-ctk's agree on every facet compared."]
