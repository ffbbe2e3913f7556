# -*- test-case-name: tests.test_ledger_rows -*-
"""
What the ledger keeps of a finished request: one row of the C{requests}
table, and its share of the per-minute and per-hour rollups.

Pure values and arithmetic, run on the writer thread: nothing here touches
a database.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from zaiproxy.observe.record import CLIENT_CLOSED, Record, newRequestId

__all__ = [
    "LATENCY_BOUNDS",
    "REQUEST_COLUMNS",
    "ROLLUP_KEYS",
    "ROLLUP_SUMS",
    "GaugeSample",
    "Origin",
    "Rollups",
    "isError",
    "recordSums",
    "requestRow",
]

#: Upper bounds (seconds) of the latency buckets the rollups count
#: (C{lat_0} .. C{lat_11}); the last is open.
LATENCY_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))

#: The C{requests} table's columns, in the order L{requestRow} gives them.
REQUEST_COLUMNS = (
    "request_id",
    "started_at",
    "ended_at",
    "minute",
    "client",
    "peer",
    "model",
    "route",
    "dialect",
    "stream",
    "status",
    "error_type",
    "zai_error",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "token_source",
    "cost_usd",
    "duration_ms",
    "ttfb_ms",
    "queue_wait_ms",
    "attempts",
    "bytes_in",
    "bytes_out",
    "zai_request_id",
    "variant",
    "instance",
)

#: A rollup row's key columns, and its summed columns in L{Rollups} order.
ROLLUP_KEYS = ("bucket", "variant", "instance", "client", "model", "route", "status_class")
ROLLUP_SUMS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "cost_input",
    "cost_output",
    "cost_cache_read",
    "cost_cache_write",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "upstream_errors",
    "retries",
    "rejections",
    *(f"lat_{i}" for i in range(len(LATENCY_BOUNDS))),
)
_LATENCY_AT = ROLLUP_SUMS.index("lat_0")

#: The proxy's own refusals for pacing (its queue was full or too slow).
_REJECTIONS = frozenset(["queue_full", "queue_timeout"])


@attrs.frozen
class Origin:
    """
    Which proxy wrote a row: its C{DEPLOYMENT_VARIANT} and instance name.
    """

    variant: str
    instance: str


def isError(status: int) -> bool:
    """
    Whether a status counts as an error in the ledger: any 4xx or 5xx but
    499, which says the client left (not a failure of the proxy or Z.AI).
    """
    return status >= 400 and status != CLIENT_CLOSED


def requestRow(record: Record, origin: Origin) -> tuple[Any, ...]:
    """
    The C{requests} row of one record, in L{REQUEST_COLUMNS} order.
    """
    billed = record.billed
    usage = billed.usage if billed is not None else None
    zaiError = record.zaiErrors[-1][1] if record.zaiErrors else None
    return (
        record.requestId or newRequestId(),
        record.startedAt,
        record.startedAt + record.duration,
        int(record.startedAt // 60) * 60,
        record.keyName or "-",
        record.client,
        record.model or "-",
        record.route,
        record.dialect.value if record.dialect is not None else "-",
        int(record.stream),
        record.status,
        record.errorType,
        zaiError,
        usage.input if usage else 0,
        usage.output if usage else 0,
        usage.cacheRead if usage else 0,
        usage.cacheWrite if usage else 0,
        billed.source if billed is not None else None,
        billed.cost if billed is not None else 0.0,
        record.duration * 1000,
        None if record.ttfb is None else record.ttfb * 1000,
        record.queueWait * 1000,
        record.attempts,
        record.requestBytes,
        record.responseBytes,
        record.zaiRequestId,
        origin.variant,
        origin.instance,
    )


def recordSums(record: Record) -> list[float]:
    """
    One record's share of a rollup row, in L{ROLLUP_SUMS} order.
    """
    billed = record.billed
    usage = billed.usage if billed is not None else None
    costs = billed.costs if billed is not None else {}
    sums: list[float] = [
        1,
        int(isError(record.status)),
        usage.input if usage else 0,
        usage.output if usage else 0,
        usage.cacheRead if usage else 0,
        usage.cacheWrite if usage else 0,
        billed.cost if billed is not None else 0.0,
        costs.get("input", 0.0),
        costs.get("output", 0.0),
        costs.get("cache_read", 0.0),
        costs.get("cache_write", 0.0),
        round(record.duration * 1000),
        record.requestBytes,
        record.responseBytes,
        len(record.upstreamErrors),
        len(record.retries),
        int(record.errorType in _REJECTIONS),
    ]
    sums.extend([0] * len(LATENCY_BOUNDS))
    sums[_LATENCY_AT + bisect.bisect_left(LATENCY_BOUNDS, record.duration)] = 1
    return sums


class Rollups:
    """
    One batch's records summed by minute and by hour, ready to be added to
    the rollup tables (one upsert per key, not per request).
    """

    def __init__(self, origin: Origin) -> None:
        self._origin = origin
        self.minutes: dict[tuple[Any, ...], list[float]] = {}
        self.hours: dict[tuple[Any, ...], list[float]] = {}

    def add(self, records: Iterable[Record]) -> None:
        origin = self._origin
        minutes = self.minutes
        for record in records:
            key = (
                int(record.startedAt // 60) * 60,
                origin.variant,
                origin.instance,
                record.keyName or "-",
                record.model or "-",
                record.route,
                record.status // 100,
            )
            _addTo(minutes, key, recordSums(record))
        # Hours from the batch's minutes: a few dozen keys, not every row.
        self.hours = {}
        for key, sums in minutes.items():
            _addTo(self.hours, (key[0] - key[0] % 3600, *key[1:]), sums)

    @staticmethod
    def rows(table: dict[tuple[Any, ...], list[float]]) -> list[tuple[Any, ...]]:
        return [(*key, *sums) for key, sums in table.items()]


def _addTo(table: dict[tuple[Any, ...], list[float]], key: tuple[Any, ...], sums: Sequence[float]) -> None:
    into = table.get(key)
    if into is None:
        table[key] = list(sums)
        return
    for i, value in enumerate(sums):
        into[i] += value


@attrs.frozen
class GaugeSample:
    """
    The live gauges at one minute: concurrency, the limiter, the quota.
    """

    bucket: int
    concurrentMax: int
    maxWorkers: int
    rateLimitRps: float
    rateLimitCeiling: float
    adjIncrease: int
    adjDecrease: int
    quota: str | None

    def row(self, origin: Origin) -> tuple[Any, ...]:
        return (
            self.bucket,
            origin.variant,
            origin.instance,
            self.concurrentMax,
            self.maxWorkers,
            self.rateLimitRps,
            self.rateLimitCeiling,
            self.adjIncrease,
            self.adjDecrease,
            self.quota,
        )
