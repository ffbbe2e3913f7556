"""
Tests for L{zaiproxy.ledger.reports}, on a real SQLite file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zaiproxy.dialects import Dialect
from zaiproxy.dialects.usage import Usage
from zaiproxy.ledger import reports
from zaiproxy.ledger.queries import RequestsQuery, UsageQuery, makeCursor, readCursor, requestsQuery
from zaiproxy.ledger.rows import GaugeSample, Origin
from zaiproxy.ledger.store import SQLiteStore
from zaiproxy.observe.record import Billed, Record

#: 2026-11-30T00:53:20Z; its minute starts at T0 - 20, its hour and day at
#: T0 - 3200.
T0 = 1_796_000_000.0
PRODUCTION = Origin("production", "host-1")
CANARY = Origin("canary", "host-2")


def record(
    requestId: str,
    at: float,
    client: str,
    status: int = 200,
    usage: Usage | None = None,
    costs: dict[str, float] | None = None,
    duration: float = 0.5,
    **fields: Any,
) -> Record:
    """
    A finished Messages request of C{client}'s started at C{T0 + at}.
    """
    billed = None if usage is None else Billed(usage, "reported", "glm-4.7", None, "standard", costs or {})
    return Record(
        method="POST",
        route="/v1/messages",
        status=status,
        startedAt=T0 + at,
        duration=duration,
        requestId=requestId,
        keyName=client,
        dialect=Dialect.anthropic,
        model="glm-4.7",
        billed=billed,
        **fields,
    )


#: The usage rows: production's six and canary's one.
PRODUCTION_ROWS = [
    record(
        "u1",
        0,
        "alice",
        usage=Usage(100, 10),
        costs={"input": 0.25, "output": 0.5},
        requestBytes=100,
        responseBytes=1000,
    ),
    record(
        "u2",
        30,
        "alice",
        usage=Usage(200, 20),
        costs={"input": 0.125, "output": 0.0625},
        duration=2.0,
        requestBytes=300,
        responseBytes=2000,
    ),
    record("u3", 90, "bob", status=429, errorType="429", upstreamErrors=("429",)),
    record("u6", 60, "carol", status=499, usage=Usage(8, 0), costs={"input": 0.25}),
    record("u4", 4100, "bob", usage=Usage(50, 5), costs={"input": 0.5}),
    record("u5", 2 * 86400, "alice", status=500, usage=Usage(1, 1)),
]
CANARY_ROWS = [record("c1", 10, "alice", usage=Usage(1000, 100), costs={"input": 2.0})]
#: Gauges of production: the minute of u1 and u2, and two minutes later.
GAUGES = [
    GaugeSample(1_795_999_980, 3, 10, 1.5, 4.0, 1, 0, '{"used": 5}'),
    GaugeSample(1_796_000_100, 2, 10, 2.0, 4.0, 0, 1, None),
]

TOTALS_ZERO = {
    "requests": 0,
    "errors": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_read_tokens": 0,
    "cache_write_tokens": 0,
    "cost_usd": 0,
}


def numbers(requests: int, errors: int, input: int, output: int, cost: float) -> dict[str, Any]:
    return {
        "requests": requests,
        "errors": errors,
        "input_tokens": input,
        "output_tokens": output,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "cost_usd": cost,
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(str(tmp_path / "ledger.sqlite3"))
    opened.open()
    yield opened
    opened.close()


@pytest.fixture
def ledger(store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    """
    A read-only connection to a ledger holding the usage rows and gauges.
    """
    store.write(PRODUCTION_ROWS, GAUGES, PRODUCTION)
    store.write(CANARY_ROWS, [], CANARY)
    reader = store.reader()
    yield reader
    reader.close()


def test_usageFromRequestRows(ledger: sqlite3.Connection) -> None:
    """
    A span of up to six hours is summed from the request rows, exact to
    the second: 499 is no error, and the bounds are the query's.
    """
    answer = reports.usage(ledger, UsageQuery(T0 - 10, T0 + 3600))
    assert answer == {
        "from": "2026-11-30T00:53:10Z",
        "to": "2026-11-30T01:53:20Z",
        "resolution": "request",
        "group_by": [],
        "rows": [numbers(5, 1, 1308, 130, 3.1875)],
        "totals": numbers(5, 1, 1308, 130, 3.1875),
    }
    later = reports.usage(ledger, UsageQuery(T0 + 1, T0 + 6 * 3600))
    assert (later["resolution"], later["totals"]) == ("request", numbers(5, 1, 1258, 125, 2.9375))


def test_usageFromMinuteRollups(ledger: sqlite3.Connection) -> None:
    """
    A span over six hours and up to three days is summed from the minute
    rollups, its bounds widened to whole minutes (so u1, in the minute of
    C{from}, counts).
    """
    answer = reports.usage(ledger, UsageQuery(T0 + 1, T0 + 7 * 3600))
    assert answer == {
        "from": "2026-11-30T00:53:00Z",
        "to": "2026-11-30T07:54:00Z",
        "resolution": "minute",
        "group_by": [],
        "rows": [numbers(6, 1, 1358, 135, 3.6875)],
        "totals": numbers(6, 1, 1358, 135, 3.6875),
    }
    exact = reports.usage(ledger, UsageQuery(T0 - 20, T0 + 3 * 86400 - 20))
    assert (exact["from"], exact["to"], exact["resolution"]) == (
        "2026-11-30T00:53:00Z",
        "2026-12-03T00:53:00Z",
        "minute",
    )
    assert exact["totals"] == numbers(7, 2, 1359, 136, 3.6875)


def test_usageFromHourRollups(ledger: sqlite3.Connection) -> None:
    """
    A span of more than three days is summed from the hour rollups, its
    bounds widened to whole hours; grouped by day, each day is an ISO day.
    """
    answer = reports.usage(ledger, UsageQuery(T0 + 1, T0 + 4 * 86400, ("day",)))
    assert answer == {
        "from": "2026-11-30T00:00:00Z",
        "to": "2026-12-04T01:00:00Z",
        "resolution": "hour",
        "group_by": ["day"],
        "rows": [
            {"day": "2026-11-30T00:00:00Z", **numbers(6, 1, 1358, 135, 3.6875)},
            {"day": "2026-12-02T00:00:00Z", **numbers(1, 1, 1, 1, 0.0)},
        ],
        "totals": numbers(7, 2, 1359, 136, 3.6875),
    }


def test_usageByMinuteOverALongSpan(ledger: sqlite3.Connection) -> None:
    """
    Grouped by minute, even a span of more than three days reads the
    minute rollups.
    """
    answer = reports.usage(ledger, UsageQuery(T0 - 20, T0 + 4 * 86400, ("minute",), variant="production"))
    assert answer["resolution"] == "minute"
    assert [(row["minute"], row["requests"]) for row in answer["rows"]] == [
        ("2026-11-30T00:53:00Z", 2),
        ("2026-11-30T00:54:00Z", 2),
        ("2026-11-30T02:01:00Z", 1),
        ("2026-12-02T00:53:00Z", 1),
    ]


@pytest.mark.parametrize(
    ("start", "end"), [(T0 - 10, T0 + 3600), (T0 - 10, T0 + 7 * 3600), (T0 - 10, T0 + 4 * 86400)]
)
def test_usageByStatus(ledger: sqlite3.Connection, start: float, end: float) -> None:
    """
    Grouped by status, rows are classes (C{2xx}) at every resolution.
    """
    answer = reports.usage(ledger, UsageQuery(start, end, ("status",)))
    rows = {row["status"]: (row["requests"], row["errors"]) for row in answer["rows"]}
    assert [row["status"] for row in answer["rows"]] == sorted(rows)
    if end - start <= 6 * 3600:
        assert rows == {"2xx": (3, 0), "4xx": (2, 1)}
    elif end - start <= 3 * 86400:
        assert rows == {"2xx": (4, 0), "4xx": (2, 1)}
    else:
        assert rows == {"2xx": (4, 0), "4xx": (2, 1), "5xx": (1, 1)}


def test_usageByHourFromRows(ledger: sqlite3.Connection) -> None:
    """
    Grouped by hour over request rows, each row is an ISO hour.
    """
    answer = reports.usage(ledger, UsageQuery(T0 - 10, T0 + 5 * 3600, ("hour",)))
    assert answer["rows"] == [
        {"hour": "2026-11-30T00:00:00Z", **numbers(5, 1, 1308, 130, 3.1875)},
        {"hour": "2026-11-30T02:00:00Z", **numbers(1, 0, 50, 5, 0.5)},
    ]


def test_usageVariantAndClient(ledger: sqlite3.Connection) -> None:
    """
    C{variant} and C{client} keep only their rows, from the request rows
    as from the rollups; several groups nest in the order asked.
    """
    raw = reports.usage(ledger, UsageQuery(T0 - 10, T0 + 3600, ("client", "status"), variant="production"))
    assert raw["rows"] == [
        {"client": "alice", "status": "2xx", **numbers(2, 0, 300, 30, 0.9375)},
        {"client": "bob", "status": "4xx", **numbers(1, 1, 0, 0, 0.0)},
        {"client": "carol", "status": "4xx", **numbers(1, 0, 8, 0, 0.25)},
    ]
    assert raw["totals"] == numbers(4, 1, 308, 30, 1.1875)
    canary = reports.usage(ledger, UsageQuery(T0 - 10, T0 + 7 * 3600, variant="canary"))
    assert canary["totals"] == numbers(1, 0, 1000, 100, 2.0)
    alice = reports.usage(ledger, UsageQuery(T0 - 10, T0 + 7 * 3600, ("model",), client="alice"))
    assert alice["rows"] == [{"model": "glm-4.7", **numbers(3, 0, 1300, 130, 2.9375)}]
    nobody = reports.usage(ledger, UsageQuery(T0 - 10, T0 + 4 * 86400, client="nobody"))
    assert (nobody["rows"], nobody["totals"]) == ([], TOTALS_ZERO)


@pytest.mark.parametrize("span", [3600, 7 * 3600, 4 * 86400])
def test_usageOfNothing(ledger: sqlite3.Connection, span: float) -> None:
    """
    A span without rows has no rows and zero totals.
    """
    answer = reports.usage(ledger, UsageQuery(T0 + 10 * 86400, T0 + 10 * 86400 + span))
    assert (answer["rows"], answer["totals"]) == ([], TOTALS_ZERO)


# -- requests ------------------------------------------------------------------

#: Five rows; a and b start together, as do d and e.
PAGED = [
    record("a", 10, "alice", status=200),
    record("b", 10, "bob", status=429),
    record("c", 20, "alice", status=500),
    record("d", 30, "bob", status=200),
    record("e", 30, "alice", status=503),
]


@pytest.fixture
def paged(store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    store.write(PAGED, [], PRODUCTION)
    reader = store.reader()
    yield reader
    reader.close()


def page(connection: sqlite3.Connection, **values: str) -> tuple[list[str], str | None]:
    query = requestsQuery({k.encode(): [v.encode()] for k, v in values.items()}, T0 + 100)
    answer = reports.requests(connection, query)
    return [row["request_id"] for row in answer["rows"]], answer["next"]


def test_requestsPages(paged: sqlite3.Connection) -> None:
    """
    Five rows by twos: pages of 2, 2 and 1, newest first, ties on the
    start broken by request id (descending); each page but the last gives
    the cursor of its last row.
    """
    first, following = page(paged, limit="2")
    assert (first, following) == (["e", "d"], makeCursor(1_796_000_030.0, "d"))
    assert following is not None
    second, following = page(paged, limit="2", cursor=following)
    assert (second, following) == (["c", "b"], makeCursor(1_796_000_010.0, "b"))
    assert following is not None and readCursor(following) == (1_796_000_010.0, "b")
    third, following = page(paged, limit="2", cursor=following)
    assert (third, following) == (["a"], None)
    assert page(paged, limit="5") == (["e", "d", "c", "b", "a"], None)
    assert page(paged, limit="4") == (["e", "d", "c", "b"], makeCursor(1_796_000_010.0, "b"))


def test_requestsFilters(paged: sqlite3.Connection) -> None:
    """
    C{status} takes an exact status or a class; C{client}, C{model} and
    C{variant} their values; C{from} and C{to} bound the start.
    """
    assert page(paged, status="5xx") == (["e", "c"], None)
    assert page(paged, status="2xx") == (["d", "a"], None)
    assert page(paged, status="429") == (["b"], None)
    assert page(paged, status="404") == ([], None)
    assert page(paged, client="bob") == (["d", "b"], None)
    assert page(paged, client="alice", status="5xx", limit="1") == (["e"], makeCursor(1_796_000_030.0, "e"))
    assert page(paged, model="glm-5") == ([], None)
    assert page(paged, variant="canary") == ([], None)
    assert page(paged, variant="production", limit="1000")[0] == ["e", "d", "c", "b", "a"]
    assert page(paged, **{"from": str(T0 + 10), "to": str(T0 + 30)}) == (["c", "b", "a"], None)


def test_requestById(ledger: sqlite3.Connection) -> None:
    """
    C{request_id} finds one row, shown with ISO times, a boolean stream,
    rounded milliseconds and cost, and no minute column.
    """
    answer = reports.requests(ledger, RequestsQuery(0.0, float("inf"), limit=1, requestId="u1"))
    assert answer == {
        "rows": [
            {
                "request_id": "u1",
                "started_at": "2026-11-30T00:53:20Z",
                "ended_at": "2026-11-30T00:53:20Z",
                "client": "alice",
                "peer": "-",
                "model": "glm-4.7",
                "route": "/v1/messages",
                "dialect": "anthropic",
                "stream": False,
                "status": 200,
                "error_type": None,
                "zai_error": None,
                "input_tokens": 100,
                "output_tokens": 10,
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "token_source": "reported",
                "cost_usd": 0.75,
                "duration_ms": 500.0,
                "ttfb_ms": None,
                "queue_wait_ms": 0.0,
                "attempts": 0,
                "bytes_in": 100,
                "bytes_out": 1000,
                "zai_request_id": None,
                "variant": "production",
                "instance": "host-1",
            }
        ],
        "next": None,
    }
    missing = reports.requests(ledger, RequestsQuery(0.0, float("inf"), limit=1, requestId="nope"))
    assert missing == {"rows": [], "next": None}


def test_requestsRounding(store: SQLiteStore) -> None:
    """
    Times are shown to 0.1 ms and the cost to a millionth of a dollar.
    """
    store.write(
        [
            Record(
                method="POST",
                route="/v1/messages",
                status=200,
                startedAt=T0 + 0.75,
                duration=0.123456,
                ttfb=0.0123456,
                queueWait=0.00104,
                requestId="r",
                stream=True,
                billed=Billed(Usage(1, 1), "estimated", "m", None, "standard", {"input": 0.0000012345}),
            )
        ],
        [],
        PRODUCTION,
    )
    reader = store.reader()
    try:
        (row,) = reports.requests(reader, RequestsQuery(T0, T0 + 1))["rows"]
    finally:
        reader.close()
    assert (row["started_at"], row["ended_at"], row["stream"]) == (
        "2026-11-30T00:53:20Z",
        "2026-11-30T00:53:20Z",
        True,
    )
    assert (row["duration_ms"], row["ttfb_ms"], row["queue_wait_ms"], row["cost_usd"]) == (
        123.5,
        12.3,
        1.0,
        1e-06,
    )
    assert (row["client"], row["model"], row["dialect"], row["token_source"]) == ("-", "-", "-", "estimated")


# -- series --------------------------------------------------------------------

NO_GAUGES = {
    "concurrent_requests": None,
    "max_workers": None,
    "worker_utilization": None,
    "rate_limit_rps": None,
    "rate_limit_ceiling": None,
    "rate_limit_adj_increase": None,
    "rate_limit_adj_decrease": None,
    "quota": None,
}


def test_seriesByMinute(ledger: sqlite3.Connection) -> None:
    """
    One point a minute and variant, from the minute rollups: requests by
    class, latency percentiles from the buckets, rates per second of the
    minute, averages, and the minute's gauges; a minute with gauges but
    no request is a point too.
    """
    points = reports.series(ledger, T0 - 10, T0 + 180, 60, "production")
    assert [(p["timestamp"], p["variant"]) for p in points] == [
        (1_795_999_980_000, "production"),
        (1_796_000_040_000, "production"),
        (1_796_000_100_000, "production"),
    ]
    assert points[0] == {
        "timestamp": 1_795_999_980_000,
        "variant": "production",
        "interval_seconds": 60,
        "requests_2xx": 2,
        "requests_4xx": 0,
        "requests_5xx": 0,
        "req_rate": 0.0333,
        "error_rate_pct": 0.0,
        # u1 took 0.5 s (bucket 0.25..0.5), u2 2.0 s (bucket 1..2.5).
        "latency_p50": 500.0,
        "latency_p95": 2350.0,
        "latency_p99": 2470.0,
        "tokens_input": 300,
        "tokens_output": 30,
        "tokens_cache_read": 0,
        "tokens_cache_write": 0,
        "token_rate_in": 5.0,
        "token_rate_out": 0.5,
        "token_rate_cache_read": 0.0,
        "token_rate_cache_write": 0.0,
        "estimated_cost_usd_input": 0.375,
        "estimated_cost_usd_output": 0.5625,
        "estimated_cost_usd_cache_read": 0.0,
        "estimated_cost_usd_cache_write": 0.0,
        "upstream_errors": 0,
        "retry_attempts": 0,
        "rate_limit_rejections": 0,
        "request_size_avg": 200.0,
        "response_size_avg": 1500.0,
        "status_code_rates": {"2xx": 0.0333},
        "concurrent_requests": 3,
        "max_workers": 10,
        "worker_utilization": 0.3,
        "rate_limit_rps": 1.5,
        "rate_limit_ceiling": 4.0,
        "rate_limit_adj_increase": 1,
        "rate_limit_adj_decrease": 0,
        "quota": {"used": 5},
    }
    second = points[1]
    assert (second["requests_2xx"], second["requests_4xx"], second["error_rate_pct"]) == (0, 2, 50.0)
    assert (second["upstream_errors"], second["status_code_rates"]) == (1, {"4xx": 0.0333})
    assert {name: second[name] for name in NO_GAUGES} == NO_GAUGES
    third = points[2]
    assert (third["requests_2xx"], third["latency_p50"], third["request_size_avg"]) == (0, None, None)
    assert (third["concurrent_requests"], third["rate_limit_rps"], third["rate_limit_adj_decrease"]) == (
        2,
        2.0,
        1,
    )


def test_seriesEveryVariant(ledger: sqlite3.Connection) -> None:
    """
    Without a variant, each variant has its own points.
    """
    points = reports.series(ledger, T0 - 20, T0 + 40, 60, None)
    assert [(p["timestamp"], p["variant"], p["requests_2xx"], p["tokens_input"]) for p in points] == [
        (1_795_999_980_000, "canary", 1, 1000),
        (1_795_999_980_000, "production", 2, 300),
    ]
    assert points[0]["concurrent_requests"] is None


def test_seriesByHour(ledger: sqlite3.Connection) -> None:
    """
    One point an hour from the hour rollups; the hour's gauges are the
    peak concurrency, the mean rates, the summed adjustments and the last
    quota.
    """
    points = reports.series(ledger, T0, T0 + 7200, 3600, "production")
    assert [
        (p["timestamp"], p["requests_2xx"], p["requests_4xx"], p["interval_seconds"]) for p in points
    ] == [
        (1_795_996_800_000, 2, 2, 3600),
        (1_796_004_000_000, 1, 0, 3600),
    ]
    first = points[0]
    assert (first["req_rate"], first["error_rate_pct"], first["tokens_input"]) == (0.0011, 25.0, 308)
    assert {name: first[name] for name in NO_GAUGES} == {
        "concurrent_requests": 3,
        "max_workers": 10,
        "worker_utilization": 0.3,
        "rate_limit_rps": 1.75,
        "rate_limit_ceiling": 4.0,
        "rate_limit_adj_increase": 1,
        "rate_limit_adj_decrease": 1,
        "quota": None,
    }
    assert {name: points[1][name] for name in NO_GAUGES} == NO_GAUGES


def test_variants(store: SQLiteStore) -> None:
    """
    The variants that wrote rows in the last 30 days, each once, sorted.
    """
    now = time.time()  # variants() looks back from the wall clock
    store.write([record("n1", now - T0 - 60, "alice")], [], CANARY)
    store.write([record("n2", now - T0 - 120, "alice")], [], PRODUCTION)
    store.write([record("n3", now - T0 - 3600, "alice")], [], CANARY)
    store.write([record("old", now - T0 - 40 * 86400, "alice")], [], Origin("retired", "h"))
    reader = store.reader()
    try:
        assert reports.variants(reader) == ["canary", "production"]
    finally:
        reader.close()


def test_pastTheFinerRetentionReadsTheCoarser(tmp_path: Path) -> None:
    """
    Each table keeps its own retention: a short question about a day long
    since pruned from the request rows and minute rollups is answered
    from the hour rollups, not as zero.
    """
    from zaiproxy.ledger.store import Retention

    ledger = SQLiteStore(str(tmp_path / "pruned.sqlite3"))
    ledger.open()
    day = 86400.0
    old = [record(f"old-{i}", -20 * day + 60 * i, "alice") for i in range(30)]
    new = [record(f"new-{i}", -60.0 * (i + 1), "alice") for i in range(5)]
    ledger.write(old + new, [], PRODUCTION)
    ledger.prune(T0, Retention(requests=30 * day, minutes=8 * day, hours=400 * day))
    ledger.prune(T0, Retention(requests=8 * day, minutes=8 * day, hours=400 * day))
    reading = ledger.reader()
    try:
        start = T0 - 20 * day
        for span in (3600.0, day):
            answer = reports.usage(reading, UsageQuery(start, start + span))
            assert (answer["resolution"], answer["totals"]["requests"]) == ("hour", 30)
        recent = reports.usage(reading, UsageQuery(T0 - 3600, T0))
        assert (recent["resolution"], recent["totals"]["requests"]) == ("request", 5)
    finally:
        reading.close()
        ledger.close()
