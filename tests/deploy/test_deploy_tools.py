"""Lint the Containerfile with hadolint and check the systemd units with systemd-analyze verify."""

from __future__ import annotations

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNITS = ("nvdp.service", "nvdp-mps-host.service", "run-nvidia-mps-shm.mount")


def test_containerfile_passes_hadolint(tool):
    done = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", "--no-color", str(ROOT / "Containerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_containerfile_essentials():
    text = (ROOT / "Containerfile").read_text()
    assert 'ENTRYPOINT ["nvdp"]' in text
    assert "NVIDIA_VISIBLE_DEVICES=all" in text and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert "python:3.11." in text and "-slim-bookworm" in text, "base image pinned by an exact version tag"
    assert text.count("FROM ") == 2, "one build stage, one runtime stage"


def test_systemd_units_verify(tool, tmp_path):
    # verify checks that ExecStart exists: point it at the nvdp installed with the package under test.
    nvdp = tool("nvdp")
    for unit in UNITS:
        text = (ROOT / "deploy/systemd" / unit).read_text().replace("/usr/local/bin/nvdp", nvdp)
        (tmp_path / unit).write_text(text)
    done = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    # Unknown or misspelt settings are only warnings to verify: any line about our units fails too.
    ours = [line for line in output.splitlines() if any(u in line for u in UNITS)]
    assert done.returncode == 0 and not ours, output


def test_service_is_notify_with_restart_and_hardening():
    unit = (ROOT / "deploy/systemd/nvdp.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, value)
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure"
    assert settings["EnvironmentFile"].lstrip("-").startswith("/etc/nvdp/")
    for hardening in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert settings[hardening] == "yes"
    # Each of these would hide /dev/nvidia* from the daemon.
    for forbidden in ("PrivateDevices", "DevicePolicy", "ProtectClock", "DeviceAllow"):
        assert forbidden not in settings


def test_the_mps_host_unit_owns_the_daemons_apart_from_nvdp():
    def settings(name):
        out: dict[str, list[str]] = {}
        for line in (ROOT / "deploy/systemd" / name).read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                out.setdefault(key, []).append(value)
        return out

    host, nvdp = settings("nvdp-mps-host.service"), settings("nvdp.service")
    assert host["ExecStart"] == ["/usr/local/bin/nvdp mps-host"]
    # SIGTERM to the host alone, which removes its daemons before the cgroup is killed.
    assert host["KillMode"] == ["mixed"]
    assert host["EnvironmentFile"] == nvdp["EnvironmentFile"], "one settings file: the same MPS_ROOT"
    # nvdp wants the host and starts after it; nothing in nvdp's unit stops or restarts the host.
    assert "nvdp-mps-host.service" in nvdp["Wants"] and "nvdp-mps-host.service" in nvdp["After"][0]
    assert "Requires" not in nvdp and "BindsTo" not in nvdp and "PartOf" not in nvdp
    assert "MPS_HOST_SOCKET=/run/nvidia/mps/nvdp-mps-host.sock" in nvdp["Environment"]
