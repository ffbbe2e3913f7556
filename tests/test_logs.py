"""
Tests for L{zaiproxy.logs}.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher

from zaiproxy.logs import buildObserver


def emit(fmt: str, level: LogLevel = LogLevel.info, namespace: str = "zaiproxy.test", **kw: object) -> dict:
    return {
        "log_format": fmt,
        "log_level": level,
        "log_namespace": namespace,
        "log_time": 1763876400.25,
        **kw,
    }


def test_text() -> None:
    """
    Text lines carry time, namespace, level and the formatted message.
    """
    out = io.StringIO()
    observer = buildObserver(out, "text", LogLevel.info)
    observer(emit("POST {route} {status}", route="/v1/messages", status=200))
    assert out.getvalue() == "2025-11-23T05:40:00.250Z [zaiproxy.test#info] POST /v1/messages 200\n"


def test_json() -> None:
    """
    JSON lines are one flat object: message plus scalar fields.
    """
    out = io.StringIO()
    observer = buildObserver(out, "json", LogLevel.info)
    observer(emit("POST {route}", route="/v1/messages", status=200, obj=object(), note=None))
    record = json.loads(out.getvalue())
    assert record == {
        "time": "2025-11-23T05:40:00.250Z",
        "level": "info",
        "namespace": "zaiproxy.test",
        "message": "POST /v1/messages",
        "route": "/v1/messages",
        "status": 200,
        "note": None,
    }
    assert out.getvalue().count("\n") == 1


def test_levelFilter() -> None:
    """
    Events below the level are dropped; Twisted's per-connection chatter is
    kept down to warnings.
    """
    out = io.StringIO()
    observer = buildObserver(out, "text", LogLevel.warn)
    observer(emit("hidden", LogLevel.info))
    observer(emit("shown", LogLevel.error))
    assert "hidden" not in out.getvalue() and "shown" in out.getvalue()

    out = io.StringIO()
    observer = buildObserver(out, "text", LogLevel.debug)
    observer(emit("Starting factory", namespace="twisted.web.client._HTTP11ClientFactory"))
    assert out.getvalue() == ""


def test_failureTraceback() -> None:
    """
    A logged failure's traceback is included (JSON: one escaped field).
    """
    out = io.StringIO()
    publisher = LogPublisher(buildObserver(out, "json", LogLevel.info))
    log = Logger(namespace="zaiproxy.test", observer=publisher)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("boom {x}", x=1)
    record = json.loads(out.getvalue())
    assert record["message"] == "boom 1"
    assert record["level"] == "critical"
    assert "ZeroDivisionError" in record["traceback"]


class _Stream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_flushOncePerTurn() -> None:
    """
    Given a running reactor, lines are flushed once per reactor turn, not
    once per line; with the reactor stopped, at once.
    """
    from twisted.internet.task import Clock

    clock = Clock()
    clock.running = True  # type: ignore[attr-defined]
    stream = _Stream()
    observer = buildObserver(stream, "text", LogLevel.info, clock)
    for n in range(5):
        observer(emit("line {n}", n=n))
    assert stream.getvalue() == ""
    assert stream.flushes == 0
    clock.advance(0)
    assert stream.getvalue().count("\n") == 5
    assert stream.flushes == 1
    clock.running = False  # type: ignore[attr-defined]
    observer(emit("at shutdown"))
    assert stream.flushes == 2
    assert clock.getDelayedCalls() == []
