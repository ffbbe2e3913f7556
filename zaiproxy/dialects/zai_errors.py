# -*- test-case-name: tests.test_zai_errors -*-
"""
Z.AI's error envelopes, read into (class, code, reset time, retry hint).

Z.AI answers 429 for five different reasons and says which only in the
body's business code; the Anthropic-compatible endpoint puts the code in
C{error.type}, the OpenAI one in C{error.code}, and either endpoint may use
the other's envelope, or report the error in-band in an SSE stream at HTTP
200. Reset stamps in messages are naive and in Beijing time (UTC+8).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

from zaiproxy.dialects.usage import upstreamId

__all__ = [
    "CLASSES",
    "MAX_ERROR_BYTES",
    "ZaiError",
    "codeLabel",
    "errorFromJSON",
    "errorRequestId",
    "parseError",
]

#: Error bodies larger than this are not parsed (the Go zai-proxy's budget).
MAX_ERROR_BYTES = 32 << 10

_CLASS_BY_CODE = {
    "1302": "concurrency",
    "1303": "frequency",
    "1305": "frequency",
    "1308": "quota",
    "1310": "quota",
    "1312": "model_congestion",
    # Configuration and account problems: retrying cannot help.
    "1000": "configuration",
    "1001": "configuration",
    "1002": "configuration",
    "1003": "configuration",
    "1004": "configuration",
    "1110": "configuration",
    "1111": "configuration",
    "1112": "configuration",
    "1113": "configuration",
    "1120": "configuration",
    "1121": "configuration",
    "1210": "configuration",
    "1211": "configuration",
    "1212": "configuration",
    "1213": "configuration",
    "1214": "configuration",
    "1215": "configuration",
    "1220": "configuration",
    "1221": "configuration",
    "1222": "configuration",
    "1261": "configuration",
    "1309": "configuration",
    "1311": "configuration",
    "1313": "configuration",
}

#: Every class name, for bounded metric labels.
CLASSES = ("concurrency", "frequency", "quota", "model_congestion", "configuration", "unknown")

_BEIJING = timezone(timedelta(hours=8))
_CODE = re.compile(r"\d{1,8}\Z")
_LEADING_CODE = re.compile(r"\s*(\d{4})\b")
_STAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})")
_RESET_KEYS = ("reset_time", "resetTime", "reset_at", "resetAt", "next_reset_time", "nextResetTime")
_MAX_RETRY_AFTER = 7 * 86400.0


@attrs.frozen
class ZaiError:
    """
    What an error body says.

    @ivar code: the business code (digits), if any.
    @ivar cls: C{concurrency}, C{frequency}, C{quota}, C{model_congestion},
        C{configuration} or C{unknown}.
    @ivar resetAt: when a quota resets (POSIX seconds), if stated.
    @ivar retryAfter: seconds to wait, if the body says.
    """

    code: str | None
    cls: str
    message: str = attrs.field(default="", repr=False)
    resetAt: float | None = None
    retryAfter: float | None = None


def codeLabel(code: str | None) -> str:
    """
    A bounded label for a code: known codes as themselves, else C{other}.
    """
    if code is None:
        return "none"
    return code if code in _CLASS_BY_CODE else "other"


def _codeOf(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value < 10**8:
        return str(value)
    if isinstance(value, str) and _CODE.match(value.strip()):
        return value.strip()
    return None


def _stamp(value: Any) -> float | None:
    """
    A reset time: epoch seconds or milliseconds, RFC 3339, or a naive
    stamp in Beijing time.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) or (
        isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip())
    ):
        number = float(value)
        if not math.isfinite(number):
            return None
        if number >= 1e12:
            number /= 1000.0
        return number if 1e9 <= number <= 2e10 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        match = _STAMP.search(text)
        if match is None:
            return None
        try:
            year, month, day, hour, minute, second = (int(g) for g in match.groups())
            parsed = datetime(year, month, day, hour, minute, second)
        except ValueError:
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_BEIJING)
    if not 2001 <= parsed.year <= 2600:
        return None
    return parsed.timestamp()


def _retryAfter(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > _MAX_RETRY_AFTER:
        return None
    return seconds


def errorFromJSON(document: Any) -> ZaiError | None:
    """
    Read an already-parsed error document; L{None} if it is not one.

    Keys are looked up in the nested C{error} object first, then at the top
    level (C{{"code":1302,"msg":...}}).
    """
    if not isinstance(document, dict):
        return None
    nested = document.get("error")
    places = [nested, document] if isinstance(nested, dict) else [document]
    if not isinstance(nested, dict) and "code" not in document and "msg" not in document:
        return None

    def look(*keys: str) -> Any:
        for place in places:
            for key in keys:
                if key in place and place[key] is not None:
                    return place[key]
        return None

    message = look("message", "msg")
    message = message if isinstance(message, str) else ""
    code = _codeOf(look("code")) or _codeOf(nested.get("type") if isinstance(nested, dict) else None)
    if code is None:
        leading = _LEADING_CODE.match(message)
        if leading and leading.group(1) in _CLASS_BY_CODE:
            code = leading.group(1)
    resetAt = None
    for key in _RESET_KEYS:
        resetAt = _stamp(look(key))
        if resetAt is not None:
            break
    if resetAt is None and message:
        resetAt = _stamp(message) if _STAMP.search(message) else None
    return ZaiError(
        code=code,
        cls=_CLASS_BY_CODE.get(code or "", "unknown"),
        message=message,
        resetAt=resetAt,
        retryAfter=_retryAfter(look("retry_after", "retryAfter")),
    )


def parseError(body: bytes) -> ZaiError:
    """
    Read an error body; anything unreadable is class C{unknown}.
    """
    if len(body) > MAX_ERROR_BYTES:
        return ZaiError(None, "unknown")
    try:
        document = json.loads(body)
    except ValueError:
        return ZaiError(None, "unknown")
    return errorFromJSON(document) or ZaiError(None, "unknown")


def errorRequestId(body: bytes) -> str | None:
    """
    Z.AI's C{request_id} in an error body, when it sends one (its
    Anthropic-compatible endpoint does; its OpenAI one does not).
    """
    if len(body) > MAX_ERROR_BYTES:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return upstreamId(document) if isinstance(document, dict) else None
