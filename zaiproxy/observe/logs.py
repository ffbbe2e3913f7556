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
from collections.abc import Callable
from datetime import datetime, timezone
from time import time
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["LINE", "LevelFilteringObserver", "LineLogger", "buildObserver", "formatJSON", "formatText"]

#: The format of an event whose text is already made (hot-path events such
#: as the access log): C{log.info(LINE, line=text, **fields)}. Twisted's own
#: observers format it as usual; ours skip Twisted's formatter, which costs
#: about 20 us an event.
LINE = "{line}"

_SCALARS = (str, int, float, bool, type(None))

_NOT_FIELDS = frozenset(["format", "message", "system", "line"])

# Twisted logs every pooled upstream connection it opens and closes at info.
_CHATTY = ("twisted.web.client._HTTP11ClientFactory",)

#: Each level's rank, lowest first, as a number to compare.
_RANK = {level: rank for rank, level in enumerate(LogLevel.iterconstants())}

#: Namespaces whose level is remembered; more (a bug) start the memo again.
_MAX_NAMESPACES = 1024


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


class LineLogger(Logger):
    """
    A L{Logger} for the lines written on every request (the access log,
    token usage). Twisted's C{emit} checks the level against the list of
    all levels, sorted anew on every call, which cost a busy proxy more
    than writing the line; a level is checked here by one lookup.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level not in _RANK:
            # Twisted's own path reports the invalid level.
            super().emit(level, format, **kwargs)
            return
        kwargs.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time(),
        )
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(kwargs)


@implementer(ILogObserver)
class LevelFilteringObserver:
    """
    Our observer: events at the chosen level and above, and a level that
    can change while the proxy runs (C{LOG_LEVEL} on SIGHUP).

    Twisted's L{FilteringLogObserver} with a L{LogLevelFilterPredicate}
    does the same in four calls, a namespace split and a level comparison
    that sorts every level; this is one dictionary lookup per event. As
    there, an event without a level or a namespace is dropped.
    """

    def __init__(self, observer: ILogObserver, level: LogLevel) -> None:
        self._observer = observer
        self._minimum: dict[str, int] = {}
        self.setLevel(level)

    @property
    def level(self) -> LogLevel:
        return self._level

    def setLevel(self, level: LogLevel) -> None:
        self._level = level
        self._rank = _RANK[level]
        self._minimum = {}

    def _minimumFor(self, namespace: str) -> int:
        if len(self._minimum) >= _MAX_NAMESPACES:
            self._minimum = {}
        rank = self._rank
        for chatty in _CHATTY:
            if namespace == chatty or namespace.startswith(chatty + "."):
                rank = max(rank, _RANK[LogLevel.warn])
        self._minimum[namespace] = rank
        return rank

    def __call__(self, event: dict[str, Any]) -> None:
        rank = _RANK.get(event.get("log_level"))
        namespace = event.get("log_namespace")
        if rank is None or not namespace:
            return
        minimum = self._minimum.get(namespace)
        if minimum is None:
            minimum = self._minimumFor(namespace)
        if rank >= minimum:
            self._observer(event)


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
