"""`nvdp config validate`: deployed flags and env vars, every error, warnings, exit codes, the plan (issue 15)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nvdp.sim
from nvdp import validate
from nvdp.cli import main
from nvdp.core.config.settings import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NODE = Path(nvdp.sim.__file__).parent / "default-node.yaml"  # 4 x A100 40 GB
GPU0 = "GPU-3a1f6c52-8e0b-4d47-9c1e-0a1b2c3d4e01"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of this shell reaches the command unless a test sets it; the simulated node's state variable is
    restored after each test."""
    for option in OPTIONS:
        for name in option.envs:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("STRICT_CONFIG", raising=False)
    monkeypatch.setenv(nvdp.sim.STATE_ENV, os.environ.get(nvdp.sim.STATE_ENV, ""))


def seed_sample() -> str:
    """The MPS sample config of docs/sharing.md, verbatim (its first yaml block)."""
    text = (ROOT / "docs/sharing.md").read_text()
    match = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert match is not None
    assert "mps:" in match.group(1)
    return match.group(1)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["config", "validate", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


THREE_20GB = """\
version: v1
sharing:
  mps:
    resources:
      - name: nvidia.com/gpu
        rename: gpu-20gb
        memoryGB: 20
        replicas: 3
        devices: ["0"]
"""


def assert_verdict_last(out: str, path: str, verdict: str) -> None:
    """The verdict is the last line, and no line before it says `valid`."""
    lines = out.strip().splitlines()
    assert lines[-1].startswith(f"{path}: {verdict}"), out
    assert not any(re.search(r"(?<!in)valid\b", line) and line.startswith(path) for line in lines[:-1]), out


def test_the_seed_sample_verbatim_is_valid_and_prints_its_plan(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, seed_sample())
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 0, out
    assert_verdict_last(out, path, "valid")
    assert "errors" not in out
    # Per MPS resource: each client's memory limit and compute percentage, and where the percentage came from.
    assert (f"nvidia.com/gpu-10gb on GPU 0 ({GPU0}): 2 clients, each: memory limit 10 GB (10240 MiB), compute 25% "
            "(from the memory share: 10 GB of 40 GB)") in out
    assert "nvidia.com/gpu-20gb on GPU 0" in out and "compute 50% (from the memory share: 20 GB of 40 GB)" in out
    assert "nvidia.com/gpu-quarter on GPU 1" in out and "compute 20% (from computePercent)" in out
    assert f"{GPU0}::10::0" in out  # the whole plan too


def test_the_seed_sample_without_a_node_says_what_was_not_checked(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, seed_sample())
    code, out = run(capsys, path)
    assert code == 0, out
    assert_verdict_last(out, path, "valid")
    assert "not checked, as they need a node (give --simulate NODE.yaml)" in out
    assert "MPS slices fit each GPU's memory" in out
    assert "nvidia.com/gpu-10gb (sharing.mps.resources[0]): 2 per GPU, each client: memory limit 10 GB" in out
    assert "compute 20% (computePercent)" in out


def test_mps_needs_no_mps_root_and_says_what_it_assumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = seed_sample()
    without = "\n".join(line for line in sample.splitlines() if "mpsRoot" not in line and line != "flags:")
    path = write(tmp_path, without)
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 0, out
    assert "assuming /run/nvidia/mps, the Helm chart's default (mps.root)" in out
    assert f"pipe /run/nvidia/mps/{GPU0}/pipe" in out


def test_the_assumed_mps_root_is_the_charts(tmp_path: Path) -> None:
    values = yaml.safe_load((ROOT / "deploy/helm/nvdp/values.yaml").read_text())
    assert values["mps"]["root"] == validate.CHART_MPS_ROOT


def test_mps_root_from_the_environment_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPS_ROOT", "/srv/mps")
    path = write(tmp_path, THREE_20GB.replace("replicas: 3", "replicas: 2"))
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 0, out
    assert f"pipe /srv/mps/{GPU0}/pipe" in out
    assert "assuming" not in out


def test_three_20gb_slices_on_a_40gb_gpu_fail_naming_the_gpu_60_and_40(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, THREE_20GB)
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 1
    assert_verdict_last(out, path, "invalid: 1 error")
    error = next(line for line in out.splitlines() if "MPS slices ask for" in line)
    assert f"GPU 0 ({GPU0})" in error and "60 GB" in error and "40 GB" in error
    assert "plan:" not in out


def test_every_error_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, """\
version: v1
flags:
  migStrategy: bogus
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        replica: 4
      - name: nvidia.com/gpu
        replicas: 1
""")
    monkeypatch.setenv("DEVICE_ID_STRATEGY", "serial")
    code, out = run(capsys, path, "--imex-channel-ids", "1", "--metrics-address", "all")
    assert code == 1
    expected = [
        # The misspelt key upstream ignores is named in the error it leads to (no replicas at all).
        "$.sharing.timeSlicing.resources[0]: no replicas specified; note: $.sharing.timeSlicing.resources[0].replica:"
        " unknown key `replica` ignored",
        "$.sharing.timeSlicing: resources[1] (nvidia.com/gpu): number of replicas must be >= 2",
        "DEVICE_ID_STRATEGY: invalid value 'serial'",
        "--imex-channel-ids: invalid IMEX channel IDs: invalid IMEX config: channelIDs must be [] or [0]; found [1]",
        "--metrics-address: invalid address 'all'",
        "$.flags.migStrategy: invalid value 'bogus'",
    ]
    for message in expected:
        assert message in out, message
    assert_verdict_last(out, path, f"invalid: {len(expected)} errors")


