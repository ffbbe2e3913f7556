"""
Tests for L{zaiproxy.front.resource}: each routing row, the header rules and key
injection, end to end over real sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from support.stack import UPSTREAM_KEY, Stack

from zaiproxy.fake.testing import rawRequest

CLIENT_HEADERS = [
    (b"content-type", b"application/json"),
    (b"anthropic-version", b"2023-06-01"),
    (b"anthropic-beta", b"claude-code-20250219,interleaved-thinking-2025-05-14"),
    (b"user-agent", b"claude-cli/2.1.69 (external, cli)"),
    (b"x-app", b"cli"),
    (b"x-stainless-lang", b"js"),
    (b"x-stainless-retry-count", b"0"),
    (b"x-claude-code-session-id", b"6f1c2d"),
    (b"authorization", b"Bearer proxy-handles-auth"),
    (b"x-api-key", b"client-supplied"),
    (b"keep-alive", b"timeout=5"),
    (b"te", b"trailers"),
    (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
    (b"x-hop-private", b"hop"),
    (b"connection", b"close, x-hop-private"),
    (b"accept-encoding", b"gzip, br"),
]
BODY = b'{"model":"glm-4.7","max_tokens":64,"stream":false,"messages":[{"role":"user","content":"hi"}]}'


async def ended(client: Any) -> None:
    await client.closed.addErrback(lambda failure: None)


@pytest.mark.parametrize(
    "method, path, upstreamURI",
    [
        (b"POST", b"/v1/messages?beta=true", b"/api/anthropic/v1/messages?beta=true"),
        (
            b"POST",
            b"/v1/messages/count_tokens?beta=true",
            b"/api/anthropic/v1/messages/count_tokens?beta=true",
        ),
        (b"GET", b"/v1/models?limit=1000", b"/api/anthropic/v1/models?limit=1000"),
        (b"POST", b"/v1/chat/completions", b"/api/coding/paas/v4/chat/completions"),
        (b"POST", b"/chat/completions", b"/api/coding/paas/v4/chat/completions"),
        (b"POST", b"/api/anthropic/v1/messages", b"/api/anthropic/v1/messages"),
        (b"POST", b"/api/paas/v4/chat/completions?x=1", b"/api/paas/v4/chat/completions?x=1"),
        (b"POST", b"/api/coding/paas/v4/chat/completions", b"/api/coding/paas/v4/chat/completions"),
        (b"GET", b"/api/coding/paas/v4/models", b"/api/coding/paas/v4/models"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_routes(reactor: Any, stack: Stack, method: bytes, path: bytes, upstreamURI: bytes) -> None:
    """
    Every forwarding row of the routing table reaches the upstream path it
    names, query kept, Z.AI's prefix never doubled; the fake answers 200.
    """
    body = BODY if method == b"POST" else b""
    client = await rawRequest(
        reactor, stack.port, method, path, [(b"content-type", b"application/json")], body
    )
    await ended(client)
    assert client.response().status == 200
    [record] = stack.fake.received
    assert record.uri == upstreamURI
    assert record.method == method
    assert record.body == body


@pytest_twisted.ensureDeferred
async def test_anthropicHeaders(reactor: Any, stack: Stack) -> None:
    """
    On Anthropic routes: end-to-end headers arrive unchanged, hop-by-hop
    ones and the client's credentials do not, and the upstream key is
    injected as x-api-key.
    """
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", CLIENT_HEADERS, BODY)
    await ended(client)
    assert client.response().status == 200
    [record] = stack.fake.received
    for name, value in CLIENT_HEADERS[:8]:
        assert record.header(name) == [value], name
    for name in (b"keep-alive", b"te", b"proxy-authorization", b"x-hop-private", b"authorization"):
        assert record.header(name) == [], name
    assert record.header(b"x-api-key") == [UPSTREAM_KEY.encode()]
    assert record.header(b"accept-encoding") == [b"identity"]
    assert record.header(b"host") == [b"127.0.0.1:%d" % stack.upstream.port]
    assert UPSTREAM_KEY.encode() not in client.raw


@pytest_twisted.ensureDeferred
async def test_openaiHeaders(reactor: Any, stack: Stack) -> None:
    """
    On OpenAI routes the key is injected as a Bearer token and the client's
    x-api-key is removed.
    """
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/chat/completions", CLIENT_HEADERS, BODY)
    await ended(client)
    assert client.response().status == 200
    [record] = stack.fake.received
    assert record.header(b"authorization") == [b"Bearer " + UPSTREAM_KEY.encode()]
    assert record.header(b"x-api-key") == []


@pytest_twisted.ensureDeferred
async def test_wrongUpstreamKeyIsUpstreamsAnswer(reactor: Any, makeStack: Any) -> None:
    """
    With a key the upstream rejects, the client sees Z.AI's 401 and never
    the key itself.
    """
    stack = await makeStack(fakeKey="another-key")
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", CLIENT_HEADERS, BODY)
    await ended(client)
    assert client.response().status == 401
    assert UPSTREAM_KEY.encode() not in client.raw


@pytest_twisted.ensureDeferred
async def test_cookiesNeverReplayed(reactor: Any, makeStack: Any) -> None:
    """
    An upstream Set-Cookie goes to the client that got it, but the proxy
    keeps no cookie jar: later requests from other clients carry no cookie
    upstream.
    """
    stack = await makeStack("cookie=true")
    for n in range(3):
        client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", [], BODY)
        await ended(client)
        assert client.response().header(b"set-cookie") == [b"zfake=%d; Path=/" % (n + 1,)]
    assert [r.header(b"cookie") for r in stack.fake.received] == [[], [], []]


@pytest_twisted.ensureDeferred
async def test_responseHeaders(reactor: Any, makeStack: Any) -> None:
    """
    The client gets the upstream's end-to-end response headers and no
    hop-by-hop or stale ones.
    """
    stack = await makeStack("events=2")
    client = await rawRequest(
        reactor, stack.port, b"POST", b"/v1/messages", [], BODY.replace(b'"stream":false', b'"stream":true')
    )
    await ended(client)
    response = client.response()
    assert response.header(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert response.header(b"cache-control") == [b"no-cache"]
    assert response.header(b"content-length") == []
    assert response.header(b"transfer-encoding") == [b"chunked"]
    assert response.header(b"content-encoding") == []


@pytest.mark.parametrize(
    "target, status, headers, envelope",
    [
        (b"/nowhere", 404, [(b"anthropic-version", b"2023-06-01")], "anthropic"),
        (b"/api/event_logging/batch", 404, [], "anthropic"),
        (b"/v1/chat/completions/../../metrics", 400, [], "openai"),
        (b"/v1/%2e%2e/%2e%2e/metrics", 400, [], "anthropic"),
        (b"http://evil.example/v1/messages", 400, [], "anthropic"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusals(
    reactor: Any, stack: Stack, target: bytes, status: int, headers: Any, envelope: str
) -> None:
    """
    Unknown paths get a local 404, traversal and absolute-URI targets a 400:
    in the client's dialect, and nothing reaches the upstream.
    """
    client = await rawRequest(reactor, stack.port, b"POST", target, headers, BODY)
    await ended(client)
    response = client.response()
    assert response.status == status
    body = json.loads(response.body)
    if envelope == "anthropic":
        assert body["type"] == "error"
    else:
        assert set(body) == {"error"} and body["error"]["param"] is None
    assert stack.fake.received == []


@pytest.mark.parametrize(
    "target, shown",
    [
        (b"/nowhere/x.php?key=secret-in-query", "/nowhere/x.php"),
        (b"/" + b"a" * 300, "/" + "a" * 196 + "..."),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusedPathInAccessLog(
    reactor: Any, stack: Stack, logEvents: list[dict[str, Any]], target: bytes, shown: str
) -> None:
    """
    A 404's access-log line says what was asked for: the path without its
    query string (it can hold a key), bytes outside printable ASCII
    percent-encoded, cut at 200 characters.
    """
    from twisted.logger import formatEvent

    client = await rawRequest(reactor, stack.port, b"GET", target, [])
    await ended(client)
    assert client.response().status == 404
    [line] = [formatEvent(e) for e in logEvents if e.get("log_namespace") == "zaiproxy.access"]
    assert line.startswith("GET unknown 404 ")
    [requestId] = client.response().header(b"x-zaiproxy-request-id")
    assert line.endswith(f" model=- path={shown} id={requestId.decode()}")
    assert len(shown) <= 200
    assert "secret" not in repr(logEvents)


@pytest_twisted.ensureDeferred
async def test_headRequest(reactor: Any, stack: Stack) -> None:
    """
    HEAD is forwarded as HEAD and answered without a body.
    """
    client = await rawRequest(reactor, stack.port, b"HEAD", b"/v1/models", [])
    await ended(client)
    assert client.raw.startswith(b"HTTP/1.1 ")
    assert stack.fake.received[0].method == b"HEAD"
    assert client.raw.endswith(b"\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_drainingClosesKeepAlive(reactor: Any, stack: Stack) -> None:
    """
    While draining, answers carry Connection: close so keep-alive clients
    reconnect elsewhere.
    """
    stack.proxy.draining = True
    client = await rawRequest(reactor, stack.port, b"GET", b"/v1/models", [])
    await ended(client)
    response = client.response()
    assert response.status == 200
    assert response.header(b"connection") == [b"close"]
