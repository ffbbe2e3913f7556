# -*- test-case-name: tests.test_logs -*-
"""
Log output: Twisted's structured events as text lines or JSON lines, at
the level the operator chose.

twistd's own JSON observer writes every internal field (level objects as
C{{"name": "info", "__class_uuid__": ...}}); operators want one flat object
per line that journald and log shippers can read.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.failure import Failure

__all__ = ["buildObserver", "LevelFilteringObserver", "formatJSON", "formatText", "LINE"]

#: The format of an event whose text is already made (hot-path events such
#: as the access log): C{log.info(LINE, line=text, **fields)}. Twisted's own
#: observers format it as usual; ours skip Twisted's formatter, which costs
#: about 20 us an event.
LINE = "{line}"

_SCALARS = (str, int, float, bool, type(None))

_NOT_FIELDS = frozenset(["format", "message", "system", "line"])

# Twisted logs every pooled upstream connection it opens and closes at info.
_CHATTY = ("twisted.web.client._HTTP11ClientFactory",)


_lastSecond: list[Any] = [None, ""]


def _timestamp(event: dict[str, Any]) -> str:
    when = event.get("log_time", 0.0)
    second = int(when)
    if _lastSecond[0] != second:
        _lastSecond[0] = second
        _lastSecond[1] = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_lastSecond[1]}.{int((when - second) * 1000):03d}Z"


def _message(event: dict[str, Any]) -> str:
    if event.get("log_format") is LINE or event.get("log_format") == LINE:
        line = event.get("line")
        if isinstance(line, str):
            return line
    return formatEvent(event)


def _failureText(event: dict[str, Any]) -> str | None:
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        return failure.getTraceback()
    return None


def formatText(event: dict[str, Any]) -> str:
    """
    C{2026-11-23T05:40:00.123Z [zaiproxy.access#info] message}, plus the
    traceback of a logged failure.
    """
    level = event.get("log_level", LogLevel.info)
    namespace = event.get("log_namespace", "-")
    text = _message(event).replace("\n", "\n\t")
    line = f"{_timestamp(event)} [{namespace}#{level.name}] {text}\n"
    traceback = _failureText(event)
    if traceback:
        line += "\t" + traceback.rstrip("\n").replace("\n", "\n\t") + "\n"
    return line


def formatJSON(event: dict[str, Any]) -> str:
    """
    One JSON object per line: time, level, namespace, the formatted message,
    and every scalar field of the event.
    """
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": _timestamp(event),
        "level": level.name,
        "namespace": event.get("log_namespace", "-"),
        "message": _message(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in _NOT_FIELDS:
            continue
        if isinstance(value, _SCALARS):
            record[key] = value
    traceback = _failureText(event)
    if traceback:
        record["traceback"] = traceback
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


class _FlushPerTurn:
    """
    A stream written once per reactor turn, not once per line: at 32
    concurrent requests a turn may log dozens of lines, and each write to
    an unbuffered stdout (PYTHONUNBUFFERED, as under systemd) is a system
    call. While the reactor is not running (start-up, shutdown) every line
    is written at once, so none is lost.
    """

    def __init__(self, stream: IO[str], reactor: Any) -> None:
        self._stream = stream
        self._reactor = reactor
        self._lines: list[str] = []

    def write(self, text: str) -> None:
        self._lines.append(text)

    def flush(self) -> None:
        if not self._reactor.running:
            self._flush()
        elif len(self._lines) == 1:
            self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._lines:
            text = "".join(self._lines)
            self._lines = []
            self._stream.write(text)
            self._stream.flush()


class LevelFilteringObserver(FilteringLogObserver):
    """
    Our observer: events at the chosen level and above, and a level that
    can change while the proxy runs (C{LOG_LEVEL} on SIGHUP).
    """

    def __init__(self, observer: ILogObserver, level: LogLevel) -> None:
        self._predicate = LogLevelFilterPredicate()
        super().__init__(observer, [self._predicate])
        self.setLevel(level)

    @property
    def level(self) -> LogLevel:
        return self._predicate.defaultLogLevel

    def setLevel(self, level: LogLevel) -> None:
        predicate = self._predicate
        # The default level is copied into the table at construction;
        # both must change.
        predicate.defaultLogLevel = level
        predicate.setLogLevelForNamespace("", level)
        for namespace in _CHATTY:
            predicate.setLogLevelForNamespace(namespace, max(level, LogLevel.warn))


def buildObserver(
    stream: IO[str], logFormat: str, level: LogLevel, reactor: Any = None
) -> LevelFilteringObserver:
    """
    An observer writing C{logFormat} ("text" or "json") lines of events at
    C{level} and above to C{stream}; given a reactor, flushed once per turn.
    """
    formatter: Callable[[dict[str, Any]], str] = formatJSON if logFormat == "json" else formatText
    if reactor is not None:
        stream = _FlushPerTurn(stream, reactor)  # type: ignore[assignment]
    return LevelFilteringObserver(FileLogObserver(stream, formatter), level)
