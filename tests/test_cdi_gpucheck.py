"""gpu-check's CDI step (nvdp's generator against `nvidia-ctk cdi generate`), without a GPU: a fake nvidia-ctk and
the simulated driver root."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from nvdp import gpucheck as gc
from nvdp.core.inventory import Gpu, NodeInventory
from tests.test_cdi_discover import sim_root
from tests.test_gpu_check import load_script

GPU0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"


def edits(*nodes: str, hooks: tuple[str, ...] = ()) -> dict[str, object]:
    return {"deviceNodes": [{"path": n} for n in nodes],
            "hooks": [{"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk",
                       "args": ["nvidia-ctk", "hook", h]} for h in hooks]}


THEIRS = {
    "cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
    "devices": [{"name": "0", "containerEdits": edits("/dev/nvidia0")},
                {"name": "all", "containerEdits": edits("/dev/nvidia0")}],
    "containerEdits": {**edits("/dev/nvidiactl", "/dev/nvidia-uvm", hooks=("update-ldcache", "create-symlinks")),
                       "env": ["NVIDIA_CTK_LIBCUDA_DIR=/usr/lib", "NVIDIA_VISIBLE_DEVICES=void"]},
}


def test_cdi_diff_names_what_each_side_has_alone() -> None:
    ours = {"kind": "k8s.device-plugin.nvidia.com/gpu",
            "devices": [{"name": "0", "containerEdits": edits("/dev/nvidia0", "/dev/dri/card1")}],
            "containerEdits": {**edits("/dev/nvidiactl", hooks=("update-ldcache",)),
                               "env": ["NVIDIA_VISIBLE_DEVICES=void"]}}
    rows = gc.cdi_diff(ours, THEIRS)
    assert rows[:2] == ["| facet | only in nvdp | only in nvidia-ctk |", "|---|---|---|"]
    assert "| spec device nodes | - | /dev/nvidia-uvm |" in rows
    assert "| spec hooks | - | create-symlinks |" in rows
    assert "| spec env names | - | NVIDIA_CTK_LIBCUDA_DIR |" in rows
    assert "| device names | - | all |" in rows
    assert "| device 0 nodes | /dev/dri/card1 | - |" in rows
    assert not any("device all" in r for r in rows)  # a device one side lacks is one row above, not its details
    assert gc.cdi_diff(THEIRS, THEIRS) == ["nvdp's spec and nvidia-ctk's agree on every facet compared."]


def fake_ctk(directory: Path) -> Path:
    """An `nvidia-ctk` that writes THEIRS to `--output` and records its arguments."""
    script = directory / "nvidia-ctk"
    script.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(directory / 'args.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"open(sys.argv[sys.argv.index('--output') + 1], 'w').write({json.dumps(json.dumps(THEIRS))})\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def cdi_context(tmp_path: Path):  # type: ignore[no-untyped-def]
    script = load_script()
    ctx = script.Context(script.parse_args(["--simulate", "node.yaml"]), script.Guard(), tmp_path,
                         deadline=time.monotonic() + 300)
    ctx.driver_root = ctx.host_root = sim_root(tmp_path)
    ctx.inventory = NodeInventory("580.82.07", 13000, (Gpu(0, GPU0, "A100", 40960, 0, "00000000:07:00.0", "8.0"),))
    return script, ctx


def test_the_cdi_step_reports_the_diff_with_nvidia_ctk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ctk(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script, ctx = cdi_context(tmp_path)
    step = script.step_cdi(ctx)
    assert step.status == gc.PASS, step.details
    args = json.loads((bin_dir / "args.json").read_text())
    assert args[:2] == ["cdi", "generate"] and args[args.index("--driver-root") + 1] == str(ctx.driver_root)
    assert "| device names | - | all |" in step.details
    assert [c.measured for c in step.checks] == ["1 devices", "2 devices"]


def test_the_cdi_step_is_skipped_without_nvidia_ctk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    script, ctx = cdi_context(tmp_path)
    step = script.step_cdi(ctx)
    assert (step.status, step.reason) == (gc.SKIP, "nvidia-ctk not found on PATH: nothing to compare with")
