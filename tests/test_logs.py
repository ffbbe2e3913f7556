"""
Tests for L{zaiproxy.observe.logs}.
"""

from __future__ import annotations

import io
import json
from typing import Any, cast

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher

from zaiproxy.observe.logs import LINE, LineLogger, buildObserver


def emit(
    fmt: str, level: LogLevel = LogLevel.info, namespace: str = "zaiproxy.test", **kw: object
) -> dict[str, Any]:
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


def test_levelFilterNamespaces() -> None:
    """
    An event without a level or namespace is dropped, as Twisted's filter
    drops it; a namespace under a chatty one is held to warnings too; a
    new level applies to namespaces already seen.
    """
    out = io.StringIO()
    observer = buildObserver(out, "text", LogLevel.info)
    observer({"log_format": "no namespace", "log_level": LogLevel.error, "log_time": 0.0})
    observer({"log_format": "no level", "log_namespace": "zaiproxy.test", "log_time": 0.0})
    observer(emit("chatty", namespace="twisted.web.client._HTTP11ClientFactory.sub"))
    observer(emit("chatty warning", LogLevel.warn, namespace="twisted.web.client._HTTP11ClientFactory"))
    observer(emit("seen", LogLevel.debug))
    observer.setLevel(LogLevel.debug)
    assert observer.level is LogLevel.debug
    observer(emit("now shown", LogLevel.debug))
    assert out.getvalue().splitlines() == [
        "2025-11-23T05:40:00.250Z [twisted.web.client._HTTP11ClientFactory#warn] chatty warning",
        "2025-11-23T05:40:00.250Z [zaiproxy.test#debug] now shown",
    ]


def test_lineLogger() -> None:
    """
    L{LineLogger} emits the event Twisted's L{Logger} would, and an invalid
    level still goes Twisted's way (reported, not emitted).
    """
    events: list[dict[str, Any]] = []
    # Any callable taking an event is an observer; the annotation wants the interface.
    observer = cast(ILogObserver, events.append)
    fast = LineLogger(namespace="zaiproxy.test", observer=observer)
    plain = Logger(namespace="zaiproxy.test", observer=observer)
    fast.info(LINE, line="a line", status=200)
    plain.info(LINE, line="a line", status=200)
    mine, theirs = events
    assert 0 <= theirs["log_time"] - mine["log_time"] < 5
    for event in events:
        del event["log_time"], event["log_logger"]
    assert mine == theirs
    assert mine["log_level"] is LogLevel.info and mine["log_namespace"] == "zaiproxy.test"
    del events[:]
    fast.emit("loud", "x")  # type: ignore[arg-type]
    assert len(events) == 1 and events[0]["log_level"] is LogLevel.critical
    assert "invalid log level" in events[0]["log_format"]
