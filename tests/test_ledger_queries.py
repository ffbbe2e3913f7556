"""
Tests for L{zaiproxy.ledger.queries}.
"""

from __future__ import annotations

import math

import pytest

from zaiproxy.ledger.queries import (
    DEFAULT_LIMIT,
    BadQuery,
    RequestsQuery,
    UsageQuery,
    makeCursor,
    parseRange,
    parseTime,
    readCursor,
    requestsQuery,
    usageQuery,
    variantOf,
)

#: 2026-12-01T10:00:00Z.
NOW = 1_796_119_200.0


def args(**values: str | list[str]) -> dict[bytes, list[bytes]]:
    """
    A query string as Twisted's C{request.args} holds it.
    """
    return {
        name.encode(): [v.encode() for v in ([value] if isinstance(value, str) else value)]
        for name, value in values.items()
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2026-12-01T10:00:00Z", 1_796_119_200.0),
        ("2026-12-01T10:00:00z", 1_796_119_200.0),
        ("2026-12-01T10:00:00+00:00", 1_796_119_200.0),
        ("2026-12-01T12:00:00+02:00", 1_796_119_200.0),
        ("2026-12-01T05:30:00-04:30", 1_796_119_200.0),
        ("2026-12-01T10:00:00", 1_796_119_200.0),
        ("2026-12-01T10:00:00.250Z", 1_796_119_200.25),
        ("2026-12-01", 1_796_083_200.0),
        ("1796119200", 1_796_119_200.0),
        ("1796119200.5", 1_796_119_200.5),
        ("0", 0.0),
    ],
)
def test_parseTime(text: str, seconds: float) -> None:
    """
    ISO 8601 with Z, an offset or no zone (UTC), or Unix seconds.
    """
    assert parseTime("from", text) == seconds


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "-5", "nan", "inf", "1e999", "12:00"])
def test_parseTimeRefused(text: str) -> None:
    """
    Anything else, and negative or infinite seconds, is refused naming the
    parameter.
    """
    with pytest.raises(BadQuery, match=rf"\Ato={text!r} is not a time"):
        parseTime("to", text)


def test_usageQueryDefaults() -> None:
    """
    Without parameters: the last 24 hours, no groups, every variant, JSON.
    """
    assert usageQuery({}, NOW) == UsageQuery(NOW - 86400, NOW, (), None, None, "json")
    assert usageQuery({}, NOW, client="alice").client == "alice"


def test_usageQueryEveryParameter() -> None:
    """
    Each parameter lands in its field; group names are kept once, in order.
    """
    found = usageQuery(
        args(
            **{
                "from": "2026-12-01T00:00:00Z",
                "to": "2026-12-01T12:00:00+02:00",
                "group_by": "model, client,model,,status",
                "variant": "canary",
                "format": "csv",
            }
        ),
        NOW,
    )
    assert found == UsageQuery(
        1_796_083_200.0, 1_796_119_200.0, ("model", "client", "status"), "canary", None, "csv"
    )


def test_spanBounds() -> None:
    """
    C{to} alone covers the day before it; C{from} alone runs to now.
    """
    onlyTo = usageQuery(args(to="1796000000"), NOW)
    assert (onlyTo.start, onlyTo.end) == (1_795_913_600.0, 1_796_000_000.0)
    onlyFrom = usageQuery(args(**{"from": "1796000000"}), NOW)
    assert (onlyFrom.start, onlyFrom.end) == (1_796_000_000.0, NOW)


@pytest.mark.parametrize(
    "span",
    [
        {"from": "2026-12-01T10:00:00Z", "to": "2026-12-01T10:00:00Z"},
        {"from": "2026-12-01T11:00:00Z", "to": "2026-12-01T10:00:00Z"},
        {"from": "2026-12-01T10:00:01Z"},
    ],
)
def test_fromNotBeforeTo(span: dict[str, str]) -> None:
    """
    C{from} at or after C{to} (or after now) is refused.
    """
    with pytest.raises(BadQuery, match=r"\Afrom must be before to\Z"):
        usageQuery(args(**span), NOW)
    with pytest.raises(BadQuery, match=r"\Afrom must be before to\Z"):
        requestsQuery(args(**span), NOW)


