"""Logging set-up: human-readable lines by default, or one JSON object per line (`--log-format json`).

Structured fields travel as `extra=` on the logging call, e.g.
``log.warning("device unhealthy", extra={"resource": "nvidia.com/gpu", "device": uuid, "xid": 79})``. The text
format appends them as `key=value`, the JSON format as top-level keys, so the same call serves both.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

FORMATS = ("text", "json")
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
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # grpclib logs every stream the kubelet cancels at INFO; that is normal traffic, not news.
    logging.getLogger("grpclib").setLevel(max(logging.WARNING, root.level))
