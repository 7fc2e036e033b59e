"""`scripts/gpu-check` without a GPU: the CI dry run, a simulated-node run, and its logic on fabricated results.

The real run needs an NVIDIA driver, MPS and PyTorch (docs/gpu-validation.md); everything that can be exercised
without them is here, so the script does not rot between the rare runs on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import ctypes.util
import dataclasses
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from nvdp import gpucheck as gc
from nvdp import sim
from nvdp.core.inventory import Gpu, NodeInventory
from nvdp.kubelet.api import v1beta1 as api
from nvdp.nvml import adapter
from tests.helpers import ROOT, gpu, write_node

SCRIPT = ROOT / "scripts" / "gpu-check"
GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"


def run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
               ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != sim.STATE_ENV}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, cwd=cwd)


# ------------------------------------------------------------------------------------------- the script itself


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="a real NVIDIA driver is installed")
def test_dry_run_without_a_driver_skips_and_exits_zero(tmp_path: Path) -> None:
    report = tmp_path / "out" / "report.md"
    result = run_script("--report", str(report), env={"LD_LIBRARY_PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "skipped: no NVIDIA driver" in result.stdout
    text = report.read_text()
    assert "skipped: no NVIDIA driver" in text and "**result**: SKIP" in text

    # On the lent GPU machine a missing driver must not pass for success.
    strict = run_script("--report", str(report), "--require-driver", env={"LD_LIBRARY_PATH": ""})
    assert strict.returncode == 1 and "skipped: no NVIDIA driver" in strict.stdout


def test_default_report_goes_to_the_working_directory(tmp_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml") is not None:
        pytest.skip("a real NVIDIA driver is installed")
    assert run_script(env={"LD_LIBRARY_PATH": ""}, cwd=tmp_path).returncode == 0
    assert (tmp_path / "gpu-check-report.md").exists()


def test_simulated_node_runs_everything_but_the_cuda_clients(tmp_path: Path) -> None:
    node = write_node(tmp_path / "node.yaml", [gpu(0), gpu(1, numaNode=1)], nvlinks=[[0, 1, 12]],
                      topology=[[0, 1, 50]])
    report = tmp_path / "report.md"
    result = run_script("--simulate", str(node), "--report", str(report), "--event-wait", "0.2", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    text = report.read_text()
    assert "| 1. NVML inventory and health events | PASS |" in text
    assert "| 2. nvdp and the kubelet emulator (whole GPUs) | PASS |" in text
    # nvdp runs the simulated node's fake nvidia-cuda-mps-control: the MPS path up to the clients is real.
    assert "| 3. MPS slices with real CUDA clients | PASS |" in text
    assert "| Allocate slice-a: memory limit | PASS | 0=10G | 0=10G |" in text
    assert "| nvidia-cuda-mps-control running as nvdp's child | PASS |" in text
    assert "| CUDA clients | SKIP | simulated node: no CUDA |" in text
    assert "| MPS control daemon gone | PASS |" in text
    assert "nvdp (mps) exits 0 on SIGTERM | PASS" in text
    assert "| 4. nvdp stopped: nothing left behind | PASS |" in text
    # DRA MPS shares: two claims of 4 and 8 GiB, one daemon whose default follows the larger, gone after unprepare.
    assert "| 5. DRA MPS shares with real CUDA clients | PASS |" in text
    assert "| CDI share-small: memory limit | PASS | 0=4096M | 0=4096M |" in text
    assert "| CDI share-large: memory limit | PASS | 0=8192M | 0=8192M |" in text
    assert "| daemon's default pinned memory limit = the largest share | PASS | 8192M | 8192M |" in text
    assert "| both shares unprepared | PASS |" in text
    assert "| MPS control daemon gone after the last share | PASS | none | none |" in text
    assert "nvdp (dra) exits 0 on SIGTERM | PASS" in text
    assert text.count("| CUDA clients | SKIP | simulated node: no CUDA |") == 2
    assert f"`NVIDIA_VISIBLE_DEVICES={GPU0}`" in text  # what a container would get
    assert "| 0-1 | 12 | across CPUs |" in text
    assert "nvdp (whole) exits 0 on SIGTERM | PASS" in text
    assert "FAIL" not in text


# ----------------------------------------------------------------------------------- step 1 on a simulated node


@pytest.fixture
def simulated(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    def start(node: dict[str, Any]) -> None:
        adapter.shutdown()
        sim.activate(sim.parse_node(yaml.safe_dump(node)), tmp_path / "sim")
        adapter.init()

    yield start
    adapter.shutdown()


def test_inventory_listing_through_the_real_adapter(simulated: Callable[[dict[str, Any]], None]) -> None:
    simulated({"driverVersion": "570.124.06", "cudaDriverVersion": 12080,
               "gpus": [gpu(0, name="NVIDIA H100 80GB HBM3", memoryMiB=81559, computeCapability="9.0")]})
    inventory = adapter.read_inventory(Path("/nonexistent"))
    lines = gc.inventory_markdown(inventory, {GPU0: adapter.get_compute_mode(GPU0)})
    assert lines[0] == "Driver 570.124.06, CUDA driver API 12.8, 1 GPU(s)."
    assert f"| 0 | NVIDIA H100 80GB HBM3 | `{GPU0}` | 81559 MiB | 9.0 | off | 0 | 00000000:10:00.0 | 0 | DEFAULT |" \
        in lines
    assert "Topology: one GPU, no pairs to report." in lines


# -------------------------------------------------------------------------------------------------- pure logic


def test_mps_config_is_fork_style_and_fits() -> None:
    slices = gc.default_slices(10, 2)
    config = yaml.safe_load(gc.mps_config_yaml(slices, 0))
    assert config == {"version": "v1", "sharing": {"mps": {"resources": [
        {"name": "nvidia.com/gpu", "rename": "gpu-10gb", "memoryGB": 10, "replicas": 2, "devices": ["0"]},
        {"name": "nvidia.com/gpu", "rename": "gpu-20gb", "memoryGB": 20, "replicas": 1, "devices": ["0"]},
    ]}}}
    assert gc.fits(slices, 81559) and gc.fits(slices, 40 * 1024) and not gc.fits(slices, 40 * 1024 - 1)


@pytest.mark.parametrize(("value", "ordinal", "mib"), [
    ("0=10G", 0, 10240), ("0=512M", 0, 512), ("1=2G,0=4G", 0, 4096), ("0=10G", 1, None), ("0=1073741824", 0, 1024),
    ("0=xG", 0, None), ("", 0, None),
])
def test_parse_mem_limit(value: str, ordinal: int, mib: int | None) -> None:
    assert gc.parse_mem_limit(value, ordinal) == mib


def test_host_env_maps_container_paths_back_and_keeps_host_shm() -> None:
    view = gc.AllocateView(
        envs={"NVIDIA_VISIBLE_DEVICES": GPU0, "CUDA_MPS_PIPE_DIRECTORY": "/mps/pipe",
              "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10G", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "12"},
        mounts=(("/mps/pipe", f"/run/nvdp/mps/{GPU0}/pipe", False), ("/dev/shm", "/run/nvdp/mps/shm", False)))
    env, notes = gc.host_env(view)
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": f"/run/nvdp/mps/{GPU0}/pipe", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10G",
                   "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "12"}
    assert notes == [f"CUDA_MPS_PIPE_DIRECTORY: container path /mps/pipe is /run/nvdp/mps/{GPU0}/pipe on the host"]
    # Mounted at the same path in the container: nothing to translate, nothing to note.
    same = gc.AllocateView(envs={"CUDA_MPS_PIPE_DIRECTORY": "/m/p"}, mounts=(("/m/p", "/m/p", False),))
    assert gc.host_env(same) == ({"CUDA_MPS_PIPE_DIRECTORY": "/m/p"}, [])


def test_client_env_replaces_every_mps_setting() -> None:
    base = {"PATH": "/bin", "CUDA_MPS_PIPE_DIRECTORY": "/tmp/nvidia-mps", "CUDA_VISIBLE_DEVICES": "1"}
    assert gc.client_env(base, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}) == {
        "PATH": "/bin", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}


def test_parse_client_output() -> None:
    out = "some CUDA banner\nGPUCHECK-RESULT {\"pid\": 7, \"cuda_ok\": true, \"alloc_mib\": 9984, \"unknown\": 1}\n"
    report = gc.parse_client_output("slice-a", out)
    assert (report.label, report.pid, report.cuda_ok, report.alloc_mib, report.error) == ("slice-a", 7, True, 9984, "")
    missing = gc.parse_client_output("slice-b", "", "Traceback\nImportError: no torch\n", 1)
    assert missing.error == "exit 1, no result line: Traceback | ImportError: no torch" and not missing.cuda_ok


def test_overlap_fraction() -> None:
    a = gc.ClientReport("a", matmul_start=100.0, matmul_end=103.0)
    assert gc.overlap_fraction(a, gc.ClientReport("b", matmul_start=100.3, matmul_end=103.3)) == pytest.approx(0.9)
    assert gc.overlap_fraction(a, gc.ClientReport("b", matmul_start=104.0, matmul_end=107.0)) == 0.0
    assert gc.overlap_fraction(a, gc.ClientReport("b")) == 0.0


@pytest.mark.parametrize(("alloc", "ok"), [(9984, True), (8704, True), (10496, True), (8448, False), (10752, False),
                                           (81408, False), (None, False)])
def test_judge_memory_near_the_limit(alloc: int | None, ok: bool) -> None:
    assert gc.judge_memory(alloc, 10240).ok is ok


@pytest.mark.parametrize(("tflops", "percent", "ok"), [
    (75.0, 12, True),    # 12.5 % of 600 at 12 % threads
    (600.0, 12, False),  # no limit at all
    (20.0, 12, False),   # starved
    (150.0, 25, True),
    (590.0, 100, True),
])
def test_judge_share(tflops: float, percent: int, ok: bool) -> None:
    assert gc.judge_share(tflops, 600.0, percent).ok is ok


def test_judge_share_without_a_baseline_cannot_judge() -> None:
    assert gc.judge_share(75.0, None, 12).ok is None
    assert gc.judge_share(None, 600.0, 12).ok is False


def test_judge_together() -> None:
    assert gc.judge_together(75.0, 72.0, [12, 12]).ok is True     # room for both: each keeps its rate
    assert gc.judge_together(75.0, 30.0, [12, 12]).ok is False    # squeezed though there was room
    assert gc.judge_together(500.0, 490.0, [90, 90]).ok is False  # oversubscribed yet nobody slowed down
    assert gc.judge_together(500.0, 280.0, [90, 90]).ok is True   # about 1/1.8 of its rate
    assert gc.judge_together(None, 72.0, [12, 12]).ok is False


def test_step_status_and_report() -> None:
    passed, failed, skipped = gc.Step("one"), gc.Step("two"), gc.Step("three")
    passed.check("a", True, 1, 1)
    passed.check("b", None, "n/a")
    failed.check("c", True)
    failed.check("d", False, "81408 MiB", "8704-10496 MiB")
    skipped.skip("simulated node")
    assert (passed.status, failed.status, skipped.status) == (gc.PASS, gc.FAIL, gc.SKIP)
    assert gc.overall([passed, skipped]) == gc.PASS and gc.overall([passed, failed]) == gc.FAIL
    text = gc.render_report({"date": "today"}, [passed, failed, skipped], ["a note"])
    assert "- **result**: FAIL" in text
    assert "| 2. two | FAIL | 1 pass, 1 fail |" in text and "| 3. three | SKIP | simulated node |" in text
    assert "| d | FAIL | 81408 MiB | 8704-10496 MiB |" in text and "- a note" in text


def test_processes_named_finds_this_process() -> None:
    # This process's own program name (python, python3 or pytest, depending on how the suite was started).
    argv = tuple(a.decode() for a in Path("/proc/self/cmdline").read_bytes().split(b"\0") if a)
    found = gc.processes_named([gc.ProcessInfo(os.getpid(), os.getppid(), argv).program])
    assert os.getpid() in {p.pid for p in found}
    me = next(p for p in found if p.pid == os.getpid())
    assert me.ppid == os.getppid()
    assert gc.process_env(os.getpid()).get("PATH") == os.environ.get("PATH") or "PATH" not in os.environ


# ------------------------------------------------------------------------ step 3 against fakes (no GPU, no MPS)


def load_script() -> ModuleType:
    loader = SourceFileLoader("gpu_check_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is created.
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


class FakeNvdp:
    pid = 4000

    def poll(self) -> None:
        return None


class FakeKubelet:
    """What nvdp with the MPS config would register and answer, per the MPS contract."""

    def __init__(self, mps_root: Path, percents: dict[str, int]) -> None:
        self.mps_root = mps_root
        self.percents = percents

    def devices(self, resource: str) -> dict[str, str]:
        counts = {"nvidia.com/gpu-10gb": 2, "nvidia.com/gpu-20gb": 1}
        size = resource.removeprefix("nvidia.com/gpu-").removesuffix("gb")
        return {f"{GPU0}::{size}::{n}": "Healthy" for n in range(counts.get(resource, 0))}

    def wait_for(self, predicate: Callable[[FakeKubelet], bool], timeout: float) -> bool:
        return predicate(self)

    def allocate(self, resource: str, ids: list[str]) -> api.AllocateResponse:
        size = resource.removeprefix("nvidia.com/gpu-").removesuffix("gb")
        pipe = self.mps_root / GPU0 / "pipe"
        pipe.mkdir(parents=True, exist_ok=True)
        envs = {"NVIDIA_VISIBLE_DEVICES": GPU0, "CUDA_MPS_PIPE_DIRECTORY": f"/mps/{GPU0}/pipe",
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={size}G",
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(self.percents[size])}
        mounts = [api.Mount(container_path=f"/mps/{GPU0}/pipe", host_path=str(pipe)),
                  api.Mount(container_path="/dev/shm", host_path=str(self.mps_root / "shm"))]
        return api.AllocateResponse(container_responses=[api.ContainerAllocateResponse(envs=envs, mounts=mounts)])


class FakeNvml:
    class NvmlError(Exception):
        pass

    def get_compute_mode(self, uuid: str) -> int:
        return gc.EXCLUSIVE_PROCESS


def fake_clients(limited: bool) -> Callable[..., dict[str, gc.ClientReport]]:
    """Client reports as an H100 at 12 % (slices) and 25 % (daemon default) would give; `limited=False` as if the
    client env were ignored (each slice takes the daemon's default)."""

    def run(ctx: Any, runs: list[tuple[str, dict[str, str], list[str]]], together: bool = False
            ) -> dict[str, gc.ClientReport]:
        reports = {}
        for label, env, _ in runs:
            mib, tflops = {"unshared": (80896, 600.0), "daemon-default": (20224, 150.0)}.get(label, (9984, 75.0))
            if not limited and label.startswith("slice"):
                mib, tflops = 20224, 150.0
            if label == "unshared":
                assert env == {}
            elif label == "daemon-default":
                assert set(env) == {"CUDA_MPS_PIPE_DIRECTORY"}
            else:  # exactly the env Allocate returned, on host paths
                assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=10G"
                assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(ctx.mps_root / GPU0 / "pipe")
            reports[label] = gc.ClientReport(
                label, pid=1, cuda_ok=True, mps_listed=label != "unshared", alloc_mib=None if together else mib,
                alloc_stop="out of memory", tflops=tflops * (0.96 if together else 1), matmul_start=10.0,
                matmul_end=13.0)
        return reports

    return run


@pytest.mark.parametrize("limited", [True, False])
def test_mps_step_judges_fabricated_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limited: bool) -> None:
    script = load_script()
    args = script.parse_args(["--report", str(tmp_path / "r.md")])
    guard = script.Guard()
    guard.original_modes = {GPU0: 0}
    ctx = script.Context(args, guard, tmp_path, deadline=time.monotonic() + 300)
    ctx.nvml = FakeNvml()
    ctx.kubelet = FakeKubelet(tmp_path / "mps", {"10": 12, "20": 25})
    ctx.inventory = NodeInventory("580.82.07", 13000, (Gpu(0, GPU0, "NVIDIA H100 80GB HBM3", 81559, 0,
                                                           "00000000:10:00.0", "9.0", 0),))
    monkeypatch.setattr(script, "start_nvdp", lambda *a: FakeNvdp())
    monkeypatch.setattr(script, "find_mps_control", lambda ctx: "/usr/bin/nvidia-cuda-mps-control")
    monkeypatch.setattr(script, "torch_available", lambda: True)
    monkeypatch.setattr(script, "run_clients", fake_clients(limited))
    monkeypatch.setattr(gc, "processes_named", lambda names, processes=None: [
        gc.ProcessInfo(4001, FakeNvdp.pid, ("nvidia-cuda-mps-control", "-f"))])

    step = script.step_mps(ctx)
    statuses = {c.name: c.status for c in step.checks}
    assert ctx.mps_daemon_pids == [4001]
    assert (tmp_path / "mps-config.yaml").read_text() == gc.mps_config_yaml(gc.default_slices(10, 2), 0)
    for name in ("slices registered, all Healthy (daemon answering)", "compute mode while shared",
                 "Allocate slice-a: memory limit", "Allocate big: memory limit", "Allocate: thread percentages",
                 "Allocate: MPS shm mounted at /dev/shm", "Allocate: pipe directory exists under the MPS root",
                 "daemon-default: allocation stops near the daemon's default (largest slice)",
                 "together: the two matmul windows overlap"):
        assert statuses[name] == gc.PASS, (name, step.checks)
    wanted = gc.PASS if limited else gc.FAIL
    assert statuses["slice-a: allocation stops near the slice"] == wanted
    assert statuses["slice-b: compute share alone"] == wanted
    assert step.status == wanted
    report = gc.render_report({}, [step])
    assert f"CUDA_MPS_PIPE_DIRECTORY: container path /mps/{GPU0}/pipe is {tmp_path}/mps/{GPU0}/pipe" in report


