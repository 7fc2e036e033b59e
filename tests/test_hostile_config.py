"""Issue 14 items 7 and 9: whatever sits at a config path (a FIFO, 59 MiB, a link to /etc/shadow) neither wedges
the daemon nor gets its bytes into errors, logs or Events."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nvdp import cli
from nvdp.cli import load_config_within
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import MAX_CONFIG_BYTES, config_warnings, load_config_file, parse_config
from nvdp.node_config.sources import parse_config_off_loop, read_config_dir, watch_config_dir
from nvdp.testing.kubelet_emulator import KubeletEmulator

SHADOW = b"root:$6$Zq8sLt0v$SECRETHASHSECRETHASH/abc.def:19700:0:99999:7:::\nbin:*:19700:0:99999:7:::\n"
GOOD = b"version: v1\nflags:\n  migStrategy: none\n"
#: 59 MiB of YAML, as the issue's test: a list that PyYAML would parse for minutes.
BIG_LINE = b"- aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n"


def _big_file(path: Path, size: int = 59 << 20) -> Path:
    with path.open("wb") as out:
        out.write(b"version: v1\nx:\n")
        block = BIG_LINE * (1 << 15)
        for _ in range(size // len(block)):
            out.write(block)
    return path


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "config.yaml"
    os.mkfifo(path)
    yield path


# -- the static file -----------------------------------------------------------------------------------------------


def _in_thread(fn, *args, limit_s: float = 10.0):  # type: ignore[no-untyped-def]
    """Run fn in a daemon thread: a call that blocks forever (the old code on a FIFO) fails instead of hanging."""
    outcome: list[object] = []

    def work() -> None:
        try:
            outcome.append(fn(*args))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(limit_s)
    assert outcome, f"{fn.__name__} still blocked after {limit_s} s"
    return outcome[0]


def test_a_fifo_as_the_config_file_is_refused_not_waited_on(fifo: Path) -> None:
    result = _in_thread(load_config_file, fifo)
    assert isinstance(result, ConfigError) and "not a regular file" in str(result)


def test_a_59_mib_config_file_is_refused_unread(tmp_path: Path) -> None:
    big = _big_file(tmp_path / "big.yaml")
    result = _in_thread(load_config_file, big)
    assert isinstance(result, ConfigError)
    assert re.search(r"config too large: \d+ bytes, at most 1048576", str(result))


def test_config_text_above_a_mib_is_refused_before_parsing() -> None:
    with pytest.raises(ConfigError, match="config too large"):
        parse_config(b"version: v1\nx:\n" + BIG_LINE * (MAX_CONFIG_BYTES // len(BIG_LINE) + 1), "configmap key")


def test_loading_has_a_time_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that overruns (simulated: a parse that waits on an event) is abandoned with a ConfigError."""
    release = threading.Event()
    monkeypatch.setattr("nvdp.cli.load_config_file", lambda path: release.wait(30))
    try:
        with pytest.raises(ConfigError, match=r"took longer than 0\.2 s"):
            load_config_within(tmp_path / "config.yaml", 0.2)
        # While it is still stuck, a second load (another SIGHUP) starts no second thread.
        with pytest.raises(ConfigError, match="an earlier load of the config file has not finished"):
            load_config_within(tmp_path / "config.yaml", 0.2)
    finally:
        release.set()
        assert cli._LOAD_IDLE.wait(5)  # the abandoned load ends: later loads in this process are not refused


def test_the_command_line_refuses_a_fifo_at_start(fifo: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "nvdp", "--config-file", str(fifo), "--kubelet-socket", "",
                           "--metrics-address", ""], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "not a regular file" in done.stderr


# -- content of files that are not configs -------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    SHADOW,
    b"root:x:0:0:SECRETHASH:/root:/bin/bash\n",
    b"SECRETHASH: [\n",
    b"key: *SECRETHASH\n",
    b"key: !SECRETHASH x\n",
    b"a:\n  - b\n SECRETHASH\n",
    b"SECRETHASH\tx: y\n",
])
def test_errors_do_not_quote_files_that_are_not_configs(text: bytes) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "/etc/nvdp/config.yaml")
    message = str(caught.value)
    assert "SECRETHASH" not in message and "$6$" not in message, message
    assert message.startswith("/etc/nvdp/config.yaml")


def test_a_misspelt_key_is_still_named() -> None:
    # Ignored as upstream ignores it, but named in a warning (issue 15).
    (warning,) = config_warnings(parse_config(b"flags:\n  renameByDefault: true\n", "config"))
    assert warning.path == "$.flags.renameByDefault" and "unknown key `renameByDefault`" in warning.message


