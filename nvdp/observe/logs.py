"""Logging set-up: human-readable lines by default, or one JSON object per line (`--log-format json`).

Structured fields travel as `extra=` on the logging call, e.g.
``log.warning("device unhealthy", extra={"resource": "nvidia.com/gpu", "device": uuid, "xid": 79})``. The text
format appends them as `key=value`, the JSON format as top-level keys, so the same call serves both.

Repeated records are rate-limited (`RateLimitFilter`, on the handler `setup_logging` installs): per (logger, level,
message template), the first `LOG_BURST` (+1 that says so) records of each `LOG_WINDOW_S` window pass, the rest are
counted, and the first record of the next window carries "(suppressed K similar messages ...)" and a `suppressed`
field. A client that makes nvdp log an error per request (issue 14: 15 000 lines a second) costs at most that many
lines.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TextIO

FORMATS = ("text", "json")
#: Records of one (logger, level, template) let through per window; the rest are counted and summarised.
LOG_BURST = 20
LOG_WINDOW_S = 10.0
#: Distinct templates tracked at once (the oldest window is forgotten first); templates are code, so few.
LOG_KEYS_MAX = 1024
LEVELS = ("debug", "info", "warning", "error")

#: Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
#: Keys of the JSON object that `extra=` must not overwrite.
_RESERVED = frozenset({"time", "level", "logger", "message", "exception", "stack"})


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _rfc3339(created: float) -> str:
    stamp = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (RFC 3339, UTC), level, logger, message, extra fields,
    and `exception` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry[f"extra_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a Path or an enum in `extra=` must never make a log call fail.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...`, for people reading a terminal or `kubectl logs`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = extra_fields(record)
        if not fields:
            return text
        first, newline, rest = text.partition("\n")  # keep fields on the message line, before any traceback
        suffix = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return f"{first} {suffix}{newline}{rest}"


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in '"=' for c in text)) else text


class RateLimitFilter(logging.Filter):
    """Lets the first `burst` records of each (logger, level, message template) through per `window_s` (the last of
    them saying that more will be suppressed), drops the rest, and adds to the first record of the next window how
    many were dropped. `clock` is injectable for tests.

    The key is the template (`record.msg`), not the formatted text, so "device %s unhealthy" for 8 GPUs is one key:
    `burst` is sized for a whole node's worth of one message at once."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = LOG_KEYS_MAX) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock, self.max_keys = burst, window_s, clock, max_keys
        #: key -> [window start, records seen in it, records suppressed in it]
        self._windows: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # Records come from the trio thread, the asyncio thread (grpclib) and worker threads: one at a time here.
        with self._lock:
            return self._filter(record)

    def _filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            suppressed = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
            if suppressed:
                since = now - window[0] if window is not None else self.window_s
                record.msg = (f"{record.getMessage()} (suppressed {suppressed} similar messages in the last "
                              f"{since:.0f} s)")
                record.args = None
                record.suppressed = suppressed
            return True
        window[1] += 1
        if window[1] <= self.burst:
            return True
        if window[1] == self.burst + 1:
            # The last one through says what happens to the rest.
            record.msg = (f"{record.getMessage()} (repeated {self.burst + 1} times: similar messages suppressed "
                          f"for {self.window_s - (now - window[0]):.0f} s)")
            record.args = None
            return True
        window[2] += 1
        return False


class _NvdpHandler(logging.StreamHandler):
    """Marks the handler we installed, so that calling setup_logging() again replaces it and nothing else."""


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger. Safe to call more than once; handlers installed by others are left alone."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: accepted values are {', '.join(FORMATS)}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _NvdpHandler)]:
        root.removeHandler(handler)
    handler = _NvdpHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RateLimitFilter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # grpclib logs every stream the kubelet cancels at INFO; that is normal traffic, not news.
    logging.getLogger("grpclib").setLevel(max(logging.WARNING, root.level))
