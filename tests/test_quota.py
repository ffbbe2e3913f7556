"""
Tests for L{zaiproxy.observe.quota}: the quota document as the seed read it, and
the observe-only poller against the fake's quota endpoint.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from zaiproxy.fake import FakeZai
from zaiproxy.fake.server import DEFAULT_QUOTA
from zaiproxy.fake.testing import startFake
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.quota import QuotaError, QuotaPoller, QuotaWindow, parseQuota

KEY = "quota-key.SECRET"


def document(*limits: object, **top: Any) -> bytes:
    return json.dumps(
        {"code": 200, "success": True, "data": {"level": "max", "limits": list(limits)}, **top}
    ).encode()


def test_parseDefault() -> None:
    """
    The current CREDIT_LIMIT shape: used over allowance, both windows in
    order, reset from epoch milliseconds, other types ignored.
    """
    sample = parseQuota(json.dumps(DEFAULT_QUOTA).encode(), 100.0)
    assert sample.planTier == "pro" and sample.takenAt == 100.0
    assert sample.windows == (
        QuotaWindow("five_hour", "CREDIT_LIMIT", 0.37, 1767229200.0),
        QuotaWindow("weekly", "CREDIT_LIMIT", 0.12, 1767744000.0),
    )


@pytest.mark.parametrize(
    "limit, fraction",
    [
        ({"type": "TOKENS_LIMIT", "unit": 3, "percentage": 42}, 0.42),
        ({"type": "CREDIT_LIMIT", "unit": 3, "usage": 0, "currentValue": 5, "percentage": 7}, 0.07),
        ({"type": "CREDIT_LIMIT", "unit": 3, "usage": 100, "currentValue": 150}, 1.0),
        ({"type": "CREDIT_LIMIT", "unit": 3, "usage": 100, "currentValue": -5}, 0.0),
    ],
)
def test_fractions(limit: dict[str, Any], fraction: float) -> None:
    """
    Percentages for the legacy type and as a fallback; clamped to [0, 1].
    """
    [window] = parseQuota(document(limit), 0).windows
    assert window.usedFraction == fraction


def test_skipped() -> None:
    """
    Unknown units and types, entries without a fraction, and duplicates of a
    window (the first wins) are left out.
    """
    sample = parseQuota(
        document(
            {"type": "CREDIT_LIMIT", "unit": 5, "usage": 10, "currentValue": 1},
            {"type": "TIME_LIMIT", "unit": 3, "percentage": 1},
            {"type": "TOKENS_LIMIT", "unit": 6},
            {"type": "TOKENS_LIMIT", "unit": 3, "percentage": 10},
            {"type": "TOKENS_LIMIT", "unit": 3, "percentage": 90},
            "garbage",
        ),
        0,
    )
    assert [(w.window, w.usedFraction) for w in sample.windows] == [("five_hour", 0.1)]


@pytest.mark.parametrize(
    "body, outcome",
    [
        (
            json.dumps(
                {"code": 401, "msg": "token expired or incorrect (acct:marker-7f3a9)", "success": False}
            ).encode(),
            "error",
        ),
        (json.dumps({"code": 500, "msg": "x"}).encode(), "error"),
        (json.dumps({"code": 200, "success": True, "data": {"limits": None}}).encode(), "malformed"),
        (json.dumps({"code": 200, "success": True}).encode(), "malformed"),
        (b'{"code": 200, "data": {"limits": [', "malformed"),
        (b"[]", "malformed"),
    ],
)
def test_failures(body: bytes, outcome: str) -> None:
    """
    A provider rejection is an error; anything else unexpected is
    malformed; the provider's message (which may name the account) is never
    in the reason.
    """
    with pytest.raises(QuotaError) as raised:
        parseQuota(body, 0)
    assert raised.value.outcome == outcome
    assert "marker-7f3a9" not in str(raised.value)


@pytest_twisted.async_yield_fixture
async def polled(reactor: Any) -> Any:
    fake = FakeZai(reactor, apiKey=KEY)
    running = await startFake(reactor, fake)
    pool = HTTPConnectionPool(reactor, persistent=False)
    metrics = Metrics("test", "0")
    poller = QuotaPoller(
        reactor,
        HTTPClient(Agent(reactor, pool=pool)),
        running.url(),
        KEY,
        interval=3600.0,
        timeout=5.0,
        staleAfter=0.5,
        maxBytes=65536,
        metrics=metrics,
    )
    yield fake, poller, metrics
    poller.stop()
    await pool.closeCachedConnections()
    await running.stop()


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"variant": "test", **labels})


@pytest_twisted.ensureDeferred
async def test_pollerSuccess(reactor: Any, polled: Any) -> None:
    """
    The first poll runs at start: the key goes raw in Authorization, the
    gauges and /health's section show the windows.
    """
    fake, poller, metrics = polled
    poller.start()
    await poller._polling
    [request] = fake.received
    assert request.uri == b"/api/monitor/usage/quota/limit"
    assert request.header(b"authorization") == [KEY.encode()]
    assert request.header(b"accept") == [b"application/json"]
    labels = {"window": "five_hour", "limit_type": "credit_limit"}
    assert value(metrics, "zai_proxy_quota_usage_ratio", **labels) == 0.37
    assert value(metrics, "zai_proxy_quota_remaining_ratio", **labels) == pytest.approx(0.63)
    assert value(metrics, "zai_proxy_quota_reset_time_seconds", **labels) == 1767229200.0
    assert value(metrics, "zai_proxy_quota_poll_total", result="success") == 1
    section = poller.snapshot()
    assert section["enabled"] and section["fresh"]
    assert section["last_outcome"] == "success" and section["plan_tier"] == "pro"
    assert section["windows"][0] == {
        "window": "five_hour",
        "limit_type": "CREDIT_LIMIT",
        "used_fraction": 0.37,
        "reset_at": "2026-01-01T01:00:00Z",
    }


@pytest_twisted.ensureDeferred
async def test_pollerKeepsLastGoodSample(reactor: Any, polled: Any) -> None:
    """
    Failures keep the last good sample; once it is older than
    QUOTA_STALE_AFTER it is stale, counted once per transition.
    """
    from twisted.internet import task

    fake, poller, metrics = polled
    await poller.poll()
    fake.quotaStatus = 503
    await poller.poll()
    assert poller.sample is not None and poller.lastOutcome == "error"
    assert value(metrics, "zai_proxy_quota_poll_total", result="stale") is None
    await task.deferLater(reactor, 0.6, lambda: None)
    await poller.poll()
    await poller.poll()
    assert value(metrics, "zai_proxy_quota_poll_total", result="stale") == 1
    assert not poller.snapshot()["fresh"]
    fake.quota = copy.deepcopy(DEFAULT_QUOTA)
    fake.quota["data"]["limits"] = None
    fake.quotaStatus = 200
    await poller.poll()
    assert poller.lastOutcome == "malformed"
    fake.quota = DEFAULT_QUOTA
    await poller.poll()
    assert poller.snapshot()["fresh"]
    assert value(metrics, "zai_proxy_quota_poll_total", result="error") == 3


@pytest_twisted.ensureDeferred
async def test_pollerLimitsTheAnswer(reactor: Any, polled: Any) -> None:
    """
    An answer over QUOTA_MAX_RESPONSE_BYTES is an error, not read whole.
    """
    _, poller, metrics = polled
    poller._maxBytes = 100
    await poller.poll()
    assert poller.lastOutcome == "error" and poller.sample is None
    assert value(metrics, "zai_proxy_quota_poll_total", result="stale") == 1
