"""
The dashboard's live points, on a clock: what a window sums, when points
are made, who hears of them, and the minute's gauges handed to the ledger.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.task import Clock

from zaiproxy.dashboard.live import GaugeReading, LiveWindow, Sampler, quotaBlock
from zaiproxy.dialects import Dialect
from zaiproxy.dialects.usage import Usage
from zaiproxy.ledger.rows import GaugeSample
from zaiproxy.limits.limiter import RateLimiter
from zaiproxy.observe.quota import QuotaPoller, QuotaSample, QuotaWindow
from zaiproxy.observe.record import Billed, Record


def record(status: int = 200, duration: float = 0.3, output: int = 20) -> Record:
    billed = Billed(
        Usage(10, output), "reported", "glm-4.7", None, "off_peak", {"input": 1e-5, "output": 4e-5}
    )
    return Record(
        method="POST",
        route="/v1/messages",
        status=status,
        startedAt=100.0,
        duration=duration,
        dialect=Dialect.anthropic,
        billed=billed if status == 200 else None,
        requestBytes=50,
        responseBytes=150,
    )


class Gauges:
    def __init__(self) -> None:
        self.concurrent = 1
        self.quota: dict[str, Any] | None = None

    def __call__(self) -> GaugeReading:
        return (self.concurrent, 10, 8.0, 12.0, self.quota)


def sampler(
    clock: Clock, window: LiveWindow, kept: list[GaugeSample] | None = None
) -> tuple[Sampler, Gauges]:
    gauges = Gauges()
    made = Sampler(clock, 5.0, "production", window, gauges, kept.append if kept is not None else None)
    return made, gauges


def test_pointPerInterval() -> None:
    """
    Every interval, the records that finished in it become one point with
    the Go dashboard's fields, and the next window starts empty.
    """
    clock = Clock()
    clock.advance(1_000_000)
    window = LiveWindow()
    live, _ = sampler(clock, window)
    heard: list[dict[str, Any]] = []
    stop = live.subscribe(heard.append)
    live.start()
    window.add(record())
    window.add(record(duration=1.7))
    window.add(record(status=502))
    window.adjusted("increase")
    clock.advance(5)
    [point] = heard
    assert point["timestamp"] == 1_000_005_000
    assert (point["requests_2xx"], point["requests_5xx"], point["req_rate"]) == (2, 1, 0.6)
    assert point["error_rate_pct"] == 33.33
    assert (point["tokens_input"], point["tokens_output"], point["token_rate_out"]) == (20, 40, 8.0)
    assert point["estimated_cost_usd_output"] == 8e-05
    assert (point["concurrent_requests"], point["max_workers"], point["worker_utilization"]) == (1, 10, 0.1)
    assert (point["rate_limit_rps"], point["rate_limit_ceiling"], point["rate_limit_adj_increase"]) == (
        8.0,
        12.0,
        1,
    )
    assert (point["request_size_avg"], point["response_size_avg"]) == (50.0, 150.0)
    assert point["status_code_rates"] == {"2xx": 0.4, "5xx": 0.2}
    clock.advance(5)
    assert heard[1]["requests_2xx"] == 0 and heard[1]["latency_p50"] is None
    stop()
    clock.advance(5)
    assert len(heard) == 2
    assert [p["timestamp"] for p in live.since(1_000_010)] == [1_000_010_000, 1_000_015_000]
    live.stop()
    assert clock.getDelayedCalls() == []


def test_minuteGaugesGoToTheLedger() -> None:
    """
    Each minute's peak concurrency, last rate and summed adjustments go to
    the ledger once the next minute begins, and at stop.
    """
    clock = Clock()
    clock.advance(6000)  # a minute's start
    window = LiveWindow()
    kept: list[GaugeSample] = []
    live, gauges = sampler(clock, window, kept)
    live.start()
    for concurrent in (3, 7, 2):
        gauges.concurrent = concurrent
        window.adjusted("decrease")
        clock.advance(5)
    assert kept == []
    clock.advance(60)
    [first] = kept
    assert (first.bucket, first.concurrentMax, first.adjDecrease, first.maxWorkers) == (6000, 7, 3, 10)
    live.stop()
    assert [sample.bucket for sample in kept] == [6000, 6060]


def test_quotaBlock() -> None:
    """
    The Go dashboard's quota field: each window's use and reset, the age of
    the sample, the hold.
    """
    poller = cast(QuotaPoller, type("Poller", (), {})())
    poller.sample = QuotaSample(
        takenAt=900.0,
        windows=(QuotaWindow("five_hour", "tokens_limit", 0.25, 5000.0),),
        planTier=None,
    )
    limiter = cast(RateLimiter, type("Limiter", (), {})())
    limiter.quotaHeld = lambda: None  # type: ignore[method-assign]
    limiter.settings = type("S", (), {"quotaHold": True})()
    block = quotaBlock(poller, limiter, 1000.0)
    assert block == {
        "five_hour": {
            "limit_type": "tokens_limit",
            "usage_ratio": 0.25,
            "remaining_ratio": 0.75,
            "reset_time_unix": 5000.0,
        },
        "weekly": None,
        "sample_age_seconds": 100.0,
        "gate_open": True,
        "enforcement": True,
    }
    assert json.loads(json.dumps(block)) == block
    assert quotaBlock(None, limiter, 1000.0) is None
