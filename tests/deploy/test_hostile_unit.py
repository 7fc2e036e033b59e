"""Issue 14: the systemd unit's hardening and limits. `systemd-analyze security` scored the unit 4.7 before;
SystemCallFilter, ProtectProc, LimitNOFILE and LimitCORE bring it to 3.4 (checked here, offline; the effect on
NVML and MPS needs a GPU node, see docs/security.md)."""

from __future__ import annotations

import re
import subprocess

from tests.deploy.test_deploy_tools import ROOT

UNIT = ROOT / "deploy/systemd/nvdp.service"


def settings() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, value)
    return found


def test_descriptor_and_core_limits() -> None:
    unit = settings()
    # The default soft limit (1024) is what the hostile test exhausted; 65536 leaves room for every GPU's NVML
    # descriptors, the plugin servers' connections and the metrics port's 64 connections many times over.
    assert int(unit["LimitNOFILE"]) >= 65536
    assert unit["LimitCORE"] == "0"  # a core dump would hold the API token


def test_system_calls_and_proc_are_restricted() -> None:
    unit = settings()
    allowed = unit["SystemCallFilter"].split()
    assert allowed[0] == "@system-service" and "mount" in allowed  # the MPS tmpfs
    assert unit["SystemCallErrorNumber"] == "EPERM"
    assert unit["ProtectProc"] == "invisible"
    assert "ProcSubset" not in unit  # would hide /proc/driver/nvidia (NVML, MIG capability minors)


def test_exposure_score_at_most_3_5(tool, tmp_path) -> None:
    unit = tmp_path / "nvdp.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/nvdp", tool("nvdp")))
    done = subprocess.run([tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    score = re.search(r"Overall exposure level for nvdp\.service: (\d+\.\d+)", done.stdout + done.stderr)
    assert score is not None, done.stdout + done.stderr
    assert float(score.group(1)) <= 3.5, done.stdout
