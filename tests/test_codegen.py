"""The committed betterproto2 package is exactly what proto/ generates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-proto"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_drift_check_fails_when_the_proto_changes(tmp_path: Path) -> None:
    # Prove the check can fail: a copy of the repository's proto/ with one extra field must not match.
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    for package in ("kubelet", "dra"):
        shutil.copytree(ROOT / "nvdp" / package / "api", copy / "nvdp" / package / "api")
    (copy / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gen-proto", copy / "scripts" / "gen-proto")
    proto = copy / "proto" / "v1beta1" / "api.proto"
    proto.write_text(proto.read_text().replace("message Empty {}", "message Empty {\n  string extra = 1;\n}"))
    result = subprocess.run([sys.executable, str(copy / "scripts" / "gen-proto"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nvdp/kubelet/api/v1beta1/__init__.py" in result.stderr
    # Only the package that proto belongs to differs.
    assert "nvdp/dra/api" not in result.stderr


def test_the_drift_check_covers_the_dra_protos(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    for package in ("kubelet", "dra"):
        shutil.copytree(ROOT / "nvdp" / package / "api", copy / "nvdp" / package / "api")
    (copy / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gen-proto", copy / "scripts" / "gen-proto")
    proto = copy / "proto" / "dra-health" / "v1alpha1" / "api.proto"
    proto.write_text(proto.read_text().replace("message NodeWatchResourcesRequest {}",
                                               "message NodeWatchResourcesRequest {\n  string extra = 1;\n}"))
    result = subprocess.run([sys.executable, str(copy / "scripts" / "gen-proto"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nvdp/dra/api/v1alpha1/__init__.py" in result.stderr
