# -*- test-case-name: tests.test_retry -*-
"""
The retry contract: which failures are tried again before the first byte
reaches the client, and how long to wait; and the headers that tell a
client what kind of 429 it got.

Only what can help is retried: "slow down a little" (1303, 1305 and
unknown 429s) and "model busy" (1312) after a jittered backoff, "too many
at once" (1302) after a plain one, and connections that failed before any
answer. A quota that is gone for hours (1308, 1310) and configuration
errors (1113, 1211, 1261...) are never retried.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from zaiproxy.dialects.zai_errors import ZaiError

__all__ = [
    "NETWORK",
    "RETRYABLE_CLASSES",
    "backoff",
    "parseRetryAfter",
    "retryWait",
    "zaiHeaders",
]

#: The class name used for connection failures before an answer.
NETWORK = "network"

#: Classes of 429 that are retried.
RETRYABLE_CLASSES = frozenset(["frequency", "concurrency", "model_congestion", "unknown"])

_JITTERED = frozenset(["frequency", "model_congestion", "unknown", NETWORK])


def backoff(retry: int) -> float:
    """
    The base wait before retry number C{retry} (1-based): 1, 2, 4... s.
    """
    return float(2 ** min(max(retry - 1, 0), 5))


def retryWait(
    cls: str,
    retry: int,
    headerRetryAfter: float | None = None,
    bodyRetryAfter: float | None = None,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float | None:
    """
    Seconds to wait before retry number C{retry} after a failure of class
    C{cls}, or L{None} if it is not to be retried.

    The wait is the larger of the backoff (jittered into [base/2, base) for
    the rate and congestion classes, so clients do not come back in step)
    and whatever Z.AI asked for, in a header or in the body: one wait, not
    the Go zai-proxy's two in a row.
    """
    if cls != NETWORK and cls not in RETRYABLE_CLASSES:
        return None
    base = backoff(retry)
    wait = uniform(base / 2, base) if cls in _JITTERED else base
    for asked in (headerRetryAfter, bodyRetryAfter):
        if asked is not None and asked > wait:
            wait = asked
    return wait


def parseRetryAfter(value: bytes | None, now: float) -> float | None:
    """
    A C{Retry-After} value as seconds: delta-seconds or an HTTP date.
    """
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def _rfc3339(when: float) -> bytes:
    text = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z").encode("ascii")


def zaiHeaders(error: ZaiError, now: float, upstreamRetryAfter: bool) -> list[tuple[bytes, bytes]]:
    """
    The Go zai-proxy's headers on a final 429: C{X-Zai-Error-Class}, the code and
    the reset time when known, and C{Retry-After} (if Z.AI sent none) from
    the body's C{retry_after}, else the time until the reset.
    """
    headers = [(b"x-zai-error-class", error.cls.encode("ascii"))]
    if error.code is not None:
        headers.append((b"x-zai-error-code", error.code.encode("ascii")))
    if error.resetAt is not None:
        headers.append((b"x-zai-rate-limit-reset", _rfc3339(error.resetAt)))
    if not upstreamRetryAfter:
        seconds = error.retryAfter
        if seconds is None and error.resetAt is not None:
            seconds = error.resetAt - now
        if seconds is not None and seconds > 0:
            headers.append((b"retry-after", b"%d" % (math.ceil(seconds),)))
    return headers
