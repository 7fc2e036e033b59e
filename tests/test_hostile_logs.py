"""Issue 14 item 12: repeated identical log records are rate-limited everywhere (a filter on nvdp's handler), with
a summary of what was suppressed. The clock is injected: no sleeping."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from nvdp.observe.logs import LOG_BURST, RateLimitFilter, _NvdpHandler, setup_logging


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, _NvdpHandler)]:
        root.removeHandler(handler)
    root.setLevel(saved)


def _installed(out: io.StringIO, fmt: str = "text") -> tuple[logging.Logger, FakeClock]:
    setup_logging("debug", fmt, stream=out)
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, _NvdpHandler))
    limiter = next(f for f in handler.filters if isinstance(f, RateLimitFilter))
    clock = FakeClock()
    limiter.clock = clock
    return logging.getLogger("nvdp.test.flood"), clock


def test_a_flood_of_one_error_is_cut_to_a_burst_then_summarised(restore_logging: None) -> None:
    """15 000 identical ERROR records (one client, one second, as the issue measured) -> LOG_BURST + 1 lines, then
    the first record of the next window says how many were suppressed."""
    out = io.StringIO()
    log, clock = _installed(out)
    for i in range(15_000):
        log.error("cannot render /metrics for client %d", i)
    lines = out.getvalue().splitlines()
    assert len(lines) == LOG_BURST + 1
    assert "similar messages suppressed" in lines[-1]
    clock.now += 10.0
    log.error("cannot render /metrics for client %d", 15_000)
    last = out.getvalue().splitlines()[-1]
    assert "cannot render /metrics for client 15000 (suppressed 14979 similar messages in the last 10 s)" in last
    assert "suppressed=14979" in last


def test_different_templates_levels_and_loggers_are_counted_apart(restore_logging: None) -> None:
    out = io.StringIO()
    log, _ = _installed(out)
    other = logging.getLogger("nvdp.test.other")
    for _ in range(100):
        log.warning("one template")
        log.error("one template")
        log.warning("another template")
        other.warning("one template")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 * (LOG_BURST + 1)
    # Positive witness that distinct messages still pass while the flood is suppressed.
    log.info("something new")
    assert "something new" in out.getvalue().splitlines()[-1]


def test_exceptions_with_tracebacks_are_limited_too(restore_logging: None) -> None:
    out = io.StringIO()
    log, _ = _installed(out, "json")
    for _ in range(1000):
        try:
            raise TypeError("'>=' not supported")
        except TypeError:
            log.exception("error answering an HTTP request")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == LOG_BURST + 1
    assert all("TypeError" in r["exception"] for r in records)


def test_tracked_templates_are_bounded() -> None:
    limiter = RateLimitFilter(burst=1, window_s=10, clock=FakeClock(), max_keys=8)
    for i in range(1000):
        limiter.filter(logging.LogRecord("x", logging.INFO, "", 0, f"template {i}", None, None))
    assert len(limiter._windows) == 8


def test_records_from_several_threads_are_counted_once_each() -> None:
    import threading

    clock = FakeClock()
    limiter = RateLimitFilter(burst=5, window_s=10, clock=clock, max_keys=4)
    passed: list[bool] = []

    def flood(worker: int) -> None:
        for i in range(2000):
            record = logging.LogRecord("x", logging.ERROR, "", 0, f"template {i % 8}", None, None)
            passed.append(limiter.filter(record))

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passed) == 8000 and sum(passed) <= 8 * 2000  # no exception from concurrent use; bounded keys
    assert len(limiter._windows) <= 4
