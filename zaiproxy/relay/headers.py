# -*- test-case-name: tests.test_headers -*-
"""
Which headers cross the proxy, in each direction.

End-to-end headers pass unchanged (Z.AI checks that requests look like
Claude Code's: C{anthropic-*}, C{user-agent}, C{x-app}, C{x-stainless-*});
hop-by-hop ones stop here (RFC 9110 7.6.1), the client's credentials are
replaced by the upstream key, and nothing that describes a body the proxy
may change is copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from twisted.web.http_headers import Headers

from zaiproxy.dialects import Dialect

__all__ = ["HOP_BY_HOP", "REQUEST_ID_HEADER", "clientResponseHeaders", "upstreamRequestHeaders"]

HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ]
)

# Set by the proxy's own HTTP client, or meaningless once the body has been
# read: the client's Expect was answered here, and Accept-Encoding is forced
# to identity so the relay can read the stream it relays.
_REQUEST_DROPPED = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"accept-encoding",
    b"authorization",
    b"x-api-key",
}

#: The proxy's own request id header: the client sees ours, never an
#: upstream's (another zaiproxy in front of Z.AI, say).
REQUEST_ID_HEADER = b"x-zaiproxy-request-id"
_RESPONSE_DROPPED = HOP_BY_HOP | {b"content-length", REQUEST_ID_HEADER}


def _connectionTokens(headers: Headers) -> set[bytes]:
    """
    Header names listed in C{Connection}, which are hop-by-hop too.
    """
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def _endToEnd(
    headers: Headers, dropped: frozenset[bytes] | set[bytes]
) -> Iterator[tuple[bytes, list[bytes]]]:
    extra = _connectionTokens(headers)
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered in dropped or lowered in extra:
            continue
        yield name, list(values)


def upstreamRequestHeaders(incoming: Headers, dialect: Dialect, apiKey: bytes) -> Headers:
    """
    The headers to send upstream for a client request.

    The upstream key goes where each Z.AI endpoint reads it: C{x-api-key} on
    the Anthropic-compatible API, C{Authorization: Bearer} on the
    OpenAI-compatible one.
    """
    out = Headers()
    for name, values in _endToEnd(incoming, _REQUEST_DROPPED):
        out.setRawHeaders(name, values)
    out.setRawHeaders(b"accept-encoding", [b"identity"])
    if dialect is Dialect.openai:
        out.setRawHeaders(b"authorization", [b"Bearer " + apiKey])
    else:
        out.setRawHeaders(b"x-api-key", [apiKey])
    return out


def clientResponseHeaders(upstream: Headers) -> Iterable[tuple[bytes, list[bytes]]]:
    """
    The upstream response headers a client may see.

    C{Content-Length} is always dropped here (the relay sets it again when
    the body passes unchanged and its length is known), and so is an empty
    C{Content-Encoding}, which some HTTP stacks add and clients choke on.
    """
    for name, values in _endToEnd(upstream, _RESPONSE_DROPPED):
        if name.lower() == b"content-encoding":
            values = [v for v in values if v.strip()]
            if not values:
                continue
        yield name, values