# -- the config directory ------------------------------------------------------------------------------------------


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A ConfigMap-shaped directory: ..data -> a timestamped directory, each key a link into ..data."""
    directory = tmp_path / "configs"
    stamped = directory / "..2026_12_06_15_00_00.000000001"
    stamped.mkdir(parents=True)
    (stamped / "a100").write_bytes(GOOD)
    (directory / "..data").symlink_to(stamped.name)
    (directory / "a100").symlink_to("..data/a100")
    (directory / "plain").write_bytes(GOOD)
    return directory


def test_links_out_of_the_directory_are_not_read(config_dir: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(SHADOW)
    (config_dir / "shadow").symlink_to(secret)
    (config_dir / "relative").symlink_to("../shadow")
    configs = read_config_dir(config_dir)
    # Positive witness: the ConfigMap-style links inside the directory and the plain file are read.
    assert configs == {"a100": GOOD, "plain": GOOD}
    text = caplog.text
    assert "shadow skipped: it links outside the config directory" in text
    assert "SECRETHASH" not in text


def test_fifos_and_oversized_files_in_the_directory_are_skipped(config_dir: Path) -> None:
    os.mkfifo(config_dir / "fifo")
    _big_file(config_dir / "big", 2 * MAX_CONFIG_BYTES)
    configs = _in_thread(read_config_dir, config_dir)
    assert configs == {"a100": GOOD, "plain": GOOD}


async def test_parsing_off_the_loop_is_bounded_and_cancellable(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr("nvdp.node_config.sources.parse_config", lambda text, source: release.wait(30))
    try:
        with trio.fail_after(5):
            with pytest.raises(ConfigError, match=r"parsing took longer than 0\.1 s"):
                await parse_config_off_loop(b"x", "cm", 0.1)
            # Cancelled while parsing (shutdown): returns at once, the thread is abandoned.
            with trio.move_on_after(0.1) as scope:
                await parse_config_off_loop(b"x", "cm", 30)
            assert scope.cancelled_caught
    finally:
        release.set()


async def test_a_hung_directory_read_never_blocks_shutdown(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while the read hangs (shutdown): the watch ends at once."""
    release = threading.Event()
    reading = threading.Event()

    def hung(directory: Path) -> dict[str, bytes]:
        reading.set()
        release.wait(30)
        return {}

    monkeypatch.setattr("nvdp.node_config.sources.read_config_dir", hung)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async def consume() -> None:
                    async with watch_config_dir(config_dir) as states:
                        async for _ in states:
                            pass

                nursery.start_soon(consume)
                await trio.to_thread.run_sync(reading.wait)
                nursery.cancel_scope.cancel()  # shutdown while the read hangs
    finally:
        release.set()


async def test_a_stuck_read_is_not_retried_in_a_new_thread(config_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A hung filesystem costs one abandoned thread, not one per retry."""
    from nvdp.node_config import sources

    release = threading.Event()
    started = []

    def hung(directory: Path) -> dict[str, bytes]:
        started.append(directory)
        release.wait(30)
        return {}

    monkeypatch.setattr(sources, "read_config_dir", hung)
    monkeypatch.setattr(sources, "READ_TIMEOUT_S", 0.05)
    reader = sources._DirReader(config_dir)
    try:
        with trio.fail_after(5):
            assert await reader.read() is None  # timed out, abandoned
            for _ in range(5):
                assert await reader.read() is None  # still stuck: no new thread
        assert len(started) == 1
        assert "an earlier read is still stuck" in caplog.text
    finally:
        release.set()


# -- the daemon: SIGHUP with a FIFO or 59 MiB in place of the config, then SIGTERM ------------------------------


@pytest.mark.slow
def test_sighup_with_a_fifo_or_a_huge_config_keeps_serving_and_sigterm_exits_0(
    two_gpu_node: Path, kubelet: KubeletEmulator, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(GOOD)
    env = {**os.environ, "METRICS_ADDRESS": "127.0.0.1:0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "nvdp", "--simulate", str(two_gpu_node), "--kubelet-socket", str(kubelet.socket),
         "--config-file", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    seen = threading.Condition()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with seen:
                lines.append(line)
                seen.notify_all()

    def wait_line(pattern: str, after: int = 0) -> re.Match[str]:
        with seen:
            found = seen.wait_for(lambda: _search(pattern, lines[after:]), 20)
            assert found is not None, f"no line matching {pattern!r}:\n{''.join(lines)}"
            return found

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        port = int(wait_line(r"serving /metrics.* on 127\.0\.0\.1:(\d+)").group(1))
        wait_line(r"ready: every resource is registered")
        for bad, expect in ((lambda: os.mkfifo(config), "not a regular file"),
                            (lambda: _big_file(config), "config too large")):
            mark = len(lines)
            config.unlink()
            bad()
            process.send_signal(signal.SIGHUP)
            wait_line(re.escape(expect), mark)
            assert _healthz(port) == 200  # still answering: not wedged
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        reader.join(5)
        if process.stdout is not None:
            process.stdout.close()


def _search(pattern: str, lines: list[str]) -> re.Match[str] | None:
    for line in lines:
        if match := re.search(pattern, line):
            return match
    return None


def _healthz(port: int) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    finally:
        connection.close()
