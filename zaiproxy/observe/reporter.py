# -*- test-case-name: tests.test_reporter -*-
"""
The one door out: every finished request's L{Record} goes through
L{Reporter.finished}, which fans it out to metrics, the access log, the
usage log line and any other sink (the ledger).

Nothing on the data path touches metrics or writes these log lines
itself: the relay fills an L{Exchange} in and hands over the frozen
record, so how a metric is named or a line is shaped lives here alone.
The limiter's own events (adjustments, admissions, refusals) come through
here too, as the limiter's observer.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from zaiproxy.observe.logs import LINE, LineLogger
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.record import Billed, Record

__all__ = ["Reporter"]

# Module level: as a class attribute a Logger would rename itself after the class.
_accessLog = LineLogger(namespace="zaiproxy.access")
_usageLog = LineLogger(namespace="zaiproxy.tokens")


class Reporter:
    """
    Turns finished requests into metrics, log lines and ledger rows.
    """

    log = Logger()

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._sinks: list[Callable[[Record], object]] = []
        self._adjustmentWatchers: list[Callable[[str], object]] = []

    def addSink(self, sink: Callable[[Record], object]) -> None:
        """
        Hand every record to C{sink} too, after metrics and the log lines.
        A sink must not raise; if it does, the error is logged.
        """
        self._sinks.append(sink)

    def finished(self, record: Record) -> None:
        """
        One request ended: count it, log it, hand it on.
        """
        metrics = self._metrics
        metrics.requestFinished(record)
        for errorType in record.upstreamErrors:
            metrics.upstreamError(errorType)
        for cls, code in record.zaiErrors:
            metrics.zaiError(cls, code)
        for reason in record.retries:
            metrics.retried(reason)
        if record.authFailure is not None:
            metrics.clientAuthFailure(record.authFailure)
        _accessLine(record)
        if record.billed is not None:
            metrics.billed(record.billed, record.keyName or "-")
            _usageLine(record, record.billed)
        for sink in self._sinks:
            try:
                sink(record)
            except Exception:
                self.log.failure("a record sink failed")

    # -- the limiter's observer -------------------------------------------------

    def rateAdjusted(self, direction: str) -> None:
        self._metrics.rateLimitAdjustment(direction)
        for watcher in self._adjustmentWatchers:
            watcher(direction)

    def watchAdjustments(self, watcher: Callable[[str], object]) -> None:
        """
        Tell C{watcher} of every limiter adjustment too (the dashboard).
        """
        self._adjustmentWatchers.append(watcher)

    def admitted(self, client: str, waited: float) -> None:
        self._metrics.admissionWait(client, waited)

    def refused(self, client: str) -> None:
        self._metrics.admissionRefused(client)


def _accessLine(record: Record) -> None:
    """
    The access-log line: the Go zai-proxy's text, and its fields for JSON.
    """
    model = record.model or "-"
    line = (
        f"{record.method} {record.route} {record.status} {record.duration:.3f}s "
        f"in={record.requestBytes} out={record.responseBytes} model={model}"
    )
    if record.path is not None:
        line += f" path={record.path}"
    if record.errorType:
        line += f" error={record.errorType}"
    if record.keyName is not None:
        line += f" client={record.keyName}"
    if record.requestId:
        line += f" id={record.requestId}"
    _accessLog.info(
        LINE,
        line=line,
        method=record.method,
        route=record.route,
        status=record.status,
        duration=round(record.duration, 6),
        bytesIn=record.requestBytes,
        bytesOut=record.responseBytes,
        model=model,
        errorType=record.errorType,
        client=record.clientLabel,
        peer=record.client,
        queueWait=round(record.queueWait, 6),
        path=record.path,
        requestId=record.requestId,
        ttfb=None if record.ttfb is None else round(record.ttfb, 6),
    )


def _usageLine(record: Record, billed: Billed) -> None:
    """
    The Go zai-proxy's "Token usage" line.
    """
    usage = billed.usage
    _usageLog.info(
        LINE,
        line=(
            f"Token usage: input={usage.input}, output={usage.output}, "
            f"cache_read={usage.cacheRead}, cache_write={usage.cacheWrite}, "
            f"source={billed.source}, model={billed.model}"
        ),
        input=usage.input,
        output=usage.output,
        cacheRead=usage.cacheRead,
        cacheWrite=usage.cacheWrite,
        source=billed.source,
        model=billed.model,
        requestedModel=record.model,
        responseModel=billed.responseModel,
        route=record.route,
    )
