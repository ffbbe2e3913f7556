"""
Tests for L{zaiproxy.relay.headers}.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from zaiproxy.dialects import Dialect
from zaiproxy.relay.headers import clientResponseHeaders, upstreamRequestHeaders


def claudeCodeHeaders() -> Headers:
    return Headers(
        {
            b"host": [b"proxy:8080"],
            b"authorization": [b"Bearer client-placeholder"],
            b"x-api-key": [b"client-key"],
            b"anthropic-version": [b"2023-06-01"],
            b"anthropic-beta": [b"claude-code-20250219,interleaved-thinking-2025-05-14"],
            b"user-agent": [b"claude-cli/2.1.69 (external, cli)"],
            b"x-app": [b"cli"],
            b"x-stainless-retry-count": [b"0"],
            b"x-claude-code-session-id": [b"5f0c"],
            b"content-type": [b"application/json"],
            b"content-length": [b"123"],
            b"accept-encoding": [b"gzip, br"],
            b"connection": [b"keep-alive, x-hop"],
            b"x-hop": [b"drop me"],
            b"keep-alive": [b"timeout=5"],
            b"te": [b"trailers"],
            b"proxy-authorization": [b"Basic Zm9v"],
            b"expect": [b"100-continue"],
            b"x-repeated": [b"one", b"two"],
        }
    )


def asDict(headers: Headers) -> dict[bytes, list[bytes]]:
    return {name.lower(): list(values) for name, values in headers.getAllRawHeaders()}


def test_anthropicRequest() -> None:
    """
    End-to-end headers pass unchanged, hop-by-hop ones and client
    credentials are dropped, and the key goes in x-api-key.
    """
    out = asDict(upstreamRequestHeaders(claudeCodeHeaders(), Dialect.anthropic, b"UPSTREAM"))
    assert out == {
        b"anthropic-version": [b"2023-06-01"],
        b"anthropic-beta": [b"claude-code-20250219,interleaved-thinking-2025-05-14"],
        b"user-agent": [b"claude-cli/2.1.69 (external, cli)"],
        b"x-app": [b"cli"],
        b"x-stainless-retry-count": [b"0"],
        b"x-claude-code-session-id": [b"5f0c"],
        b"content-type": [b"application/json"],
        b"x-repeated": [b"one", b"two"],
        b"accept-encoding": [b"identity"],
        b"x-api-key": [b"UPSTREAM"],
    }


def test_openaiRequest() -> None:
    """
    On OpenAI routes the key goes in Authorization: Bearer, and the client's
    x-api-key is gone too.
    """
    out = asDict(upstreamRequestHeaders(claudeCodeHeaders(), Dialect.openai, b"UPSTREAM"))
    assert out[b"authorization"] == [b"Bearer UPSTREAM"]
    assert b"x-api-key" not in out


def test_response() -> None:
    """
    Response headers lose hop-by-hop ones, Content-Length and an empty
    Content-Encoding; repeated headers (Set-Cookie) keep every value.
    """
    upstream = Headers(
        {
            b"content-type": [b"text/event-stream; charset=utf-8"],
            b"content-length": [b"99"],
            b"content-encoding": [b""],
            b"transfer-encoding": [b"chunked"],
            b"connection": [b"close, x-private"],
            b"x-private": [b"hop"],
            b"request-id": [b"req_1"],
            b"x-ratelimit-remaining-requests": [b"9"],
            b"set-cookie": [b"a=1", b"b=2"],
        }
    )
    out = dict(clientResponseHeaders(upstream))
    assert {k.lower(): v for k, v in out.items()} == {
        b"content-type": [b"text/event-stream; charset=utf-8"],
        b"request-id": [b"req_1"],
        b"x-ratelimit-remaining-requests": [b"9"],
        b"set-cookie": [b"a=1", b"b=2"],
    }


def test_responseKeepsRealContentEncoding() -> None:
    """
    A real Content-Encoding passes (the body is relayed as received).
    """
    out = dict(clientResponseHeaders(Headers({b"content-encoding": [b"gzip"]})))
    assert list(out.values()) == [[b"gzip"]]


def test_upstreamRequestIdDropped() -> None:
    """
    An upstream's own X-Zaiproxy-Request-Id (another zaiproxy in front of
    Z.AI) never replaces this proxy's: the client sees one id, ours.
    """
    upstream = Headers({b"X-Zaiproxy-Request-Id": [b"theirs"], b"X-Request-Id": [b"zai"]})
    assert dict(clientResponseHeaders(upstream)) == {b"X-Request-Id": [b"zai"]}
