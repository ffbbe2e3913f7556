# -*- test-case-name: tests.test_dashboard_live -*-
"""
The dashboard's live points: every C{DASHBOARD_INTERVAL} the records that
finished in it (handed over by the reporter, the one door) and the gauges
read at that moment become one point, kept for an hour and sent to every
open C{/api/events} stream.

Once a minute the gauges also go to the ledger, so the long ranges show
concurrency, the limiter and the quota after a restart.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from zaiproxy.ledger.rows import GaugeSample, recordSums
from zaiproxy.ledger.series import Gauges, snapshot
from zaiproxy.limits.limiter import RateLimiter
from zaiproxy.observe.quota import QuotaPoller
from zaiproxy.observe.record import Record

__all__ = ["LiveWindow", "Sampler", "quotaBlock"]

#: How much of the live series is kept in memory.
KEEP_SECONDS = 3600.0


class LiveWindow:
    """
    What finished since the last point: sums by status class (the rollups'
    columns), and the limiter's adjustments.
    """

    def __init__(self) -> None:
        self._byClass: dict[int, list[float]] = {}
        self._increases = 0
        self._decreases = 0

    def add(self, record: Record) -> None:
        """
        The reporter's sink: one finished request.
        """
        sums = recordSums(record)
        into = self._byClass.get(record.status // 100)
        if into is None:
            self._byClass[record.status // 100] = sums
            return
        for i, value in enumerate(sums):
            into[i] += value

    def adjusted(self, direction: str) -> None:
        """
        The limiter moved its rate (C{increase} or C{decrease}).
        """
        if direction == "increase":
            self._increases += 1
        elif direction == "decrease":
            self._decreases += 1

    def take(self) -> tuple[dict[int, list[float]], int, int]:
        """
        The window's sums and adjustments; the next window starts empty.
        """
        taken = (self._byClass, self._increases, self._decreases)
        self._byClass, self._increases, self._decreases = {}, 0, 0
        return taken


def quotaBlock(poller: QuotaPoller | None, limiter: RateLimiter, now: float) -> dict[str, Any] | None:
    """
    The Go dashboard's C{quota} field: each window's use and reset, the
    sample's age, and whether the proxy is holding calls for it.
    """
    if poller is None:
        return None
    block: dict[str, Any] = {
        "five_hour": None,
        "weekly": None,
        "sample_age_seconds": None,
        "gate_open": limiter.quotaHeld() is None,
        "enforcement": limiter.settings.quotaHold,
    }
    sample = poller.sample
    if sample is not None:
        block["sample_age_seconds"] = round(max(0.0, now - sample.takenAt), 1)
        for window in sample.windows:
            if window.window in ("five_hour", "weekly"):
                block[window.window] = {
                    "limit_type": window.limitType,
                    "usage_ratio": round(window.usedFraction, 6),
                    "remaining_ratio": round(1 - window.usedFraction, 6),
                    "reset_time_unix": window.resetAt,
                }
    return block


#: (concurrent, max workers, rate, ceiling, quota block) read at a point.
GaugeReading = tuple[int, int, float, float, "dict[str, Any] | None"]


class Sampler:
    """
    Makes a point every C{interval} seconds on C{clock}.

    @param readGauges: the gauges now.
    @param keepGauges: where each minute's gauges go (the ledger), if
        anywhere.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        interval: float,
        variant: str,
        window: LiveWindow,
        readGauges: Callable[[], GaugeReading],
        keepGauges: Callable[[GaugeSample], None] | None = None,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.variant = variant
        self._window = window
        self._readGauges = readGauges
        self._keepGauges = keepGauges
        self.points: deque[dict[str, Any]] = deque(maxlen=max(1, int(KEEP_SECONDS / interval)))
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self._minute: list[Any] | None = None

    def start(self) -> None:
        self._loop.start(self.interval, now=False).addErrback(
            lambda failure: self.log.failure("the dashboard's sampler stopped", failure=failure)
        )

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._flushMinute()

    def subscribe(self, subscriber: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """
        Call C{subscriber} with every new point; return the way to stop.
        """
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in self._subscribers else None

    def since(self, start: float) -> list[dict[str, Any]]:
        """
        The points at or after C{start} (seconds).
        """
        edge = start * 1000
        return [point for point in self.points if point["timestamp"] >= edge]

    def tick(self) -> None:
        now = self.clock.seconds()
        byClass, increases, decreases = self._window.take()
        concurrent, maxWorkers, rate, ceiling, quota = self._readGauges()
        gauges = Gauges(concurrent, maxWorkers, rate, ceiling, increases, decreases, quota)
        point = snapshot(now, self.variant, self.interval, byClass, gauges)
        self.points.append(point)
        self._keepMinute(now, gauges)
        for subscriber in list(self._subscribers):
            try:
                subscriber(point)
            except Exception:
                self.log.failure("a live dashboard stream failed")

    def _keepMinute(self, now: float, gauges: Gauges) -> None:
        """
        Fold the point's gauges into its minute's sample; hand the previous
        minute's on when a new minute begins.
        """
        if self._keepGauges is None:
            return
        bucket = int(now // 60) * 60
        current = self._minute
        if current is not None and current[0] != bucket:
            self._flushMinute()
            current = None
        if current is None:
            self._minute = [bucket, gauges.concurrent, gauges, gauges.adjIncrease, gauges.adjDecrease]
            return
        current[1] = max(current[1], gauges.concurrent)
        current[2] = gauges
        current[3] += gauges.adjIncrease
        current[4] += gauges.adjDecrease

    def _flushMinute(self) -> None:
        current, self._minute = self._minute, None
        if current is None or self._keepGauges is None:
            return
        bucket, peak, last, increases, decreases = current
        self._keepGauges(
            GaugeSample(
                bucket=bucket,
                concurrentMax=peak,
                maxWorkers=last.maxWorkers,
                rateLimitRps=last.rateLimitRps,
                rateLimitCeiling=last.rateLimitCeiling,
                adjIncrease=increases,
                adjDecrease=decreases,
                quota=json.dumps(last.quota) if last.quota is not None else None,
            )
        )
