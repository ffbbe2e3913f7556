"""
Tests for L{zaiproxy.limits.retry}: the seed's retry and error-class contract.
"""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from zaiproxy.dialects.zai_errors import ZaiError
from zaiproxy.limits.retry import NETWORK, backoff, parseRetryAfter, retryWait, zaiHeaders


def low(a: float, b: float) -> float:
    """
    A jitter that picks the bottom of its range (the seed's tests forced
    jitter to a bound, too).
    """
    return a


def test_backoff() -> None:
    """
    1, 2, 4... seconds, capped.
    """
    assert [backoff(n) for n in (1, 2, 3, 4, 10)] == [1, 2, 4, 8, 32]


@pytest.mark.parametrize(
    "cls, waits",
    [
        ("frequency", [0.5, 1.0]),  # 1303, 1305: jittered [base/2, base)
        ("model_congestion", [0.5, 1.0]),  # 1312
        ("unknown", [0.5, 1.0]),  # an unknown 429
        ("concurrency", [1.0, 2.0]),  # 1302: plain backoff
        (NETWORK, [0.5, 1.0]),  # connection failed before an answer
        ("quota", [None, None]),  # 1308, 1310: never
        ("configuration", [None, None]),  # 1113, 1211, 1261: never
    ],
)
def test_contract(cls: str, waits: list[float | None]) -> None:
    """
    Each class's waits for the first two retries, with jitter at its lower
    bound (the seed's handler tests: 1303 gives [500ms, 1s], 1302 [1s, 2s]).
    """
    assert [retryWait(cls, n, uniform=low) for n in (1, 2)] == waits


def test_jitterRange() -> None:
    """
    Jitter stays in [base/2, base).
    """
    for n in (1, 2, 3):
        for _ in range(50):
            wait = retryWait("frequency", n)
            assert wait is not None and backoff(n) / 2 <= wait <= backoff(n)


def test_askedWaitWins() -> None:
    """
    A Retry-After header or a body retry_after longer than the backoff is
    the wait: a single wait (the seed waited for both in a row).
    """
    assert retryWait("frequency", 1, headerRetryAfter=7, uniform=low) == 7
    assert retryWait("frequency", 1, headerRetryAfter=7, bodyRetryAfter=9, uniform=low) == 9
    assert retryWait("concurrency", 3, headerRetryAfter=1, uniform=low) == 4


def test_parseRetryAfter() -> None:
    """
    Delta seconds and HTTP dates (the seed ignored dates).
    """
    now = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    assert parseRetryAfter(b"12", now) == 12
    assert (
        parseRetryAfter(
            format_datetime(datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc), usegmt=True).encode(), now
        )
        == 30
    )
    assert parseRetryAfter(b"Wed, 31 Dec 2025 23:59:00 GMT", now) == 0
    assert parseRetryAfter(b"soon", now) is None
    assert parseRetryAfter(None, now) is None


def test_zaiHeaders() -> None:
    """
    A final 429 tells the client its class, code and reset, and when to
    retry (unless Z.AI already said).
    """
    now = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    quota = ZaiError("1308", "quota", resetAt=now + 3599.2)
    assert zaiHeaders(quota, now, upstreamRetryAfter=False) == [
        (b"x-zai-error-class", b"quota"),
        (b"x-zai-error-code", b"1308"),
        (b"x-zai-rate-limit-reset", b"2026-01-01T00:59:59Z"),
        (b"retry-after", b"3600"),
    ]
    assert (b"retry-after", b"3600") not in zaiHeaders(quota, now, upstreamRetryAfter=True)
    assert zaiHeaders(ZaiError("1303", "frequency", retryAfter=2.5), now, False) == [
        (b"x-zai-error-class", b"frequency"),
        (b"x-zai-error-code", b"1303"),
        (b"retry-after", b"3"),
    ]
    assert zaiHeaders(ZaiError(None, "unknown"), now, False) == [(b"x-zai-error-class", b"unknown")]
