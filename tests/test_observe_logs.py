"""nvdp.observe.logs: JSON lines parse one by one and carry the structured fields; text stays readable."""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Iterator

import pytest

from nvdp.observe.logs import _NvdpHandler, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    grpclib = logging.getLogger("grpclib")
    saved = (root.level, grpclib.level)
    yield
    for handler in [h for h in root.handlers if isinstance(h, _NvdpHandler)]:
        root.removeHandler(handler)
    root.setLevel(saved[0])
    grpclib.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_parse_with_fields_and_exceptions(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    log = logging.getLogger("nvdp.test")
    log.info("device %s unhealthy\nsecond line", "GPU-0",
             extra={"resource": "nvidia.com/gpu", "device": "GPU-0", "xid": 79, "config": "default"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", extra={"level": "clash"})
    log.debug("a path", extra={"path": __import__("pathlib").Path("/x")})
    entries = [json.loads(line) for line in lines(out)]  # one object per line, newlines escaped
    assert len(entries) == 3
    first = entries[0]
    assert first["level"] == "info" and first["logger"] == "nvdp.test"
    assert first["message"] == "device GPU-0 unhealthy\nsecond line"
    assert (first["resource"], first["device"], first["xid"], first["config"]) == ("nvidia.com/gpu", "GPU-0", 79,
                                                                                    "default")
    stamp = datetime.datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert stamp.tzinfo is not None and first["time"].endswith("Z")
    assert "RuntimeError: boom" in entries[1]["exception"]
    assert entries[1]["message"] == "failed" and entries[1]["level"] == "error" and entries[1]["extra_level"] == "clash"
    assert entries[2]["path"] == "/x"


def test_text_format_appends_fields(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    logging.getLogger("nvdp.test").warning("config rejected", extra={"config": "my config", "generation": 3})
    (line,) = lines(out)
    assert "WARNING nvdp.test: config rejected" in line
    assert line.endswith('config="my config" generation=3')


def test_level_setup_is_idempotent_and_quiets_grpclib(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    setup_logging("info", "json", stream=out)  # replaces its own handler: no duplicate lines
    logging.getLogger("nvdp.test").info("once")
    logging.getLogger("nvdp.test").debug("hidden")
    logging.getLogger("grpclib.server").info("stream cancelled")
    assert [json.loads(line)["message"] for line in lines(out)] == ["once"]
    assert logging.getLogger("grpclib").level == logging.WARNING


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml")