def test_mps_step_refuses_mig_and_missing_control_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script()
    guard = script.Guard()
    guard.original_modes = {GPU0: 0}
    ctx = script.Context(script.parse_args([]), guard, tmp_path, deadline=time.monotonic() + 300)
    base = Gpu(0, GPU0, "NVIDIA H100 80GB HBM3", 81559, 0, "00000000:10:00.0", "9.0", 0)
    ctx.inventory = NodeInventory("580.82.07", 13000, (dataclasses.replace(base, mig_enabled=True),))
    assert script.step_mps(ctx).status == gc.SKIP
    ctx.inventory = NodeInventory("580.82.07", 13000, (base,))
    monkeypatch.setattr(script, "find_mps_control", lambda ctx: None)
    step = script.step_mps(ctx)
    assert step.status == gc.FAIL and "nvidia-cuda-mps-control not found" in step.reason


def test_guard_restores_only_a_changed_compute_mode() -> None:
    script = load_script()
    calls: list[tuple[str, int]] = []

    class Nvml:
        modes = {GPU0: 3, "GPU-other": 0}

        def get_compute_mode(self, uuid: str) -> int:
            return self.modes[uuid]

        def set_compute_mode(self, uuid: str, mode: int) -> None:
            calls.append((uuid, mode))

    guard = script.Guard()
    guard.nvml = Nvml()
    guard.original_modes = {GPU0: 0, "GPU-other": 0}
    guard.cleanup()
    guard.cleanup()  # idempotent: atexit runs it again after the finally did
    assert calls == [(GPU0, 0)]
    assert guard.actions == [f"restored compute mode DEFAULT on {GPU0}"]
    assert isinstance(script.parse_args([]), argparse.Namespace)


