# -*- test-case-name: tests.test_ledger_series -*-
"""
The dashboard's data points ("snapshots"), with the Go dashboard's field
names, made from one interval's sums by status class and the gauges.

The live 5-second points and the long ranges' points read from the
rollups go through the same function, so a panel means the same thing at
every range. Unlike the Go dashboard, every count is what happened in the
point's interval (not a counter since the process started), and latency
and error rate are the interval's, not the process lifetime's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from zaiproxy.ledger.rows import LATENCY_BOUNDS, ROLLUP_SUMS

__all__ = ["Gauges", "percentile", "snapshot"]

_AT = {name: i for i, name in enumerate(ROLLUP_SUMS)}
_LATENCY = [_AT[f"lat_{i}"] for i in range(len(LATENCY_BOUNDS))]


@attrs.frozen
class Gauges:
    """
    The live gauges for a point: concurrency, the limiter, the quota.
    """

    concurrent: int = 0
    maxWorkers: int = 0
    rateLimitRps: float = 0.0
    rateLimitCeiling: float = 0.0
    adjIncrease: int = 0
    adjDecrease: int = 0
    quota: Mapping[str, Any] | None = None

    @classmethod
    def fromRow(cls, row: Sequence[Any]) -> Gauges:
        """
        From C{gauges_minute}'s columns after its key.
        """
        quota = json.loads(row[6]) if row[6] else None
        return cls(int(row[0]), int(row[1]), float(row[2]), float(row[3]), int(row[4]), int(row[5]), quota)


def percentile(counts: Sequence[float], q: float) -> float | None:
    """
    The C{q} quantile (seconds) of durations counted in the rollups'
    latency buckets, interpolated within its bucket as Prometheus's
    C{histogram_quantile} does; L{None} with no requests.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    lower = 0.0
    for count, upper in zip(counts, LATENCY_BOUNDS, strict=True):
        if count and seen + count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return lower


def _summed(byClass: Mapping[int, Sequence[float]]) -> list[float]:
    total = [0.0] * len(ROLLUP_SUMS)
    for sums in byClass.values():
        for i, value in enumerate(sums):
            total[i] += value
    return total


def snapshot(
    timestamp: float,
    variant: str,
    interval: float,
    byClass: Mapping[int, Sequence[float]],
    gauges: Gauges | None,
) -> dict[str, Any]:
    """
    One point: C{byClass} maps a status class (2 for 2xx) to that class's
    sums in L{ROLLUP_SUMS} order.
    """
    total = _summed(byClass)
    requests = total[_AT["requests"]]
    latency = [total[i] for i in _LATENCY]

    def ms(q: float) -> float | None:
        value = percentile(latency, q)
        return None if value is None else round(value * 1000, 1)

    def perSecond(name: str) -> float:
        return round(total[_AT[name]] / interval, 4)

    point: dict[str, Any] = {
        "timestamp": int(timestamp * 1000),
        "variant": variant,
        "interval_seconds": interval,
        "requests_2xx": int(byClass.get(2, _NONE)[0]),
        "requests_4xx": int(byClass.get(4, _NONE)[0]),
        "requests_5xx": int(byClass.get(5, _NONE)[0]),
        "req_rate": perSecond("requests"),
        "error_rate_pct": round(100 * total[_AT["errors"]] / requests, 2) if requests else 0.0,
        "latency_p50": ms(0.5),
        "latency_p95": ms(0.95),
        "latency_p99": ms(0.99),
        "tokens_input": int(total[_AT["input_tokens"]]),
        "tokens_output": int(total[_AT["output_tokens"]]),
        "tokens_cache_read": int(total[_AT["cache_read_tokens"]]),
        "tokens_cache_write": int(total[_AT["cache_write_tokens"]]),
        "token_rate_in": perSecond("input_tokens"),
        "token_rate_out": perSecond("output_tokens"),
        "token_rate_cache_read": perSecond("cache_read_tokens"),
        "token_rate_cache_write": perSecond("cache_write_tokens"),
        "estimated_cost_usd_input": round(total[_AT["cost_input"]], 6),
        "estimated_cost_usd_output": round(total[_AT["cost_output"]], 6),
        "estimated_cost_usd_cache_read": round(total[_AT["cost_cache_read"]], 6),
        "estimated_cost_usd_cache_write": round(total[_AT["cost_cache_write"]], 6),
        "upstream_errors": int(total[_AT["upstream_errors"]]),
        "retry_attempts": int(total[_AT["retries"]]),
        "rate_limit_rejections": int(total[_AT["rejections"]]),
        "request_size_avg": round(total[_AT["bytes_in"]] / requests, 1) if requests else None,
        "response_size_avg": round(total[_AT["bytes_out"]] / requests, 1) if requests else None,
        "status_code_rates": {
            f"{cls}xx": round(sums[0] / interval, 4) for cls, sums in sorted(byClass.items()) if sums[0]
        },
    }
    point.update(_gaugeFields(gauges))
    return point


_NONE = (0.0,)


def _gaugeFields(gauges: Gauges | None) -> dict[str, Any]:
    if gauges is None:
        return {
            "concurrent_requests": None,
            "max_workers": None,
            "worker_utilization": None,
            "rate_limit_rps": None,
            "rate_limit_ceiling": None,
            "rate_limit_adj_increase": None,
            "rate_limit_adj_decrease": None,
            "quota": None,
        }
    return {
        "concurrent_requests": gauges.concurrent,
        "max_workers": gauges.maxWorkers,
        "worker_utilization": round(gauges.concurrent / gauges.maxWorkers, 4) if gauges.maxWorkers else None,
        "rate_limit_rps": round(gauges.rateLimitRps, 3),
        "rate_limit_ceiling": round(gauges.rateLimitCeiling, 3),
        "rate_limit_adj_increase": gauges.adjIncrease,
        "rate_limit_adj_decrease": gauges.adjDecrease,
        "quota": dict(gauges.quota) if gauges.quota is not None else None,
    }