def test_unknownGroup() -> None:
    """
    An unknown C{group_by} name is refused, naming it and what is accepted.
    """
    with pytest.raises(BadQuery) as raised:
        usageQuery(args(group_by="client,week"), NOW)
    assert (
        str(raised.value) == "group_by='week' is not one of client, model, route, status, day, hour, minute"
    )


@pytest.mark.parametrize("name", ["from", "to", "group_by", "format", "variant"])
def test_usageDuplicateParameter(name: str) -> None:
    """
    A parameter given twice is refused, whichever it is.
    """
    with pytest.raises(BadQuery, match=rf"\A{name} is given 2 times; give it once\Z"):
        usageQuery(args(**{name: ["1796000000", "1796000001"]}), NOW)


@pytest.mark.parametrize(("given", "form"), [("json", "json"), ("csv", "csv"), ("", "json"), ("  ", "json")])
def test_format(given: str, form: str) -> None:
    """
    C{format} is JSON or CSV; empty means JSON.
    """
    assert usageQuery(args(format=given), NOW).format == form


@pytest.mark.parametrize("given", ["xml", "CSV", "jsonl"])
def test_formatRefused(given: str) -> None:
    """
    Any other C{format} is refused.
    """
    with pytest.raises(BadQuery, match=rf"\Aformat={given!r} is not json or csv\Z"):
        usageQuery(args(format=given), NOW)


@pytest.mark.parametrize(
    ("given", "variant"), [("all", None), ("", None), ("canary", "canary"), ("x" * 64, "x" * 64)]
)
def test_variant(given: str, variant: str | None) -> None:
    """
    C{variant=all} (or none) is every variant; a name is that one.
    """
    assert variantOf(args(variant=given)) == variant
    assert variantOf({}) is None


def test_variantTooLong() -> None:
    """
    A variant name longer than 64 characters is refused.
    """
    with pytest.raises(BadQuery, match=r"\Avariant is longer than 64 characters\Z"):
        variantOf(args(variant="x" * 65))


def test_notUTF8() -> None:
    """
    A parameter that is not UTF-8 is refused, naming it.
    """
    with pytest.raises(BadQuery, match=r"\Aclient is not UTF-8\Z"):
        requestsQuery({b"client": [b"\xff"]}, NOW)


def test_requestsQueryDefaults() -> None:
    """
    Without parameters: the last day, 50 rows, no filter, no cursor.
    """
    assert requestsQuery({}, NOW) == RequestsQuery(NOW - 86400, NOW, limit=DEFAULT_LIMIT)
    assert DEFAULT_LIMIT == 50


def test_requestsQueryEveryParameter() -> None:
    """
    Each parameter lands in its field; the cursor is read back.
    """
    cursor = makeCursor(1_796_000_030.0, "abc")
    found = requestsQuery(
        args(
            **{
                "from": "1796000000",
                "to": "2026-12-01T10:00:00Z",
                "client": "alice",
                "model": "glm-4.7",
                "status": "5xx",
                "limit": "2",
                "cursor": cursor,
                "variant": "canary",
            }
        ),
        NOW,
    )
    assert found == RequestsQuery(
        1_796_000_000.0,
        1_796_119_200.0,
        client="alice",
        model="glm-4.7",
        status="5xx",
        limit=2,
        after=(1_796_000_030.0, "abc"),
        variant="canary",
    )


def test_requestIdLookup() -> None:
    """
    C{request_id} asks for one row wherever it is in time, ignoring the
    other parameters; an id is cut to 64 characters.
    """
    assert requestsQuery(args(request_id="abc", status="bad", limit="0"), NOW) == RequestsQuery(
        0.0, math.inf, limit=1, requestId="abc"
    )
    assert requestsQuery(args(request_id="y" * 100), NOW).requestId == "y" * 64


@pytest.mark.parametrize("status", ["429", "200", "503", "1xx", "2xx", "4xx", "5xx"])
def test_status(status: str) -> None:
    """
    C{status} is an exact status or a class.
    """
    assert requestsQuery(args(status=status), NOW).status == status


@pytest.mark.parametrize("status", ["42", "4290", "6xx", "5XX", "xx", "abc", "5xxx", "-42"])
def test_statusRefused(status: str) -> None:
    """
    Anything else is refused, naming it.
    """
    with pytest.raises(BadQuery, match=rf"\Astatus={status!r} is not a status \(429\) or a class \(5xx\)\Z"):
        requestsQuery(args(status=status), NOW)


