"""The MPS probe: a daemon's replicas turn Unhealthy only after `probe_failures` failed probes in a row, and the
deadline and count come from `--mps-probe-timeout` / `--mps-probe-failures` (env MPS_PROBE_TIMEOUT /
MPS_PROBE_FAILURES)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nvdp.controller import probe_timings
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.settings import resolve
from nvdp.core.plan.model import MpsDaemonSpec
from nvdp.mps.control_daemon import DEFAULT_TIMINGS, DaemonState, DaemonTimings, _Daemon
from nvdp.mps.launcher import LocalLauncher

UUID = "GPU-00000000-aaaa-bbbb-cccc-000000000000"


class _Done(Exception):
    pass


def scripted_daemon(tmp_path: Path, answers: list[bool], failures: int) -> tuple[_Daemon, list[bool]]:
    """A daemon whose probes answer as `answers` says (True: an answer, False: a failure), then stop the loop."""
    spec = MpsDaemonSpec(gpu_uuid=UUID, gpu_index=0, pipe_dir=str(tmp_path / "pipe"), log_dir=str(tmp_path / "log"),
                         pinned_mem_limit_mib=1024, active_thread_percentage=50)
    (tmp_path / "pipe").mkdir()
    health: list[bool] = []
    timings = DaemonTimings(probe_interval_s=0.0, probe_failures=failures)
    daemon = _Daemon(spec, Path("/nonexistent"), LocalLauncher(Path("/nonexistent"), ""), None,
                     lambda uuid, healthy: health.append(healthy), timings, "", DaemonState(healthy=True))
    script: Iterator[bool] = iter(answers)

    async def command(text: str) -> tuple[bool, str]:
        try:
            ok = next(script)
        except StopIteration:
            raise _Done from None
        return (True, "50.0") if ok else (False, "no answer within 3.0 s")

    daemon.command = command  # type: ignore[method-assign]
    return daemon, health


@pytest.mark.parametrize(("answers", "expected"), [
    # Two misses in a row, then an answer, twice over: never Unhealthy.
    ([True, False, False, True, False, False, True], []),
    # Three in a row: Unhealthy at the third, Healthy at the next answer.
    ([True, False, False, False, False, True], [False, True]),
])
async def test_only_consecutive_failures_make_a_daemon_unhealthy(
        tmp_path: Path, answers: list[bool], expected: list[bool]) -> None:
    daemon, health = scripted_daemon(tmp_path, answers, failures=3)
    with pytest.raises(_Done):
        await daemon._probe_until_unreachable()
    assert health == expected


async def test_one_failure_is_enough_when_so_configured(tmp_path: Path) -> None:
    daemon, health = scripted_daemon(tmp_path, [True, False, True], failures=1)
    with pytest.raises(_Done):
        await daemon._probe_until_unreachable()
    assert health == [False, True]


async def test_a_lost_pipe_directory_ends_the_life_at_the_first_failure(tmp_path: Path) -> None:
    daemon, health = scripted_daemon(tmp_path, [False, False, False], failures=3)
    (tmp_path / "pipe").rmdir()
    with trio.fail_after(10):
        reason = await daemon._probe_until_unreachable()
    assert "lost its pipe directory" in reason and health == [False]


def test_probe_settings_from_flags_and_env() -> None:
    settings = resolve({"mps_probe_timeout": "5s", "mps_probe_failures": None}, {"MPS_PROBE_FAILURES": "4"})
    assert (settings.mps_probe_timeout, settings.mps_probe_failures) == (5.0, 4)
    assert probe_timings(settings) == {
        "timings": DaemonTimings(probe_timeout_s=5.0, probe_failures=4)}
    defaults = resolve({}, {})
    assert (defaults.mps_probe_timeout, defaults.mps_probe_failures) == (3.0, 3)
    assert probe_timings(defaults) == {}  # the daemons' own defaults apply
    assert (DEFAULT_TIMINGS.probe_timeout_s, DEFAULT_TIMINGS.probe_failures) == (3.0, 3)


@pytest.mark.parametrize(("env", "message"), [
    ({"MPS_PROBE_FAILURES": "0"}, "MPS_PROBE_FAILURES: invalid value '0': out of range, expected 1 to 100"),
    ({"MPS_PROBE_FAILURES": "three"}, "MPS_PROBE_FAILURES: invalid value 'three': expected a whole number"),
    ({"MPS_PROBE_TIMEOUT": "0"}, "MPS_PROBE_TIMEOUT: invalid value '0': out of range, expected 0.1 to 300 seconds"),
])
def test_bad_probe_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve({}, env)
    assert str(caught.value) == message
