"""Issue 14 item 3: every numeric flag and environment variable is checked for finiteness and range at start."""

from __future__ import annotations

import pytest

from nvdp.cli import main
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.settings import OPTIONS, resolve

NUMERIC = [o for o in OPTIONS if o.kind in ("seconds", "bytes")]
BAD = ["inf", "-inf", "nan", "1e400", "Infinity", "NaN", "1e400Gi", "nanMi", "infm", "-1"]


def test_there_are_numeric_options_to_check() -> None:
    assert {o.dest for o in NUMERIC} >= {"health_quiet_period", "mps_shm_size"}


@pytest.mark.parametrize("option", NUMERIC, ids=lambda o: o.dest)
@pytest.mark.parametrize("text", BAD)
def test_non_finite_or_out_of_range_env_refused_naming_it(option, text) -> None:
    for env in option.envs:
        with pytest.raises(ConfigError) as caught:
            resolve({}, {env: text})
        message = str(caught.value)
        assert message.startswith(f"{env}: invalid value {text!r}")


@pytest.mark.parametrize("option", [o for o in NUMERIC if o.flags], ids=lambda o: o.dest)
@pytest.mark.parametrize("text", BAD)
def test_non_finite_or_out_of_range_flag_refused_naming_it(option, text) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve({option.dest: text}, {})
    assert str(caught.value).startswith(f"{option.flags[0]}: invalid value {text!r}")


@pytest.mark.parametrize("text", ["169h", "1e9", "700000"])
def test_quiet_period_above_a_week_refused(text) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        resolve({}, {"HEALTH_QUIET_PERIOD": text})


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("300", 300.0), ("5m", 300.0), ("168h", 604800.0)])
def test_sane_quiet_periods_still_accepted(text, seconds) -> None:
    assert resolve({}, {"HEALTH_QUIET_PERIOD": text}).health_quiet_period == seconds


def test_sane_shm_size_still_accepted() -> None:
    assert resolve({}, {"MPS_SHM_SIZE": "8Gi"}).mps_shm_size == 8 << 30


def test_shm_size_above_a_pebibyte_refused() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        resolve({}, {"MPS_SHM_SIZE": "2048Ti"})


def test_the_command_line_refuses_inf_before_starting(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HEALTH_QUIET_PERIOD", "inf")
    assert main(["run", "--kubelet-socket", "", "--metrics-address", ""]) == 1
    err = capsys.readouterr().err
    assert "HEALTH_QUIET_PERIOD: invalid value 'inf': expected a finite number" in err
