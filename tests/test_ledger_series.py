"""
Tests for L{zaiproxy.ledger.series}.
"""

from __future__ import annotations

import pytest

from zaiproxy.ledger.rows import ROLLUP_SUMS
from zaiproxy.ledger.series import Gauges, percentile, snapshot


def counts(**buckets: float) -> list[float]:
    """
    Latency bucket counts: zero but for C{lat_N=count}.
    """
    return [buckets.get(f"lat_{i}", 0) for i in range(12)]


def sumsOf(**values: float) -> list[float]:
    """
    A status class's sums in L{ROLLUP_SUMS} order: zero but for C{values}.
    """
    assert set(values) <= set(ROLLUP_SUMS)
    return [values.get(name, 0) for name in ROLLUP_SUMS]


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        # Four in 0.1..0.25: rank 2 of 4 is half way through the bucket.
        ({"lat_1": 4}, 0.5, 0.175),
        ({"lat_1": 4}, 0.95, 0.1 + 0.15 * 3.8 / 4),
        # Two in 0..0.1, two in 0.1..0.25.
        ({"lat_0": 2, "lat_1": 2}, 0.5, 0.1),
        ({"lat_0": 2, "lat_1": 2}, 0.75, 0.175),
        ({"lat_0": 2, "lat_1": 2}, 0.25, 0.05),
        # Empty buckets in between are skipped.
        ({"lat_0": 1, "lat_5": 1}, 0.99, 2.5 + 2.5 * 0.98),
        ({"lat_3": 10}, 0.0, 0.5),
        ({"lat_3": 10}, 1.0, 1.0),
        # In the open bucket: the last finite bound.
        ({"lat_11": 3}, 0.5, 300.0),
        ({"lat_0": 1, "lat_11": 1}, 0.99, 300.0),
    ],
)
def test_percentile(buckets: dict[str, float], q: float, expected: float) -> None:
    """
    The quantile is interpolated within its bucket, as Prometheus's
    C{histogram_quantile} does.
    """
    assert percentile(counts(**buckets), q) == pytest.approx(expected)


def test_percentileOfNothing() -> None:
    """
    No requests, no quantile.
    """
    assert percentile(counts(), 0.5) is None


def test_gaugesFromRow() -> None:
    """
    A C{gauges_minute} row's columns after its key, with its quota JSON
    read; an empty quota is L{None}.
    """
    assert Gauges.fromRow((3, 10, 1.5, 4, 2, 1, '{"used": 5}')) == Gauges(3, 10, 1.5, 4.0, 2, 1, {"used": 5})
    assert Gauges.fromRow((0, 0, 0, 0, 0, 0, None)).quota is None
    assert Gauges.fromRow((0, 0, 0, 0, 0, 0, "")).quota is None


def test_snapshot() -> None:
    """
    A point of a known minute: counts by class, rates per second, error
    rate, percentiles in ms, token and cost totals, averages and gauges.
    """
    byClass = {
        2: sumsOf(
            requests=6,
            input_tokens=600,
            output_tokens=120,
            cache_read_tokens=30,
            cache_write_tokens=12,
            cost_input=0.5,
            cost_output=0.25,
            cost_cache_read=0.0625,
            cost_cache_write=0.125,
            bytes_in=6000,
            bytes_out=1200,
            retries=1,
            lat_1=4,
            lat_3=2,
        ),
        4: sumsOf(requests=3, errors=2, bytes_in=300, upstream_errors=1, rejections=1, lat_0=3),
        5: sumsOf(requests=1, errors=1, upstream_errors=2, retries=2, bytes_out=100, lat_11=1),
    }
    gauges = Gauges(3, 12, 1.23456, 4.0, 2, 1, {"5h": {"used": 10}})
    assert snapshot(1_795_999_980, "production", 60, byClass, gauges) == {
        "timestamp": 1_795_999_980_000,
        "variant": "production",
        "interval_seconds": 60,
        "requests_2xx": 6,
        "requests_4xx": 3,
        "requests_5xx": 1,
        "req_rate": 0.1667,
        "error_rate_pct": 30.0,
        # Latency counts: 3 in 0..0.1, 4 in 0.1..0.25, 2 in 0.5..1, 1 open.
        # p50: rank 5 is the 2nd of 4 in 0.1..0.25 -> 0.175 s.
        # p95: rank 9.5, half way into the open bucket -> 300 s.
        # p99: rank 9.9, the open bucket -> 300 s.
        "latency_p50": 175.0,
        "latency_p95": 300000.0,
        "latency_p99": 300000.0,
        "tokens_input": 600,
        "tokens_output": 120,
        "tokens_cache_read": 30,
        "tokens_cache_write": 12,
        "token_rate_in": 10.0,
        "token_rate_out": 2.0,
        "token_rate_cache_read": 0.5,
        "token_rate_cache_write": 0.2,
        "estimated_cost_usd_input": 0.5,
        "estimated_cost_usd_output": 0.25,
        "estimated_cost_usd_cache_read": 0.0625,
        "estimated_cost_usd_cache_write": 0.125,
        "upstream_errors": 3,
        "retry_attempts": 3,
        "rate_limit_rejections": 1,
        "request_size_avg": 630.0,
        "response_size_avg": 130.0,
        "status_code_rates": {"2xx": 0.1, "4xx": 0.05, "5xx": 0.0167},
        "concurrent_requests": 3,
        "max_workers": 12,
        "worker_utilization": 0.25,
        "rate_limit_rps": 1.235,
        "rate_limit_ceiling": 4.0,
        "rate_limit_adj_increase": 2,
        "rate_limit_adj_decrease": 1,
        "quota": {"5h": {"used": 10}},
    }


def test_snapshotOfNothing() -> None:
    """
    A point without requests or gauges: zero counts and rates, no
    percentiles, averages, class rates or gauges.
    """
    point = snapshot(60.5, "canary", 5, {}, None)
    assert point["timestamp"] == 60_500
    assert (point["requests_2xx"], point["requests_4xx"], point["requests_5xx"]) == (0, 0, 0)
    assert (point["req_rate"], point["error_rate_pct"], point["token_rate_in"]) == (0.0, 0.0, 0.0)
    assert (point["latency_p50"], point["latency_p95"], point["latency_p99"]) == (None, None, None)
    assert (point["request_size_avg"], point["response_size_avg"], point["status_code_rates"]) == (
        None,
        None,
        {},
    )
    assert [
        point[name] for name in ("concurrent_requests", "max_workers", "worker_utilization", "quota")
    ] == [
        None,
        None,
        None,
        None,
    ]


def test_snapshotInterval() -> None:
    """
    Rates are per second of the point's interval: the same sums give a
    twelfth of the rate over a minute that they give over five seconds.
    """
    byClass = {2: sumsOf(requests=12, input_tokens=600, lat_0=12)}
    live = snapshot(0, "v", 5, byClass, None)
    minute = snapshot(0, "v", 60, byClass, None)
    assert (live["req_rate"], live["token_rate_in"], live["status_code_rates"]) == (2.4, 120.0, {"2xx": 2.4})
    assert (minute["req_rate"], minute["token_rate_in"], minute["status_code_rates"]) == (
        0.2,
        10.0,
        {"2xx": 0.2},
    )
    assert live["interval_seconds"] == 5 and minute["interval_seconds"] == 60


def test_snapshotWithoutWorkers() -> None:
    """
    With no worker limit known, utilisation is L{None}, not a division by
    zero.
    """
    point = snapshot(0, "v", 60, {}, Gauges(concurrent=2))
    assert (point["concurrent_requests"], point["max_workers"], point["worker_utilization"]) == (2, 0, None)
