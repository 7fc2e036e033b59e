"""Smaller items of the CLI and settings: readable defaults in --help, fallback strategies checked always, the
time-slicing replica floor, an empty --kubelet-socket said out loud, and `nvdp demo` with run's flags."""

from __future__ import annotations

import json
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


def test_demo_dra_prepares_a_claim_whose_cdi_id_resolves_to_the_written_spec(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import nvdp.demo

    resolved: list[tuple[str, Path, list[str]]] = []
    real_resolve = nvdp.demo.resolve_cdi_id

    def resolve_and_read(cdi_root: Path, cdi_id: str) -> tuple[Path, dict[str, object]] | None:
        found = real_resolve(cdi_root, cdi_id)
        assert found is not None, f"{cdi_id} resolves to no spec under {cdi_root}"
        # Read here, while the claim is prepared: the spec is gone after the unprepare.
        path, device = found
        spec = json.loads(path.read_text())
        assert spec["kind"] == cdi_id.partition("=")[0]
        resolved.append((cdi_id, path, [n["path"] for n in device["containerEdits"]["deviceNodes"]]))
        return found

    monkeypatch.setattr(nvdp.demo, "resolve_cdi_id", resolve_and_read)
    assert main(["demo", "--dra"]) == 0
    out = capsys.readouterr().out
    # The built-in node's last GPU (index 3) goes to DRA; the device plugin keeps the other three.
    assert "nvidia.com/gpu: 3/3 healthy" in out
    assert "gpu-3  NVIDIA A100-SXM4-40GB" in out
    assert "prepared demo-node/gpu-3" in out
    ((cdi_id, path, nodes),) = resolved
    assert cdi_id == "k8s.gpu.nvidia.com/claim=demo-claim-uid-gpu-3"
    assert f"CDI ID {cdi_id}\n     defined in {path.name}\n     device node /dev/nvidia3\n" in out
    assert nodes == ["/dev/nvidia3"]
    assert "unprepared: ok; claim spec files left: none" in out
    assert "plugin sockets left behind: none" in out
