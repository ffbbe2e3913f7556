"""
Tests for L{zaiproxy.dialects.zai_errors}: both envelopes, codes, classes, reset
times (naive stamps are Beijing time) and retry hints.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from zaiproxy.dialects.zai_errors import MAX_ERROR_BYTES, ZaiError, codeLabel, parseError


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@pytest.mark.parametrize(
    "body, code, cls",
    [
        ({"error": {"code": "1302", "message": "Rate limit reached for requests"}}, "1302", "concurrency"),
        ({"error": {"code": "1303", "message": "x"}}, "1303", "frequency"),
        ({"type": "error", "error": {"type": "1305", "message": "overloaded"}}, "1305", "frequency"),
        ({"type": "error", "error": {"type": "1308", "message": "x"}, "request_id": "r"}, "1308", "quota"),
        ({"error": {"code": "1310", "message": "x"}}, "1310", "quota"),
        ({"error": {"code": "1312", "message": "x"}}, "1312", "model_congestion"),
        ({"error": {"code": "1113", "message": "Insufficient balance"}}, "1113", "configuration"),
        ({"type": "error", "error": {"type": "1211", "message": "Unknown Model"}}, "1211", "configuration"),
        ({"type": "error", "error": {"type": "1261", "message": "Prompt too long"}}, "1261", "configuration"),
        ({"code": 1302, "msg": "top-level envelope"}, "1302", "concurrency"),
        ({"type": "error", "error": {"type": "rate_limit_error", "code": "1303"}}, "1303", "frequency"),
        ({"error": {"message": "1302: Rate limit reached"}}, "1302", "concurrency"),
        ({"error": {"message": "9999: not a known code"}}, None, "unknown"),
        ({"error": {"code": "9999", "message": "x"}}, "9999", "unknown"),
        ({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}, None, "unknown"),
        ({"error": {"code": "12345678901", "message": "x"}}, None, "unknown"),
        ({"error": {"code": True}}, None, "unknown"),
    ],
)
def test_codesAndClasses(body: object, code: str | None, cls: str) -> None:
    """
    The code is read from either envelope (error.code, error.type, top-level
    code, or a known code leading the message) and classed as the seed does.
    """
    error = parseError(json.dumps(body).encode())
    assert (error.code, error.cls) == (code, cls)


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1,2]", b'"string"', b'{"choices":[]}', b"\xff\xfe"],
)
def test_unreadable(body: bytes) -> None:
    """
    Anything that is not an error document is class unknown, never raises.
    """
    assert parseError(body) == ZaiError(None, "unknown")


def test_oversized() -> None:
    """
    Bodies over the budget are not parsed.
    """
    body = json.dumps({"error": {"code": "1302", "message": "x" * MAX_ERROR_BYTES}}).encode()
    assert parseError(body) == ZaiError(None, "unknown")


@pytest.mark.parametrize(
    "body, reset",
    [
        (
            {
                "error": {
                    "code": "1308",
                    "message": "Usage limit reached for 5 hour. Your limit will reset at 2025-12-15 02:34:52",
                }
            },
            "2025-12-15T02:34:52+08:00",
        ),
        (
            {
                "error": {
                    "code": "1310",
                    "message": "已达到 5 小时的使用上限。您的限额将在 2025-12-09 18:08:11 重置。",
                }
            },
            "2025-12-09T18:08:11+08:00",
        ),
        ({"error": {"code": "1308", "reset_time": "2026-09-06 00:00:00"}}, "2026-09-06T00:00:00+08:00"),
        ({"error": {"code": "1308", "nextResetTime": 1767225600000}}, "2026-01-01T00:00:00+00:00"),
        ({"error": {"code": "1308", "resetAt": 1767225600}}, "2026-01-01T00:00:00+00:00"),
        ({"error": {"code": "1308", "reset_at": "2026-01-01T00:00:00Z"}}, "2026-01-01T00:00:00+00:00"),
        ({"error": {"code": "1308", "reset_at": "2026-01-01T09:00:00+09:00"}}, "2026-01-01T00:00:00+00:00"),
    ],
)
def test_resetTime(body: object, reset: str) -> None:
    """
    Reset times from any key or the message text; naive stamps are UTC+8.
    """
    assert parseError(json.dumps(body, ensure_ascii=False).encode()).resetAt == epoch(reset)


@pytest.mark.parametrize(
    "value, expected",
    [(9, 9.0), ("2.5", 2.5), (0, None), (-1, None), ("x", None), (10**9, None), (float("nan"), None)],
)
def test_retryAfter(value: object, expected: float | None) -> None:
    """
    The body's retry_after, if it is a sane number of seconds.
    """
    body = {"error": {"code": "1303", "retry_after": value}}
    assert parseError(json.dumps(body).encode()).retryAfter == expected


def test_badStamps() -> None:
    """
    Impossible dates and out-of-range epochs are no reset time.
    """
    for value in ("2026-13-40 25:00:00", 12, "1800-01-01 00:00:00", 9e15):
        assert (
            parseError(json.dumps({"error": {"code": "1308", "reset_time": value}}).encode()).resetAt is None
        )


def test_codeLabel() -> None:
    """
    Metric labels for codes stay bounded.
    """
    assert [codeLabel(c) for c in ("1302", "1310", "424242", None)] == ["1302", "1310", "other", "none"]
    assert datetime.fromtimestamp(epoch("2026-01-01T00:00:00+00:00"), timezone.utc).year == 2026


def test_errorRequestId() -> None:
    """
    Z.AI's request_id of an error body, when there is one.
    """
    from zaiproxy.dialects.zai_errors import errorRequestId

    body = b'{"type":"error","error":{"type":"1308","message":"x"},"request_id":"2025120915530a15e2cf"}'
    assert errorRequestId(body) == "2025120915530a15e2cf"
    assert errorRequestId(b'{"error":{"code":"1302","message":"x"}}') is None
    assert errorRequestId(b"not json") is None
    assert errorRequestId(b"[]") is None