def test_every_sharing_entry_is_checked_on_the_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, THREE_20GB + """\
      - name: nvidia.com/gpu
        rename: gpu-half
        replicas: 2
        devices: ["7"]
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        rename: gpu-ts
        replicas: 2
        devices: [9]
""")
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 1
    assert "60 GB" in out
    assert "sharing.mps.resources[1] (nvidia.com/gpu-half): device '7': no GPU with index 7" in out
    assert "sharing.timeSlicing.resources[0] (nvidia.com/gpu-ts): device '9': no GPU with index 9" in out
    assert_verdict_last(out, path, "invalid: 3 errors")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_deployed_mig_strategy_is_honoured(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, THREE_20GB)
    argv = [path]
    if how == "flag":
        argv += ["--mig-strategy", "mixed"]
    else:
        monkeypatch.setenv("MIG_STRATEGY", "mixed")
    code, out = run(capsys, *argv)
    assert code == 1
    assert "using --mig-strategy=mixed is not supported with MPS" in out


def test_the_deployed_device_list_strategy_and_id_strategy_are_shown(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE_ID_STRATEGY", "index")
    path = write(tmp_path, "version: v1\n")
    code, out = run(capsys, path, "--device-list-strategy", "volume-mounts", "--pass-device-specs")
    assert code == 0, out
    assert ("settings: migStrategy none, deviceListStrategy volume-mounts, deviceIDStrategy index, "
            "passDeviceSpecs true") in out


def test_equal_split_compute_comes_from_100_over_replicas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, """\
version: v1
sharing:
  mps:
    resources:
      - name: nvidia.com/gpu
        rename: gpu-quarter
        replicas: 4
        devices: ["1"]
""")
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 0, out
    assert "nvidia.com/gpu-quarter on GPU 1" in out
    assert "each: memory limit 10 GB (10240 MiB), compute 25% (from 100/replicas: 100/4)" in out


# A resource the node lacks is skipped with a warning (one config serves a fleet).
MIG_ON_A_NODE_WITHOUT_MIG = """\
version: v1
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/mig-1g.5gb
        replicas: 2
"""


def test_warnings_are_listed_and_allowed_unless_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MIG_ON_A_NODE_WITHOUT_MIG)
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 0, out
    assert "warnings (1):" in out and "this node has no nvidia.com/mig-1g.5gb devices: nothing to share" in out
    assert_verdict_last(out, path, "valid, with 1 warning")
    assert out.index("warnings") < out.index("plan:")

    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE), "--strict")
    assert code == 1
    assert_verdict_last(out, path, "invalid: 1 warning (--strict)")


