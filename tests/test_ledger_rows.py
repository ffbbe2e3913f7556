"""
Tests for L{zaiproxy.ledger.rows}.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from zaiproxy.dialects import Dialect
from zaiproxy.dialects.usage import Usage
from zaiproxy.ledger.rows import (
    LATENCY_BOUNDS,
    REQUEST_COLUMNS,
    ROLLUP_SUMS,
    GaugeSample,
    Origin,
    Rollups,
    isError,
    recordSums,
    requestRow,
)
from zaiproxy.observe.record import Billed, Record

T0 = 1_796_000_000.0
ORIGIN = Origin("production", "host-1")


def record(
    i: int = 0,
    status: int = 200,
    duration: float = 1.5,
    keyName: str | None = "alice",
    model: str | None = "glm-4.7",
    usage: Usage | None = None,
    costs: dict[str, float] | None = None,
    **fields: Any,
) -> Record:
    """
    A finished Messages request started at C{T0 + i}.
    """
    billed = None
    if usage is not None:
        billed = Billed(usage, "reported", "glm-4.7", None, "standard", costs or {})
    return Record(
        method="POST",
        route="/v1/messages",
        status=status,
        startedAt=T0 + i,
        duration=duration,
        requestId=f"req-{i}",
        keyName=keyName,
        dialect=Dialect.anthropic,
        model=model,
        billed=billed,
        **fields,
    )


def sumsOf(**values: float) -> list[float]:
    """
    A rollup row's sums in L{ROLLUP_SUMS} order: zero but for C{values}.
    """
    unknown = set(values) - set(ROLLUP_SUMS)
    assert not unknown, unknown
    return [values.get(name, 0) for name in ROLLUP_SUMS]


def test_requestRowColumnOrder() -> None:
    """
    A record's row holds every field in L{REQUEST_COLUMNS} order, with the
    minute bucket, tokens, source and cost of its billing, and the times
    in milliseconds.
    """
    full = record(
        7,
        status=502,
        duration=2.5,
        usage=Usage(100, 20, 30, 4),
        costs={"input": 0.25, "output": 0.5},
        ttfb=0.25,
        requestBytes=1000,
        responseBytes=2000,
        errorType="read_error",
        client="10.0.0.1",
        queueWait=0.125,
        zaiErrors=(("frequency", "1303"), ("balance", "1113")),
        stream=True,
        attempts=2,
        zaiRequestId="zai-1",
    )
    row = requestRow(full, ORIGIN)
    assert len(row) == len(REQUEST_COLUMNS)
    assert dict(zip(REQUEST_COLUMNS, row, strict=True)) == {
        "request_id": "req-7",
        "started_at": 1_796_000_007.0,
        "ended_at": 1_796_000_009.5,
        "minute": 1_795_999_980,
        "client": "alice",
        "peer": "10.0.0.1",
        "model": "glm-4.7",
        "route": "/v1/messages",
        "dialect": "anthropic",
        "stream": 1,
        "status": 502,
        "error_type": "read_error",
        "zai_error": "1113",
        "input_tokens": 100,
        "output_tokens": 20,
        "cache_read_tokens": 30,
        "cache_write_tokens": 4,
        "token_source": "reported",
        "cost_usd": 0.75,
        "duration_ms": 2500.0,
        "ttfb_ms": 250.0,
        "queue_wait_ms": 125.0,
        "attempts": 2,
        "bytes_in": 1000,
        "bytes_out": 2000,
        "zai_request_id": "zai-1",
        "variant": "production",
        "instance": "host-1",
    }


def test_requestRowWithoutKeyModelOrBilling() -> None:
    """
    No client key, no model and no dialect are shown as C{-}; without a
    billing the tokens and cost are zero and the source is L{None}; an
    unset request id gets a fresh one of 16 hex digits.
    """
    bare = Record(method="GET", route="unknown", status=404, startedAt=T0, duration=0.0)
    row = dict(zip(REQUEST_COLUMNS, requestRow(bare, ORIGIN), strict=True))
    assert (row["client"], row["model"], row["dialect"], row["peer"]) == ("-", "-", "-", "-")
    assert (
        row["input_tokens"],
        row["output_tokens"],
        row["cache_read_tokens"],
        row["cache_write_tokens"],
    ) == (
        0,
        0,
        0,
        0,
    )
    assert (row["token_source"], row["cost_usd"], row["ttfb_ms"], row["zai_error"]) == (None, 0.0, None, None)
    assert re.fullmatch(r"[0-9a-f]{16}", row["request_id"])
    assert (
        row["request_id"] != dict(zip(REQUEST_COLUMNS, requestRow(bare, ORIGIN), strict=True))["request_id"]
    )


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (200, False),
        (304, False),
        (399, False),
        (400, True),
        (429, True),
        (499, False),
        (500, True),
        (503, True),
    ],
)
def test_isError(status: int, error: bool) -> None:
    """
    Any 4xx or 5xx is an error but 499 (the client left).
    """
    assert isError(status) is error


@pytest.mark.parametrize(
    ("duration", "bucket"),
    [
        (0.0, 0),
        (0.05, 0),
        (0.1, 0),
        (0.1000001, 1),
        (0.25, 1),
        (0.3, 2),
        (1.0, 3),
        (2.5, 4),
        (60.0, 8),
        (299.9, 10),
        (300.0, 10),
        (300.5, 11),
        (10_000.0, 11),
    ],
)
def test_latencyBucket(duration: float, bucket: int) -> None:
    """
    A duration counts in the first bucket whose upper bound it does not
    pass: exactly on a bound is that bound's bucket; past the last finite
    bound is the open one.
    """
    sums = recordSums(record(duration=duration))
    latency = sums[ROLLUP_SUMS.index("lat_0") :]
    assert len(latency) == len(LATENCY_BOUNDS) == 12
    assert latency == [1 if i == bucket else 0 for i in range(12)]


def test_recordSums() -> None:
    """
    One record's share of a rollup: a request, an error for a 5xx, its
    tokens, cost by direction, whole milliseconds, bytes, upstream errors,
    retries and its latency bucket.
    """
    sums = recordSums(
        record(
            status=500,
            duration=0.4004,
            usage=Usage(10, 20, 30, 40),
            costs={"input": 0.5, "output": 0.25, "cache_read": 0.125, "cache_write": 0.0625},
            requestBytes=11,
            responseBytes=22,
            upstreamErrors=("429", "read_error"),
            retries=("429",),
        )
    )
    assert sums == sumsOf(
        requests=1,
        errors=1,
        input_tokens=10,
        output_tokens=20,
        cache_read_tokens=30,
        cache_write_tokens=40,
        cost_usd=0.9375,
        cost_input=0.5,
        cost_output=0.25,
        cost_cache_read=0.125,
        cost_cache_write=0.0625,
        duration_ms=400,
        bytes_in=11,
        bytes_out=22,
        upstream_errors=2,
        retries=1,
        lat_2=1,
    )


@pytest.mark.parametrize(
    ("errorType", "rejections"),
    [("queue_full", 1), ("queue_timeout", 1), ("429", 0), ("read_error", 0), (None, 0)],
)
def test_rejections(errorType: str | None, rejections: int) -> None:
    """
    Only the proxy's own pacing refusals count as rejections.
    """
    sums = recordSums(record(status=429, errorType=errorType))
    assert sums[ROLLUP_SUMS.index("rejections")] == rejections


def test_clientClosedIsNoError() -> None:
    """
    A request the client left (499) is counted, but not as an error.
    """
    sums = recordSums(record(status=499))
    assert (sums[ROLLUP_SUMS.index("requests")], sums[ROLLUP_SUMS.index("errors")]) == (1, 0)


def test_rollupsByMinuteAndHour() -> None:
    """
    A batch is summed per minute and per hour, by client, model, route
    and status class: two requests of one minute share a row, the next
    minute has its own, and all of one hour share the hour's row.
    """
    rollups = Rollups(ORIGIN)
    rollups.add(
        [
            record(0, usage=Usage(100, 10), costs={"input": 0.25, "output": 0.5}, duration=0.05),
            record(
                10, status=201, usage=Usage(200, 20), costs={"input": 0.125, "output": 0.0625}, duration=0.2
            ),
            record(45, usage=Usage(1, 2), duration=0.05),  # 00:54:05: the next minute
            record(50, status=429, keyName=None, model=None, duration=0.05),
            record(3000, usage=Usage(5, 5), duration=0.05),  # 01:43:20: the next hour
        ]
    )
    rest = ("production", "host-1", "alice", "glm-4.7", "/v1/messages", 2)
    assert rollups.minutes == {
        (1_795_999_980, *rest): sumsOf(
            requests=2,
            input_tokens=300,
            output_tokens=30,
            cost_usd=0.9375,
            cost_input=0.375,
            cost_output=0.5625,
            duration_ms=250,
            lat_0=1,
            lat_1=1,
        ),
        (1_796_000_040, *rest): sumsOf(requests=1, input_tokens=1, output_tokens=2, duration_ms=50, lat_0=1),
        (1_796_000_040, "production", "host-1", "-", "-", "/v1/messages", 4): sumsOf(
            requests=1, errors=1, duration_ms=50, lat_0=1
        ),
        (1_796_002_980, *rest): sumsOf(requests=1, input_tokens=5, output_tokens=5, duration_ms=50, lat_0=1),
    }
    assert rollups.hours == {
        (1_795_996_800, *rest): sumsOf(
            requests=3,
            input_tokens=301,
            output_tokens=32,
            cost_usd=0.9375,
            cost_input=0.375,
            cost_output=0.5625,
            duration_ms=300,
            lat_0=2,
            lat_1=1,
        ),
        (1_795_996_800, "production", "host-1", "-", "-", "/v1/messages", 4): sumsOf(
            requests=1, errors=1, duration_ms=50, lat_0=1
        ),
        (1_796_000_400, *rest): sumsOf(requests=1, input_tokens=5, output_tokens=5, duration_ms=50, lat_0=1),
    }
    assert Rollups.rows({(1, "k"): [2.0, 3.0]}) == [(1, "k", 2.0, 3.0)]


def test_rollupsAddAcrossCalls() -> None:
    """
    A second C{add} of the same minute adds to the row the first made.
    """
    rollups = Rollups(ORIGIN)
    rollups.add([record(0, usage=Usage(7, 1), duration=0.05)])
    rollups.add([record(1, usage=Usage(3, 2), duration=0.05)])
    assert list(rollups.minutes.values()) == [
        sumsOf(requests=2, input_tokens=10, output_tokens=3, duration_ms=100, lat_0=2)
    ]


def test_gaugeSampleRow() -> None:
    """
    A gauge sample's row: its minute, the origin, then the gauges.
    """
    sample = GaugeSample(1_795_999_980, 3, 10, 1.5, 4.0, 2, 1, '{"used": 5}')
    assert sample.row(ORIGIN) == (1_795_999_980, "production", "host-1", 3, 10, 1.5, 4.0, 2, 1, '{"used": 5}')
