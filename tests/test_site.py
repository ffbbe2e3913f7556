"""
Tests for L{zaiproxy.front.site}: what happens to bad or slow requests before
any resource sees them, over real sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from support.clients import connect
from support.stack import Stack
from twisted.internet import task

from zaiproxy.fake.testing import RawClient


async def ended(client: RawClient) -> None:
    await client.closed.addErrback(lambda failure: None)


def error(client: RawClient) -> tuple[int, dict[str, Any]]:
    response = client.response()
    assert response.header(b"content-type") == [b"application/json"]
    assert response.header(b"connection") == [b"close"]
    return response.status, json.loads(response.body)


@pytest_twisted.ensureDeferred
async def test_contentLengthOverLimit(reactor: Any, makeStack: Any) -> None:
    """
    A Content-Length over MAX_REQUEST_BYTES is refused with 413 as soon as
    the headers arrive: the body is never read, nothing goes upstream.
    """
    stack = await makeStack(MAX_REQUEST_BYTES="1KiB")
    client = await connect(
        stack,
        reactor,
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"Content-Length: 1025\r\n\r\n",
    )
    await ended(client)
    status, body = error(client)
    assert status == 413
    assert body["error"] == {
        "type": "request_too_large",
        "message": "request body of 1025 bytes exceeds the limit of 1024 bytes",
    }
    assert stack.fake.received == []
    assert (
        stack.sample(
            "zai_proxy_requests_total",
            method="POST",
            path="/v1/messages",
            status_code="413",
            variant="production",
        )
        == 1
    )


@pytest_twisted.ensureDeferred
async def test_expectContinueOverLimit(reactor: Any, makeStack: Any) -> None:
    """
    A client that asks "100 Continue" for an oversized body gets 413
    instead of an invitation to send it.
    """
    stack = await makeStack(MAX_REQUEST_BYTES="1KiB")
    client = await connect(
        stack,
        reactor,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5000\r\n\r\n",
    )
    await ended(client)
    assert not client.raw.startswith(b"HTTP/1.1 100")
    status, body = error(client)
    assert status == 413
    assert body["error"]["type"] == "invalid_request_error"  # OpenAI envelope


@pytest_twisted.ensureDeferred
async def test_chunkedUploadOverLimit(reactor: Any, makeStack: Any) -> None:
    """
    A chunked upload is counted as it arrives and refused once it passes the
    limit, without being read to the end.
    """
    stack = await makeStack(MAX_REQUEST_BYTES="1KiB")
    client = await connect(
        stack,
        reactor,
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n",
    )
    await task.deferLater(reactor, 0.1, lambda: None)
    assert client.raw == b""
    client.connection.write(b"200\r\n" + b"y" * 512 + b"\r\n" + b"1\r\nz\r\n")
    await ended(client)
    status, body = error(client)
    assert status == 413
    assert body["error"]["message"] == "request body exceeds the limit of 1024 bytes"
    assert stack.fake.received == []


@pytest_twisted.ensureDeferred
async def test_chunkedUploadWithinLimit(reactor: Any, stack: Stack) -> None:
    """
    A chunked upload under the limit is forwarded with a Content-Length.
    """
    body = b'{"model":"glm-4.7","stream":false,"messages":[{"role":"user","content":"hi"}]}'
    client = await connect(
        stack,
        reactor,
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    )
    await ended(client)
    assert client.response().status == 200
    record = stack.fake.received[0]
    assert record.body == body
    assert record.header(b"content-length") == [b"%d" % len(body)]
    assert record.header(b"transfer-encoding") == []


@pytest_twisted.ensureDeferred
async def test_slowHeaders(reactor: Any, makeStack: Any) -> None:
    """
    A client that trickles its headers is cut off after
    CLIENT_HEADER_TIMEOUT with 408, however often it sends a byte.
    """
    stack = await makeStack(CLIENT_HEADER_TIMEOUT="0.5")
    client = await connect(stack, reactor, b"POST /v1/messages HTTP/1.1\r\n")
    started = reactor.seconds()
    for _ in range(20):
        if client.closed.called:
            break
        client.connection.write(b"X-Slow: a\r\n")
        await task.deferLater(reactor, 0.1, lambda: None)
    await ended(client)
    assert 0.45 < reactor.seconds() - started < 1.5
    status, body = error(client)
    assert status == 408
    assert body["error"]["message"] == "request headers were not received in time"


@pytest.mark.parametrize(
    "headers, message",
    [
        (b"X-Big: " + b"a" * 17000 + b"\r\n", "a request header line exceeds 16384 bytes"),
        (
            b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20)),
            "request headers exceed 16384 bytes",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_headersTooLarge(reactor: Any, stack: Stack, headers: bytes, message: str) -> None:
    """
    Headers over twisted.web's 16 KiB limits (one line, or all of them):
    431 in JSON rather than a silent close.
    """
    client = await connect(stack, reactor, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    await ended(client)
    status, body = error(client)
    assert status == 431
    assert body["error"]["message"] == message
    assert stack.fake.received == []


@pytest_twisted.ensureDeferred
async def test_contentLengthAndChunked(reactor: Any, stack: Stack) -> None:
    """
    Transfer-Encoding together with Content-Length (a request-smuggling
    shape) is refused with 400 and never forwarded.
    """
    client = await connect(
        stack,
        reactor,
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    await ended(client)
    status, body = error(client)
    assert status == 400
    assert body["error"]["message"] == "malformed HTTP request"
    assert stack.fake.received == []


@pytest_twisted.ensureDeferred
async def test_malformedRequestLine(reactor: Any, stack: Stack) -> None:
    """
    Garbage instead of a request line: 400 in JSON.
    """
    client = await connect(stack, reactor, b"\x00\xffnot http\r\n\r\n")
    await ended(client)
    status, _ = error(client)
    assert status == 400


@pytest_twisted.ensureDeferred
async def test_keepAliveAfterLocalResponse(reactor: Any, stack: Stack) -> None:
    """
    Two requests on one connection: the header deadline restarts for the
    second, and both are answered.
    """
    client = await connect(
        stack,
        reactor,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    await ended(client)
    assert client.raw.count(b"HTTP/1.1 200") == 2


@pytest_twisted.ensureDeferred
async def test_connectionCloseAmongTokens(reactor: Any, stack: Stack) -> None:
    """
    C{Connection: close, x-other} closes the connection after the answer
    (Twisted alone would keep it open, splitting the header on spaces).
    """
    client = await connect(
        stack, reactor, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close, x-other\r\n\r\n"
    )
    started = reactor.seconds()
    await ended(client)
    assert reactor.seconds() - started < 1
    assert client.response().header(b"connection") == [b"close"]


def test_inFlight() -> None:
    """
    InFlight fires every waiter once the last item leaves (a cancelled
    waiter is forgotten), at once when empty, and iterates over a copy so
    the drain can cut items while it walks them.
    """
    from twisted.internet.defer import CancelledError

    from zaiproxy.front.site import InFlight

    tracked: InFlight[str] = InFlight()
    assert tracked.whenEmpty().called
    tracked.add("a")
    tracked.add("b")
    first, gone, second = tracked.whenEmpty(), tracked.whenEmpty(), tracked.whenEmpty()
    gone.cancel()
    gone.addErrback(lambda f: f.trap(CancelledError))
    for item in tracked:
        tracked.discard(item)
        assert not first.called or not tracked
    assert len(tracked) == 0 and first.called and second.called
    assert tracked.whenEmpty().called
