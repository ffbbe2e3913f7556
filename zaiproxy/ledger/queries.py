# -*- test-case-name: tests.test_ledger_queries -*-
"""
The questions the API asks the ledger, read from a request's query string
into frozen values, with a clear message for anything malformed.

Times are ISO 8601 (C{2026-12-01}, C{2026-12-01T10:00:00Z}, an offset) or
Unix seconds; a time without a zone is UTC.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import math
import re
from collections.abc import Mapping, Sequence

import attrs

__all__ = [
    "GROUPS",
    "RANGES",
    "BadQuery",
    "RequestsQuery",
    "UsageQuery",
    "makeCursor",
    "parseRange",
    "parseTime",
    "readCursor",
    "requestsQuery",
    "usageQuery",
    "variantOf",
]

#: What C{group_by} may name.
GROUPS = ("client", "model", "route", "status", "day", "hour", "minute")
#: The dashboard's ranges, in seconds.
RANGES = {
    "5m": 300,
    "15m": 900,
    "1h": 3600,
    "6h": 6 * 3600,
    "24h": 86400,
    "7d": 7 * 86400,
    "30d": 30 * 86400,
}
#: Without C{from}, a question covers the last day.
DEFAULT_SPAN = 86400.0
#: The most rows one page of C{/api/requests} holds.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50

_CLASS = re.compile(r"[1-5]xx\Z")
# ASCII only: str.isdigit() takes "²", which int() then refuses.
_CODE = re.compile(r"[1-5][0-9][0-9]\Z")
_DIGITS = re.compile(r"[0-9]{1,6}\Z")


class BadQuery(ValueError):
    """
    A query string the API cannot answer; the message says which parameter
    and what is accepted (it becomes a 400).
    """


Arguments = Mapping[bytes, Sequence[bytes]]


def _one(args: Arguments, name: str) -> str | None:
    values = args.get(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise BadQuery(f"{name} is given {len(values)} times; give it once")
    try:
        text = values[-1].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadQuery(f"{name} is not UTF-8") from None
    return text or None


def parseTime(name: str, value: str) -> float:
    """
    Unix seconds from ISO 8601 or a number of seconds.
    """
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise BadQuery(f"{name}={value!r} is not a time")
        return seconds
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadQuery(
            f"{name}={value!r} is not a time: give ISO 8601 (2026-12-01T10:00:00Z) or Unix seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _span(args: Arguments, now: float) -> tuple[float, float]:
    rawEnd, rawStart = _one(args, "to"), _one(args, "from")
    end = parseTime("to", rawEnd) if rawEnd is not None else now
    start = parseTime("from", rawStart) if rawStart is not None else end - DEFAULT_SPAN
    if start >= end:
        raise BadQuery("from must be before to")
    return start, end


def variantOf(args: Arguments) -> str | None:
    """
    C{variant=}: a name, or C{all} (the default) for every variant.
    """
    value = _one(args, "variant")
    if value is None or value == "all":
        return None
    if len(value) > 64:
        raise BadQuery("variant is longer than 64 characters")
    return value


@attrs.frozen
class UsageQuery:
    """
    C{/api/usage}: sums over [start, end), grouped.

    @ivar client: only this client's rows (C{/api/usage/me}).
    """

    start: float
    end: float
    groupBy: tuple[str, ...] = ()
    variant: str | None = None
    client: str | None = None
    format: str = "json"


def usageQuery(args: Arguments, now: float, client: str | None = None) -> UsageQuery:
    start, end = _span(args, now)
    groupBy: list[str] = []
    raw = _one(args, "group_by")
    for name in (raw or "").split(","):
        name = name.strip()
        if not name:
            continue
        if name not in GROUPS:
            raise BadQuery(f"group_by={name!r} is not one of {', '.join(GROUPS)}")
        if name not in groupBy:
            groupBy.append(name)
    form = _one(args, "format") or "json"
    if form not in ("json", "csv"):
        raise BadQuery(f"format={form!r} is not json or csv")
    return UsageQuery(start, end, tuple(groupBy), variantOf(args), client, form)


@attrs.frozen
class RequestsQuery:
    """
    C{/api/requests}: the newest rows first, a page at a time.

    @ivar status: an exact status (C{429}) or a class (C{5xx}).
    @ivar after: the cursor: the (start, request id) of the last row of
        the previous page.
    """

    start: float
    end: float
    client: str | None = None
    model: str | None = None
    status: str | None = None
    limit: int = DEFAULT_LIMIT
    after: tuple[float, str] | None = None
    variant: str | None = None
    requestId: str | None = None


def requestsQuery(args: Arguments, now: float) -> RequestsQuery:
    requestId = _one(args, "request_id")
    if requestId is not None:
        # One request by its id, wherever it is in time.
        return RequestsQuery(0.0, math.inf, limit=1, requestId=requestId[:64])
    start, end = _span(args, now)
    status = _one(args, "status")
    if status is not None and not (_CODE.match(status) or _CLASS.match(status)):
        raise BadQuery(f"status={status!r} is not a status (429) or a class (5xx)")
    rawLimit = _one(args, "limit")
    limit = DEFAULT_LIMIT
    if rawLimit is not None:
        if not _DIGITS.match(rawLimit) or not 1 <= int(rawLimit) <= MAX_LIMIT:
            raise BadQuery(f"limit={rawLimit!r} is not a whole number from 1 to {MAX_LIMIT}")
        limit = int(rawLimit)
    cursor = _one(args, "cursor")
    return RequestsQuery(
        start,
        end,
        client=_one(args, "client"),
        model=_one(args, "model"),
        status=status,
        limit=limit,
        after=None if cursor is None else readCursor(cursor),
        variant=variantOf(args),
    )


def makeCursor(startedAt: float, requestId: str) -> str:
    """
    The opaque C{cursor} that continues after a row.
    """
    return base64.urlsafe_b64encode(f"{startedAt!r}:{requestId}".encode()).decode().rstrip("=")


def readCursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        startedAt, requestId = text.split(":", 1)
        return float(startedAt), requestId
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadQuery("cursor is not one this API gave out") from None


def parseRange(args: Arguments, default: str = "1h") -> tuple[str, int]:
    """
    C{range=} of C{/api/metrics}: one of L{RANGES}.
    """
    name = _one(args, "range") or default
    if name not in RANGES:
        raise BadQuery(f"range={name!r} is not one of {', '.join(RANGES)}")
    return name, RANGES[name]
