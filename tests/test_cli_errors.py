"""The CLI never shows a traceback: every subcommand, given bad arguments or a bad file, says in one line what is
wrong (and, where the message alone does not, what to do) and exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvdp.cli import explain, main

BAD_YAML = "foo: [\n"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "ok.yaml").write_text("version: v1\n")
    (tmp_path / "configs").mkdir()
    return {"bad": str(tmp_path / "bad.yaml"), "ok": str(tmp_path / "ok.yaml"), "missing": str(tmp_path / "nope.yaml"),
            "configs": str(tmp_path / "configs"), "tmp": str(tmp_path)}


# (argv with {placeholders}, a fragment the one line must hold). In-process: each fails before a daemon starts.
IN_PROCESS = [
    (["config", "validate", "{ok}", "--simulate", "{missing}"], "cannot read"),
    (["config", "validate", "{ok}", "--simulate", "{bad}"], "not valid YAML"),
    (["demo", "--simulate", "{missing}"], "docs/simulation.md"),
    (["demo", "--simulate", "{bad}"], "not valid YAML"),
    (["demo", "--config-file", "{missing}"], "cannot read config file"),
    (["demo", "--mig-strategy", "bogus"], "accepted values are none, single, mixed"),
    (["status", "--address", "nonsense"], "invalid address"),
    (["status", "--address", "127.0.0.1:1"], "cannot reach nvdp"),
    (["run", "--config-file", "{bad}"], "invalid configuration"),
    (["run", "--mps-probe-failures", "0"], "--mps-probe-failures"),
    (["run", "--fallback-strategies", "named,bogus"], "bogus"),
    (["mps-host", "--mps-root", "relative"], "needs an absolute MPS root"),
    (["mps-host", "--mps-root", "{tmp}/mps", "--simulate", "{missing}"], "cannot read"),
]


@pytest.mark.parametrize(("argv", "fragment"), IN_PROCESS, ids=[" ".join(a) for a, _ in IN_PROCESS])
def test_bad_arguments_say_what_is_wrong_in_one_line(
        argv: list[str], fragment: str, files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main([a.format(**files) for a in argv])
    captured = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.strip()
    assert fragment in captured.err


# (`config validate` with no FILE is not a usage error: it validates the deployed CONFIG_FILE/CONFIG_FILE_SRCDIR, or
# says in one line that there is nothing to validate: tests/test_validate.py.)
@pytest.mark.parametrize("argv", [["run", "--bogus"], ["demo", "--config-dir", "/tmp"], ["status", "extra"],
                                  ["mps-host", "--nope"], ["config"]])
def test_argparse_errors_are_usage_lines(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


def test_run_with_a_config_dir_and_no_usable_config_is_one_line(files: dict[str, str]) -> None:
    """Today's 73-line traceback, as a process (the daemon starts, then finds nothing to serve)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "KUBECONFIG", "CONFIG_FILE")}
    result = subprocess.run(
        [sys.executable, "-m", "nvdp", "run", "--config-dir", files["configs"], "--metrics-address", "",
         "--kubelet-socket", f"{files['tmp']}/kubelet.sock", "--simulate", "/nonexistent-node.yaml"],
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("nvdp run: no config to serve") and "docs/node-config.md" in last


def test_an_unexpected_error_is_one_line_calling_itself_a_bug() -> None:
    group = BaseExceptionGroup("nursery", [RuntimeError("boom"), KeyError("x")])
    line = explain(group)
    assert line.startswith("unexpected error: RuntimeError: boom (a bug in nvdp") and "NVDP_TRACEBACK" in line


def test_the_user_error_in_a_group_wins_over_the_noise_around_it() -> None:
    class StartupError(Exception):
        pass

    group = BaseExceptionGroup("nursery", [EOFError(), ExceptionGroup("inner", [StartupError("no config to serve")])])
    assert explain(group) == "no config to serve; see docs/node-config.md"