def test_the_warnings_hook_feeds_the_report_and_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "version: v1\n")
    monkeypatch.setattr(validate, "collect_warnings",
                        lambda config, source, settings: [f"{source}: $.flags.x: a warning"])
    code, out = run(capsys, path)
    assert code == 0
    assert f"- {path}: $.flags.x: a warning" in out
    code, out = run(capsys, path, "--strict")
    assert code == 1
    monkeypatch.setenv("STRICT_CONFIG", "true")
    code, out = run(capsys, path)
    assert code == 1


def test_errors_come_before_warnings_and_warnings_before_the_plan(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "version: v1\nflags:\n  migStrategy: bogus\n")
    monkeypatch.setattr(validate, "collect_warnings", lambda config, source, settings: ["W"])
    code, out = run(capsys, path)
    assert code == 1
    assert out.index("errors (1):") < out.index("warnings (1):") < out.index(f"{path}: invalid")


def test_config_dir_validates_every_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    write(configs, seed_sample(), "default")
    write(configs, THREE_20GB, "big-slices")
    code, out = run(capsys, "--config-dir", str(configs), "--simulate", str(DEFAULT_NODE))
    assert code == 1
    assert f"{configs / 'default'}: valid" in out
    assert f"{configs / 'big-slices'}: invalid: 1 error" in out
    assert out.strip().endswith("2 configs: some invalid")


def test_several_files_and_config_file_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    good = write(tmp_path, "version: v1\n", "a.yaml")
    code, out = run(capsys, good, write(tmp_path, "version: v9\n", "b.yaml"))
    assert code == 1 and "2 configs: some invalid" in out
    monkeypatch.setenv("CONFIG_FILE", good)
    code, out = run(capsys)
    assert code == 0 and f"{good}: valid" in out


def test_no_config_at_all_says_what_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys)
    assert code == 2
    assert "name FILEs, or give --config-file or --config-dir" in out


@pytest.mark.parametrize("node", ["missing.yaml", "bad.yaml"])
def test_a_bad_node_file_is_one_line(node: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("gpus: 7\n")
    code, out = run(capsys, write(tmp_path, "version: v1\n"), "--simulate", str(tmp_path / node))
    assert code == 1
    assert "Traceback" not in out
    assert out.startswith(f"nvdp config validate: --simulate {tmp_path / node}: ")


def test_unreadable_config_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "Traceback" not in out and "cannot read config file" in out


def test_help_lists_the_run_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["config", "validate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--mig-strategy", "--mps-root", "--device-list-strategy", "--simulate", "--strict",
                 "--config-dir"):
        assert flag in out


def test_as_a_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {n for o in OPTIONS for n in o.envs}}
    good = write(tmp_path, seed_sample(), "good.yaml")
    bad = write(tmp_path, THREE_20GB, "bad.yaml")
    ok = subprocess.run([sys.executable, "-m", "nvdp", "config", "validate", good], env=env, capture_output=True,
                        text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith(f"{good}: valid")
    failed = subprocess.run([sys.executable, "-m", "nvdp", "config", "validate", bad, "--simulate", str(DEFAULT_NODE),
                             "--mig-strategy", "single"], env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stdout + failed.stderr
    assert "60 GB" in failed.stdout and failed.stdout.strip().endswith(f"{bad}: invalid: 1 error")


def test_the_readme_migration_starts_with_validating_and_explains_the_compute_cap() -> None:
    readme = (ROOT / "README.md").read_text()
    migration = readme[readme.index("## Migrating from NVIDIA's plugin"):]
    migration = migration[:migration.index("\n## ", 5)]
    first_step = migration[migration.index("1. "):migration.index("2. ")]
    assert "Validate every existing config first, with the deployed flags" in first_step
    assert "config.map" in first_step and "nvdp config validate --config-dir" in first_step
    assert migration.index("nvdp config validate") < migration.index("helm upgrade")
    assert "never set `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`" in migration and "`computePercent: 100`" in migration


def test_compute_percent_100_keeps_the_forks_uncapped_compute(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, THREE_20GB.replace("replicas: 3", "replicas: 2\n        computePercent: 100"))
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 0, out
    assert "2 clients, each: memory limit 20 GB (20480 MiB), compute 100% (from computePercent)" in out


def test_every_error_in_the_files_settings_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, """\
version: v2
flags:
  migStrategy: bogus
  mpsRoot: relative
  plugin:
    deviceIDStrategy: serial
    cdiAnnotationPrefix: "my prefix/"
imex:
  channelIDs: [3]
sharing:
  mps:
    resources:
      - name: gpu
        replicas: 2
""")
    code, out = run(capsys, path, "--simulate", str(DEFAULT_NODE))
    assert code == 1
    for where in ("$.flags.migStrategy: invalid value 'bogus'", "$.flags.plugin.deviceIDStrategy: invalid value",
                  "$.flags.plugin.cdiAnnotationPrefix: invalid CDI annotation prefix 'my prefix/'",
                  "$.version: unknown version", "$.imex.channelIDs: invalid IMEX channel IDs",
                  "$.flags.mpsRoot: the MPS root must be an absolute"):
        assert f"{path}: {where}" in out, where
    assert "requires --mps-root" not in out  # not a consequence of leaving the bad one out
    assert_verdict_last(out, path, "invalid: 6 errors")
    assert "no plan and no node checks: the settings are invalid" in out


def test_time_slicing_without_a_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, seed_sample())
    code, out = run(capsys, path)
    assert code == 0
    assert "nvidia.com/gpu-shared (sharing.timeSlicing.resources[0]): 4 replicas of each selected nvidia.com/gpu" in out


