"""Time slices through nvidia-smi (a fake script that records its arguments): real processes, so the real clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvdp.dra.prepare import SideEffectError
from nvdp.dra.timeslice import NvidiaSmiTimeSlicer, find_nvidia_smi


def fake_smi(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


async def test_the_interval_is_set_as_nvidias_driver_does(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    smi = fake_smi(tmp_path / "bin", f'echo "$@" >> {calls}')
    await NvidiaSmiTimeSlicer(smi).set_interval("GPU-1", 3)
    assert calls.read_text().splitlines() == ["-i GPU-1 -c DEFAULT", "compute-policy -i GPU-1 --set-timeslice 3"]


async def test_a_failure_says_what_nvidia_smi_said(tmp_path: Path) -> None:
    smi = fake_smi(tmp_path / "bin", 'echo "Insufficient Permissions\n" >&2; exit 4')
    with pytest.raises(SideEffectError, match=r"nvidia-smi -i GPU-1 -c DEFAULT failed with exit status 4: "
                                              r"Insufficient Permissions"):
        await NvidiaSmiTimeSlicer(smi).set_interval("GPU-1", 0)


async def test_a_hung_nvidia_smi_is_killed_at_the_bound(tmp_path: Path) -> None:
    smi = fake_smi(tmp_path / "bin", "exec sleep 30")
    with pytest.raises(SideEffectError, match=r"did not finish within 0\.2 s"):
        await NvidiaSmiTimeSlicer(smi, timeout_s=0.2).set_interval("GPU-1", 0)


async def test_a_missing_binary_is_a_side_effect_error(tmp_path: Path) -> None:
    with pytest.raises(SideEffectError, match="cannot run nvidia-smi"):
        await NvidiaSmiTimeSlicer(tmp_path / "nvidia-smi").set_interval("GPU-1", 0)


def test_find_nvidia_smi_looks_on_path_then_under_the_driver_root(tmp_path: Path) -> None:
    root = tmp_path / "driver"
    assert find_nvidia_smi(root, "") is None
    in_root = fake_smi(root / "usr/bin", "true")
    assert find_nvidia_smi(root, str(tmp_path / "nowhere")) == in_root
    on_path = fake_smi(tmp_path / "path", "true")
    assert find_nvidia_smi(root, os.pathsep.join([str(tmp_path / "nowhere"), str(on_path.parent)])) == on_path