def test_client_without_pytorch_reports_why() -> None:
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed here")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_client.py"), "--label", "x"],
                            capture_output=True, text=True, timeout=30)
    report = gc.parse_client_output("x", result.stdout, result.stderr, result.returncode)
    assert result.returncode == 1 and not report.cuda_ok
    assert report.error == "ModuleNotFoundError: No module named 'torch'"


@pytest.mark.parametrize(("removed_mib", "ok"), [(8000, True), (4000, False), (80000, False)])
def test_dra_share_clients_judged_against_their_share_and_the_largest(removed_mib: int, ok: bool) -> None:
    """A client that removed its env is held near the largest share (8 GiB): not near its own, not unbounded."""
    script = load_script()
    step = gc.Step("DRA MPS shares")
    sizes = {"share-small": 3900, "share-large": 7900, "env-removed": removed_mib}
    reports = {label: gc.ClientReport(label, pid=1, cuda_ok=True, mps_listed=True, alloc_mib=mib,
                                      alloc_stop="out of memory") for label, mib in sizes.items()}
    script.judge_share_clients(step, reports, 256)
    statuses = {c.name: c.status for c in step.checks}
    assert statuses["share-small: allocation stops near its share"] == gc.PASS
    assert statuses["share-large: allocation stops near its share"] == gc.PASS
    removed = statuses["env-removed: allocation stops near the largest share, not the whole GPU"]
    assert removed == (gc.PASS if ok else gc.FAIL)

