"""Smaller items of the CLI and settings: readable defaults in --help, fallback strategies checked always, the
time-slicing replica floor, an empty --kubelet-socket said out loud, and `nvdp demo` with run's flags."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest

from nvdp.cli import build_parser, main, warn_about
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.settings import resolve


def test_help_prints_defaults_as_one_would_type_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default True" not in text and "default False" not in text and "default None" not in text
    assert "default '" not in text
    assert "[env $FAIL_ON_INIT_ERROR; default true]" in text
    assert "[env $PASS_DEVICE_SPECS; default false]" in text
    assert "[env $DEVICE_LIST_STRATEGY; default envvar]" in text
    assert "[env $MPS_PROBE_TIMEOUT; default 3s]" in text
    assert "[env $MPS_PROBE_FAILURES; default 3]" in text
    assert "[env $NVIDIA_DEV_ROOT]" in text  # no default: none printed


@pytest.mark.parametrize(("cli", "env", "where"), [
    ({"fallback_strategies": "named,bogus"}, {}, "--fallback-strategies"),
    ({}, {"FALLBACK_STRATEGIES": "bogus"}, "FALLBACK_STRATEGIES"),
])
def test_unknown_fallback_strategies_are_refused_without_config_dir(
        cli: dict[str, str], env: dict[str, str], where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(cli, env)
    assert str(caught.value) == (f"{where}: unknown fallback strategy 'bogus': accepted values are named, single, "
                                 "empty")


def test_time_slicing_replicas_below_two_name_the_floor_of_two(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ts.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
                      "      replicas: -3\n")
    assert main(["config", "validate", str(config)]) == 1
    report = capsys.readouterr().out  # validate's report (its errors included) is its output
    assert "number of replicas must be >= 2, got -3" in report and ">= 1" not in report


def test_an_empty_kubelet_socket_is_said_at_start(caplog: pytest.LogCaptureFixture) -> None:
    settings = resolve({"kubelet_socket": ""}, {})
    assert settings.kubelet_socket is None
    with caplog.at_level(logging.WARNING, logger="nvdp"):
        warn_about(settings)
    assert f"serves its plugin sockets in {tempfile.gettempdir()}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nvdp"):
        warn_about(resolve({}, {}))
    assert caplog.text == ""


def test_demo_shows_a_default_install_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "passDeviceSpecs false" in out and "config none (defaults)" in out
    assert "env    NVIDIA_VISIBLE_DEVICES=" in out
    assert "device nodes: none in the response" in out
    assert "plugin sockets left behind: none" in out


def test_demo_takes_a_config_file_and_run_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ts.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
                      "      replicas: 2\n")
    assert main(["demo", "--config-file", str(config), "--pass-device-specs", "--device-id-strategy", "index"]) == 0
    out = capsys.readouterr().out
    assert f"passDeviceSpecs true, MIG strategy none, config {config}" in out
    assert "nvidia.com/gpu: 8/8 healthy" in out  # two replicas of each of the four GPUs
    assert "env    NVIDIA_VISIBLE_DEVICES=0" in out
    assert "device /dev/nvidia0 <-" in out


@pytest.mark.parametrize("argv", [["run", "--help"], ["--mig-strategy", "none", "--help"], ["demo", "--help"],
                                  ["config", "validate", "--help"]])
def test_each_command_that_takes_runs_flags_lists_them(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The parser is built with only the chosen command's copy of run's flags (start-up, docs/performance.md)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "--mig-strategy" in capsys.readouterr().out


def test_a_parser_for_one_command_leaves_runs_flags_off_the_others() -> None:
    parser = build_parser("run")
    assert parser.parse_args(["run", "--mig-strategy", "mixed"]).mig_strategy == "mixed"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--mig-strategy", "mixed"])
