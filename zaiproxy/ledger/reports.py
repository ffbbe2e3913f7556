# -*- test-case-name: tests.test_ledger_reports -*-
"""
The ledger's answers: usage sums, pages of requests, and the dashboard's
long-range series. Blocking functions of a read-only connection, run on a
reader thread (L{zaiproxy.ledger.reader}).

A short span is summed from the request rows themselves (exact to the
second); a longer one from the per-minute rollups, and one of more than
three days from the per-hour rollups, so a month's question reads some
thousands of rows rather than millions. The answer's C{resolution} says
which, and its bounds are widened to whole minutes or hours to match.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from typing import Any

from zaiproxy.ledger.queries import RequestsQuery, UsageQuery, makeCursor
from zaiproxy.ledger.rows import REQUEST_COLUMNS, ROLLUP_SUMS
from zaiproxy.ledger.series import Gauges, snapshot
from zaiproxy.ledger.store import Reading

__all__ = ["NUMBERS", "RAW_SPAN", "requests", "series", "usage", "variants"]

#: Spans up to this long are summed from the request rows.
RAW_SPAN = 6 * 3600.0
#: Spans up to this long (or grouped by minute) read the minute rollups.
MINUTE_SPAN = 3 * 86400.0

#: The summed columns of a C{/api/usage} row, in order.
NUMBERS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
)

_RAW_SUMS = (
    "COUNT(*)",
    "SUM(CASE WHEN status >= 400 AND status <> 499 THEN 1 ELSE 0 END)",
    "SUM(input_tokens)",
    "SUM(output_tokens)",
    "SUM(cache_read_tokens)",
    "SUM(cache_write_tokens)",
    "SUM(cost_usd)",
)
_ROLLUP_SUMS = tuple(f"SUM({name})" for name in NUMBERS)


def _iso(seconds: float) -> str:
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _source(connection: Reading, query: UsageQuery) -> tuple[str, str, int]:
    """
    The table, its time column, and its bucket size in seconds: the most
    detailed one the span allows that still holds rows as old as the
    question's start (each table has its own retention, so a short span
    a month back is read from the hour rollups).
    """
    span = query.end - query.start
    candidates = []
    if span <= RAW_SPAN:
        candidates.append(("requests", "started_at", 0))
    if span <= MINUTE_SPAN or "minute" in query.groupBy:
        candidates.append(("usage_minute", "bucket", 60))
    if "minute" not in query.groupBy:
        candidates.append(("usage_hour", "bucket", 3600))
    oldest = [_oldest(connection, source) for source in candidates]
    held = [time for time in oldest if time is not None]
    if not held:
        return candidates[0]
    # From as far back as the question asks and the ledger reaches; a
    # table that begins later was pruned (young ledgers begin together,
    # give or take the coarsest bucket).
    target = max(query.start, min(held)) + candidates[-1][2]
    for source, time in zip(candidates, oldest, strict=True):
        if time is not None and time <= target:
            return source
    return candidates[-1]


def _oldest(connection: Reading, source: tuple[str, str, int]) -> float | None:
    """
    The oldest time a table holds (MIN of an index's first column: one
    step, on both databases).
    """
    table, column, _ = source
    found = connection.execute(f"SELECT MIN({column}) FROM {table}").fetchone()[0]
    return None if found is None else float(found)


def _groupExpression(name: str, raw: bool) -> str:
    bucket = "minute" if raw else "bucket"
    return {
        "client": "client",
        "model": "model",
        "route": "route",
        "status": "status / 100" if raw else "status_class",
        "day": f"({bucket} / 86400) * 86400",
        "hour": f"({bucket} / 3600) * 3600",
        "minute": bucket,
    }[name]


def _shown(name: str, value: Any) -> Any:
    if name == "status":
        return f"{value}xx"
    if name in ("day", "hour", "minute"):
        return _iso(value)
    return value


def usage(connection: Reading, query: UsageQuery) -> dict[str, Any]:
    """
    The answer of C{/api/usage}: rows by the groups asked, and totals.
    """
    table, column, size = _source(connection, query)
    raw = size == 0
    start = query.start if raw else query.start - query.start % size
    end = query.end if raw else query.end + (-query.end % size)
    where = [f"{column} >= ?", f"{column} < ?"]
    params: list[Any] = [start, end]
    for name, value in (("variant", query.variant), ("client", query.client)):
        if value is not None:
            where.append(f"{name} = ?")
            params.append(value)
    groups = [_groupExpression(name, raw) for name in query.groupBy]
    sums = _RAW_SUMS if raw else _ROLLUP_SUMS
    sql = f"SELECT {', '.join([*groups, *sums])} FROM {table} WHERE {' AND '.join(where)}"
    if groups:
        positions = ", ".join(str(i + 1) for i in range(len(groups)))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
    rows, totals = [], dict.fromkeys(NUMBERS, 0)
    for found in connection.execute(sql, params):
        keys, numbers = found[: len(groups)], found[len(groups) :]
        if not groups and not numbers[0]:
            break  # no rows at all: SUM() gave NULLs
        row: dict[str, Any] = {
            name: _shown(name, value) for name, value in zip(query.groupBy, keys, strict=True)
        }
        for name, number in zip(NUMBERS, numbers, strict=True):
            row[name] = round(number or 0, 6) if name == "cost_usd" else int(number or 0)
            totals[name] += row[name]
        rows.append(row)
    totals["cost_usd"] = round(totals["cost_usd"], 6)
    return {
        "from": _iso(start),
        "to": _iso(end),
        "resolution": {0: "request", 60: "minute", 3600: "hour"}[size],
        "group_by": list(query.groupBy),
        "rows": rows,
        "totals": totals,
    }


#: The columns C{/api/requests} shows (the minute bucket is an index aid).
_SHOWN_COLUMNS = tuple(c for c in REQUEST_COLUMNS if c != "minute")


def requests(connection: Reading, query: RequestsQuery) -> dict[str, Any]:
    """
    The answer of C{/api/requests}: a page of rows, newest first, and the
    cursor of the next page (L{None} on the last).
    """
    where: list[str] = []
    params: list[Any] = []
    if query.requestId is not None:
        where.append("request_id = ?")
        params.append(query.requestId)
    else:
        where += ["started_at >= ?", "started_at < ?"]
        params += [query.start, query.end]
    for name, value in (("client", query.client), ("model", query.model), ("variant", query.variant)):
        if value is not None:
            where.append(f"{name} = ?")
            params.append(value)
    if query.status is not None:
        if query.status.endswith("xx"):
            where.append("status >= ? AND status < ?")
            params += [int(query.status[0]) * 100, int(query.status[0]) * 100 + 100]
        else:
            where.append("status = ?")
            params.append(int(query.status))
    if query.after is not None:
        where.append("(started_at < ? OR (started_at = ? AND request_id < ?))")
        params += [query.after[0], query.after[0], query.after[1]]
    sql = (
        f"SELECT {', '.join(_SHOWN_COLUMNS)} FROM requests WHERE {' AND '.join(where)} "
        f"ORDER BY started_at DESC, request_id DESC LIMIT {query.limit + 1}"
    )
    found = connection.execute(sql, params).fetchall()
    rows = [_requestRow(row) for row in found[: query.limit]]
    following = None
    if len(found) > query.limit:
        last = found[query.limit - 1]
        following = makeCursor(last[1], last[0])
    return {"rows": rows, "next": following}


def _requestRow(row: tuple[Any, ...]) -> dict[str, Any]:
    shown = dict(zip(_SHOWN_COLUMNS, row, strict=True))
    shown["started_at"] = _iso(shown["started_at"])
    shown["ended_at"] = _iso(shown["ended_at"])
    shown["stream"] = bool(shown["stream"])
    for name in ("duration_ms", "ttfb_ms", "queue_wait_ms"):
        if shown[name] is not None:
            shown[name] = round(shown[name], 1)
    shown["cost_usd"] = round(shown["cost_usd"], 6)
    return shown


def variants(connection: Reading) -> list[str]:
    """
    Every variant that wrote rows in the last 30 days.
    """
    rows = connection.execute(
        "SELECT DISTINCT variant FROM usage_hour WHERE bucket >= ? ORDER BY variant",
        (datetime.datetime.now(datetime.timezone.utc).timestamp() - 30 * 86400,),
    )
    return [row[0] for row in rows]


def series(
    connection: Reading, start: float, end: float, step: int, variant: str | None
) -> list[dict[str, Any]]:
    """
    The dashboard's points over [start, end), one per C{step} (60 or
    3600 seconds) and variant, from the rollups and the gauge samples.
    """
    table = "usage_minute" if step == 60 else "usage_hour"
    start -= start % step
    where = "bucket >= ? AND bucket < ?"
    params: list[Any] = [start, end]
    if variant is not None:
        where += " AND variant = ?"
        params.append(variant)
    sums = ", ".join(f"SUM({name})" for name in ROLLUP_SUMS)
    byPoint: dict[tuple[int, str], dict[int, list[float]]] = defaultdict(dict)
    for row in connection.execute(
        f"SELECT bucket, variant, status_class, {sums} FROM {table} WHERE {where} "
        "GROUP BY bucket, variant, status_class",
        params,
    ):
        byPoint[(row[0], row[1])][row[2]] = [float(value or 0) for value in row[3:]]
    gauges = _gauges(connection, where, params, step)
    for key in gauges:
        byPoint.setdefault(key, {})
    return [
        snapshot(bucket, name, step, byPoint[(bucket, name)], gauges.get((bucket, name)))
        for bucket, name in sorted(byPoint)
    ]


def _gauges(connection: Reading, where: str, params: list[Any], step: int) -> dict[tuple[int, str], Gauges]:
    """
    The gauges of each point: per minute as sampled; per hour the peak
    concurrency, the mean rate, the summed adjustments, the last quota.
    """
    samples: dict[tuple[int, str], list[Gauges]] = defaultdict(list)
    for row in connection.execute(
        "SELECT bucket, variant, concurrent_max, max_workers, rate_limit_rps, rate_limit_ceiling, "
        f"adj_increase, adj_decrease, quota FROM gauges_minute WHERE {where} ORDER BY bucket",
        params,
    ):
        samples[(row[0] - row[0] % step, row[1])].append(Gauges.fromRow(row[2:]))
    merged = {}
    for key, found in samples.items():
        merged[key] = Gauges(
            concurrent=max(g.concurrent for g in found),
            maxWorkers=max(g.maxWorkers for g in found),
            rateLimitRps=sum(g.rateLimitRps for g in found) / len(found),
            rateLimitCeiling=sum(g.rateLimitCeiling for g in found) / len(found),
            adjIncrease=sum(g.adjIncrease for g in found),
            adjDecrease=sum(g.adjDecrease for g in found),
            quota=found[-1].quota,
        )
    return merged