def test_a_bad_strict_config_variable_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRICT_CONFIG", "maybe")
    code, out = run(capsys, write(tmp_path, "version: v1\n"))
    assert code == 2 and "STRICT_CONFIG 'maybe': expected true or false" in out


def test_an_unknown_fallback_strategy_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALLBACK_STRATEGIES", "named,nearest")
    code, out = run(capsys, write(tmp_path, "version: v1\n"))
    assert code == 1 and "unknown fallback strategy 'nearest'" in out


def test_the_loader_hook_warnings_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = validate.load_config

    def lenient(data: bytes, source: str) -> tuple[object, list[str]]:
        config, warnings = real(data, source)
        return config, [*warnings, f"{source}: $.sharing.timeSlicing.resources[0].devices: ignored by upstream"]

    monkeypatch.setattr(validate, "load_config", lenient)
    path = write(tmp_path, "version: v1\n")
    code, out = run(capsys, path)
    assert code == 0 and f"{path}: $.sharing.timeSlicing.resources[0].devices: ignored by upstream" in out
    assert_verdict_last(out, path, "valid, with 1 warning")
    code, out = run(capsys, path, "--strict")
    assert code == 1


def test_validate_accepts_every_flag_of_run() -> None:
    from nvdp.cli import build_parser

    parser = build_parser()
    for option in OPTIONS:
        for flag in option.flags:
            args = parser.parse_args(["config", "validate", "c.yaml", flag, "x"])
            assert getattr(args, option.dest) == "x", flag
            run_args = parser.parse_args(["run", flag, "x"])
            assert getattr(run_args, option.dest) == "x", flag


def test_what_upstream_ignores_is_a_warning_and_strict_makes_it_an_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The pure core's warnings reach validate: `devices` without `rename` is served as upstream does (every GPU
    shared), listed with its key path; exit 0, or 1 with --strict."""
    path = write(tmp_path, """\
version: v1
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        replicas: 4
        devices: [0]
""")
    code, out = run(capsys, path)
    assert code == 0, out
    assert "$.sharing.timeSlicing.resources[0].devices" in out, out
    code, out = run(capsys, path, "--strict")
    assert code == 1, out
    assert "$.sharing.timeSlicing.resources[0].devices" in out, out