def test_statusOfNonASCIIDigitsRefused() -> None:
    """
    A status of superscript digits (which C{str.isdigit} accepts but
    C{int} refuses) is refused here, not left to fail the query later.
    """
    with pytest.raises(BadQuery):
        requestsQuery(args(status="\u00b2\u00b2\u00b2"), NOW)


@pytest.mark.parametrize(("given", "limit"), [("1", 1), ("50", 50), ("1000", 1000), ("0007", 7)])
def test_limit(given: str, limit: int) -> None:
    """
    C{limit} is a whole number from 1 to 1000.
    """
    assert requestsQuery(args(limit=given), NOW).limit == limit


@pytest.mark.parametrize("given", ["0", "1001", "-1", "2.5", "ten", "1e3"])
def test_limitRefused(given: str) -> None:
    """
    Any other C{limit} is refused, naming it and the bounds.
    """
    with pytest.raises(BadQuery, match=rf"\Alimit={given!r} is not a whole number from 1 to 1000\Z"):
        requestsQuery(args(limit=given), NOW)


def test_limitOfNonASCIIDigitsRefused() -> None:
    """
    A limit of superscript digits is a L{BadQuery} (a 400), not the
    C{ValueError} of C{int} (a 500: the API catches only L{BadQuery}).
    """
    with pytest.raises(BadQuery):
        requestsQuery(args(limit="\u00b2"), NOW)


@pytest.mark.parametrize(
    ("startedAt", "requestId"),
    [(1_796_000_030.0, "d"), (1_796_000_030.125, "0123456789abcdef"), (0.1, "with:colon"), (1e-7, "")],
)
def test_cursorRoundTrip(startedAt: float, requestId: str) -> None:
    """
    A cursor gives back exactly the row's start and id, and is URL-safe
    without padding.
    """
    cursor = makeCursor(startedAt, requestId)
    assert readCursor(cursor) == (startedAt, requestId)
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor


def test_cursorIsOpaque() -> None:
    """
    The cursor of a known row is this exact text.
    """
    assert makeCursor(1_796_000_030.0, "d") == "MTc5NjAwMDAzMC4wOmQ"


@pytest.mark.parametrize("cursor", ["!!!!", "abc", "YWJj", "____", "MTc5NjAwMDAzMC4w", "eDpk"])
def test_garbageCursor(cursor: str) -> None:
    """
    A cursor this API did not give out is refused (not base64, no colon,
    not a number before the colon).
    """
    with pytest.raises(BadQuery, match=r"\Acursor is not one this API gave out\Z"):
        readCursor(cursor)
    with pytest.raises(BadQuery, match=r"\Acursor is not one this API gave out\Z"):
        requestsQuery(args(cursor=cursor), NOW)


@pytest.mark.parametrize("name", ["client", "model", "status", "limit", "cursor", "request_id"])
def test_requestsDuplicateParameter(name: str) -> None:
    """
    A parameter of C{/api/requests} given twice is refused.
    """
    with pytest.raises(BadQuery, match=rf"\A{name} is given 2 times; give it once\Z"):
        requestsQuery(args(**{name: ["1", "2"]}), NOW)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, ("1h", 3600)),
        (args(range="5m"), ("5m", 300)),
        (args(range="15m"), ("15m", 900)),
        (args(range="6h"), ("6h", 21600)),
        (args(range="24h"), ("24h", 86400)),
        (args(range="7d"), ("7d", 604800)),
        (args(range="30d"), ("30d", 2_592_000)),
    ],
)
def test_parseRange(given: dict[bytes, list[bytes]], expected: tuple[str, int]) -> None:
    """
    C{range} names one of the dashboard's ranges; the default is an hour.
    """
    assert parseRange(given) == expected


def test_parseRangeDefault() -> None:
    """
    The caller's default applies without C{range}.
    """
    assert parseRange({}, default="24h") == ("24h", 86400)


@pytest.mark.parametrize("given", ["2h", "1d", "1H"])
def test_parseRangeRefused(given: str) -> None:
    """
    Any other range is refused, listing the ranges.
    """
    with pytest.raises(BadQuery) as raised:
        parseRange(args(range=given))
    assert str(raised.value) == f"range={given!r} is not one of 5m, 15m, 1h, 6h, 24h, 7d, 30d"
    with pytest.raises(BadQuery, match=r"\Arange is given 2 times; give it once\Z"):
        parseRange(args(range=["1h", "6h"]))
