"""
The fault matrix: every way a request can go wrong, run against the real
proxy and the real fake Z.AI over loopback sockets, each with the exact
outcome the README promises (status, error JSON in the route's dialect,
how a stream ends, what became of the upstream call, which metrics moved).

Each row names a client behaviour (how the request is sent, or abandoned)
and an L{Outcome}; L{test_fault} runs the row and asserts every field.
Helpers for sending and reading raw HTTP come from the relay's and site's
test modules, so the matrix uses the same means as the piecemeal tests.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import pytest
import pytest_twisted
from support.clients import ANTHROPIC, OPENAI, chatBody, connect, ended, events, messagesBody, settled, sleep
from support.stack import UPSTREAM_KEY, Stack
from twisted.internet import tcp

from zaiproxy.fake import FakeZai, parseScenario
from zaiproxy.fake.testing import FrozenClock, RawClient, rawRequest, startFake

#: Sends one request (or misbehaves) and returns the client once its
#: connection has closed.
Behaviour = Callable[[Stack, Any], Awaitable[RawClient]]
#: Extra assertions of one row, after the common ones.
Check = Callable[[Stack, Any, RawClient], Awaitable[None]]


def anthropicError(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def openaiError(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


@attrs.frozen
class Outcome:
    """
    What one fault must produce.

    @ivar status: the status line the client reads, or L{None} when the
        client left before any answer.
    @ivar recorded: C{status_code} of the one C{zai_proxy_requests_total}
        sample (499 when the client left).
    @ivar route: the C{path} label of that sample.
    @ivar body: the exact JSON body (an error made by the proxy, or Z.AI's
        passed through), or L{None} when the body is a stream.
    @ivar streamError: the final SSE event of a broken stream (whole
        events before it), or L{None}.
    @ivar upstream: C{"never"} (the fake never saw the request),
        C{"completed"} or C{"disconnected"} (the upstream call was cut).
    @ivar upstreamErrors: every C{zai_proxy_upstream_errors_total} sample,
        by C{error_type}; any other is a failure.
    @ivar method: the C{method} label.
    @ivar contentType: the C{Content-Type} of C{body}.
    """

    status: int | None
    recorded: int
    route: str
    body: Any = None
    streamError: bytes | None = None
    upstream: str = "never"
    upstreamErrors: Mapping[str, float] = attrs.field(factory=dict)
    method: str = "POST"
    contentType: bytes = b"application/json"


@attrs.frozen
class Fault:
    """
    One row: a client behaviour against a stack set up with C{scenario} and
    C{env}, and its expected L{Outcome}; C{frozenFake} freezes the fake's
    clock so its answer can be compared byte for byte with a twin's.
    """

    name: str
    behaviour: Behaviour
    outcome: Outcome
    scenario: str = ""
    env: Mapping[str, str] = attrs.field(factory=dict)
    check: Check | None = None
    frozenFake: bool = False


# -- client behaviours ----------------------------------------------------------


def post(path: bytes, body: bytes, headers: Any = ANTHROPIC) -> Behaviour:
    """
    A well-formed request, read to the end.
    """

    async def behave(stack: Stack, reactor: Any) -> RawClient:
        client = await rawRequest(reactor, stack.port, b"POST", path, headers, body)
        await ended(client)
        return client

    return behave


def raw(data: bytes) -> Behaviour:
    """
    Bytes no client library would send, on a raw socket.
    """

    async def behave(stack: Stack, reactor: Any) -> RawClient:
        client = await connect(stack, reactor, data)
        await ended(client)
        return client

    return behave


def _refusedPort() -> int:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port: int = closed.getsockname()[1]
    closed.close()
    return port


async def leaveBeforeHeaders(stack: Stack, reactor: Any) -> RawClient:
    """
    Leave while the upstream is still thinking; it must be cut within 100 ms.
    """
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", ANTHROPIC, messagesBody())
    record = await stack.fake.whenReceived(1)
    await sleep(reactor, 0.1)
    left = reactor.seconds()
    client.connection.abortConnection()
    await ended(client)
    assert await record.done == "disconnected"
    assert record.disconnectedAt - left < 0.1
    return client


async def leaveMidStream(stack: Stack, reactor: Any) -> RawClient:
    """
    Leave after two deltas of a paced stream; the upstream must be cut
    within 100 ms.
    """
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", ANTHROPIC, messagesBody())
    await client.when(lambda c: c.raw.count(b"event: content_block_delta") >= 2)
    record = stack.fake.received[0]
    left = reactor.seconds()
    client.connection.abortConnection()
    await ended(client)
    assert await record.done == "disconnected"
    assert record.disconnectedAt - left < 0.1
    return client


async def trickleHeaders(stack: Stack, reactor: Any) -> RawClient:
    """
    Send a header line every 100 ms, never finishing the headers.
    """
    client = await connect(stack, reactor, b"POST /v1/messages HTTP/1.1\r\nanthropic-version: 2023-06-01\r\n")
    started = reactor.seconds()
    for _ in range(30):
        if client.closed.called:
            break
        client.connection.write(b"X-Slow: a\r\n")
        await sleep(reactor, 0.1)
    await ended(client)
    assert 0.45 < reactor.seconds() - started < 1.5
    return client


async def chunkedOverLimit(stack: Stack, reactor: Any) -> RawClient:
    """
    A chunked upload that passes MAX_REQUEST_BYTES (1 KiB) in its second
    chunk; the answer comes before the upload ends.
    """
    client = await connect(
        stack,
        reactor,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n",
    )
    await sleep(reactor, 0.1)
    assert client.raw == b""
    client.connection.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
    await ended(client)
    return client


#: The size of the slow reader's stream: 10,000 deltas of 1,000 characters.
BIG_SCENARIO = "events=10000 deltaSize=1000"


async def slowReader(stack: Stack, reactor: Any) -> RawClient:
    """
    Read a 10 MB stream slowly: stop reading after the first megabyte (the
    proxy must stop reading from the upstream, which must stop sending, and
    the proxy must not buffer), then read with a pause after every read.
    """
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", ANTHROPIC, messagesBody())
    # A small receive buffer, so the kernel does not read on the client's
    # behalf for megabytes.
    client.connection.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    await client.when(lambda c: c.received > 1_000_000)
    # The proxy's socket to the fake, under the relay's body transport.
    (relay,) = stack.proxy.inFlight
    # deliverBody's TransportProxyProducer, wrapping the socket.
    proxyProducer: Any = relay.transport
    upstream = proxyProducer._producer
    assert isinstance(upstream, tcp.Client) and upstream.getPeer().port == stack.upstream.port
    client.connection.pauseProducing()
    record = stack.fake.received[0]
    stalled = await settled(reactor, lambda: record.bytesSent)
    await sleep(reactor, 0.3)
    assert record.bytesSent == stalled, "the upstream kept sending to a client that does not read"
    assert not record.done.called
    # The proxy stopped reading from the upstream socket...
    assert upstream not in reactor.getReaders()
    # ...and holds little for the client: its transport paused the relay
    # once the write buffer passed 64 KiB; at most one more upstream read
    # (64 KiB, plus a held partial event) landed after that.
    (channel,) = stack.proxy.site.channels
    transport = channel.transport
    # None first: mypy-zope finds isinstance on "ITransport | None" never true.
    assert transport is not None
    assert isinstance(transport, tcp.Server)
    assert transport.producerPaused
    assert len(transport.dataBuffer) + transport._tempDataLen < transport.bufferSize + 2 * 65536

    def readSlowly(c: RawClient) -> None:
        c.connection.pauseProducing()
        reactor.callLater(0.002, c.connection.resumeProducing)

    client.onRead = readSlowly
    client.connection.resumeProducing()
    await ended(client)
    return client


async def checkSlowReader(stack: Stack, reactor: Any, client: RawClient) -> None:
    """
    Every byte arrived intact: the same digest as the answer fetched straight
    from a twin fake.
    """
    twin = await startFake(
        reactor, FakeZai(FrozenClock(reactor), apiKey=UPSTREAM_KEY, defaults=parseScenario(BIG_SCENARIO))
    )
    try:
        straight = await rawRequest(
            reactor,
            twin.port,
            b"POST",
            b"/api/anthropic/v1/messages",
            [*ANTHROPIC[:2], (b"x-api-key", UPSTREAM_KEY.encode())],
            messagesBody(),
        )
        await ended(straight)
    finally:
        await twin.stop()
    body, expected = client.response().body, straight.response().body
    assert len(body) == len(expected) == stack.fake.received[0].bytesSent
    assert len(body) > 10_000_000
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert client.raw.endswith(b"0\r\n\r\n")
    assert events(body)[-1][0] == "message_stop"
    assert stack.sample(
        "zai_proxy_response_size_bytes_sum",
        method="POST",
        path="/v1/messages",
        status_code="200",
        variant="production",
    ) == len(body)


async def checkPartialUsage(stack: Stack, reactor: Any, client: RawClient) -> None:
    """
    A stream the client left counts what was relayed as partial usage.
    """
    assert stack.sample("zai_proxy_token_usage_source_total", source="partial", variant="production") == 1


async def checkBodyForwardedVerbatim(stack: Stack, reactor: Any, client: RawClient) -> None:
    """
    The bad body went upstream byte for byte (the proxy does not judge
    JSON; Z.AI does), with the upstream key in place of the client's.
    """
    (record,) = stack.fake.received
    assert record.body in (MALFORMED, INVALID_UTF8)
    assert record.header(b"x-api-key") == [UPSTREAM_KEY.encode()]


# -- the matrix --------------------------------------------------------------------

MALFORMED = b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}'
INVALID_UTF8 = b'{"model":"glm-4.7","messages":[{"role":"user","content":"\xff\xfe caf\xc3"}]}'
NOT_JSON_OBJECT = "Invalid API parameter: the body is not a JSON object"
ZAI_JSON = b"application/json; charset=UTF-8"
REFUSED = "the upstream refused the connection"
BROKE = "the upstream connection broke mid-response"
TRUNCATED = "the upstream ended the stream before the answer was complete"

FAULTS = [
    Fault(
        "upstream refused",
        post(b"/v1/chat/completions", chatBody(), OPENAI),
        Outcome(
            502,
            502,
            "/v1/chat/completions",
            body=openaiError("server_error", REFUSED),
            upstreamErrors={"upstream_connection": 1},
        ),
        env={"ZAI_OPENAI_TARGET_URL": "http://127.0.0.1:{refused}/api/coding/paas/v4", "MAX_RETRIES": "0"},
    ),
    Fault(
        "reset before headers",
        post(b"/v1/messages", messagesBody()),
        Outcome(
            502,
            502,
            "/v1/messages",
            body=anthropicError("api_error", "the upstream closed the connection before responding"),
            upstream="disconnected",
            upstreamErrors={"upstream_connection": 1},
        ),
        scenario="mode=reset",
        env={"MAX_RETRIES": "0"},
    ),
    Fault(
        "reset mid-stream, anthropic",
        post(b"/v1/messages", messagesBody()),
        Outcome(
            200,
            200,
            "/v1/messages",
            streamError=b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"'
            + BROKE.encode()
            + b'"}}\n\n',
            upstream="disconnected",
            upstreamErrors={"read_error": 1},
        ),
        scenario="mode=reset-mid after=3 split=true",
    ),
    Fault(
        "reset mid-stream, openai",
        post(b"/v1/chat/completions", chatBody(), OPENAI),
        Outcome(
            200,
            200,
            "/v1/chat/completions",
            streamError=b'data: {"error":{"message":"'
            + BROKE.encode()
            + b'","type":"server_error","param":null,"code":null}}\n\n',
            upstream="disconnected",
            upstreamErrors={"read_error": 1},
        ),
        scenario="mode=reset-mid after=3 split=true",
    ),
    Fault(
        "truncated stream, anthropic",
        post(b"/v1/messages", messagesBody()),
        Outcome(
            200,
            200,
            "/v1/messages",
            streamError=b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"'
            + TRUNCATED.encode()
            + b'"}}\n\n',
            upstream="completed",
            upstreamErrors={"truncated": 1},
        ),
        scenario="mode=truncate after=3 split=true",
        check=checkPartialUsage,
    ),
    Fault(
        "truncated stream, openai",
        post(b"/v1/chat/completions", chatBody(), OPENAI),
        Outcome(
            200,
            200,
            "/v1/chat/completions",
            streamError=b'data: {"error":{"message":"'
            + TRUNCATED.encode()
            + b'","type":"server_error","param":null,"code":null}}\n\n',
            upstream="completed",
            upstreamErrors={"truncated": 1},
        ),
        scenario="mode=truncate after=3 split=true",
        check=checkPartialUsage,
    ),
    Fault(
        "reset mid-body (JSON answer)",
        post(b"/v1/messages", messagesBody(stream=False)),
        Outcome(
            502,
            502,
            "/v1/messages",
            body=anthropicError("api_error", BROKE),
            upstream="disconnected",
            upstreamErrors={"read_error": 1},
        ),
        scenario="mode=reset-mid",
    ),
    Fault(
        "hang before headers",
        post(b"/v1/chat/completions", chatBody(), OPENAI),
        Outcome(
            504,
            504,
            "/v1/chat/completions",
            body=openaiError("server_error", "the upstream sent no response within 0.3 s"),
            upstream="disconnected",
            upstreamErrors={"first_byte_timeout": 1},
        ),
        scenario="mode=hang",
        env={"UPSTREAM_FIRST_BYTE_TIMEOUT": "0.3"},
    ),
    Fault(
        "stall mid-stream",
        post(b"/v1/messages", messagesBody()),
        Outcome(
            200,
            200,
            "/v1/messages",
            streamError=b'event: error\ndata: {"type":"error","error":{"type":"api_error",'
            b'"message":"the upstream sent nothing for 0.3 s"}}\n\n',
            upstream="disconnected",
            upstreamErrors={"idle_timeout": 1},
        ),
        scenario="mode=stall-mid after=2",
        env={"UPSTREAM_IDLE_TIMEOUT": "0.3"},
    ),
    Fault(
        "10 MB stream to a slow reader",
        slowReader,
        Outcome(200, 200, "/v1/messages", upstream="completed"),
        scenario=BIG_SCENARIO,
        check=checkSlowReader,
        frozenFake=True,
    ),
    Fault(
        "client gone before headers",
        leaveBeforeHeaders,
        Outcome(None, 499, "/v1/messages", upstream="disconnected"),
        scenario="mode=hang",
    ),
    Fault(
        "client gone during the stream",
        leaveMidStream,
        Outcome(200, 499, "/v1/messages", upstream="disconnected"),
        scenario="events=100 interval=0.05",
        check=checkPartialUsage,
    ),
    Fault(
        "malformed JSON",
        post(b"/v1/messages", MALFORMED),
        Outcome(
            400,
            400,
            "/v1/messages",
            body=anthropicError("1210", NOT_JSON_OBJECT),
            contentType=ZAI_JSON,
            upstream="completed",
            upstreamErrors={"400": 1},
        ),
        check=checkBodyForwardedVerbatim,
    ),
    Fault(
        "invalid UTF-8 in the body",
        post(b"/v1/messages", INVALID_UTF8),
        Outcome(
            400,
            400,
            "/v1/messages",
            body=anthropicError("1210", NOT_JSON_OBJECT),
            contentType=ZAI_JSON,
            upstream="completed",
            upstreamErrors={"400": 1},
        ),
        check=checkBodyForwardedVerbatim,
    ),
    Fault(
        "invalid UTF-8 in the path",
        raw(b"POST /v1/mess\xc3ages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"),
        # twisted.web refuses the request line itself, before its method and
        # path are known.
        Outcome(
            400,
            400,
            "unknown",
            method="OTHER",
            body=anthropicError("invalid_request_error", "malformed HTTP request"),
        ),
    ),
    Fault(
        "body over the limit (Content-Length)",
        raw(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
            b"anthropic-version: 2023-06-01\r\nContent-Length: 1025\r\n\r\n"
        ),
        Outcome(
            413,
            413,
            "/v1/messages",
            body=anthropicError(
                "request_too_large", "request body of 1025 bytes exceeds the limit of 1024 bytes"
            ),
        ),
        env={"MAX_REQUEST_BYTES": "1KiB"},
    ),
    Fault(
        "chunked body over the limit",
        chunkedOverLimit,
        Outcome(
            413,
            413,
            "/v1/chat/completions",
            body=openaiError("invalid_request_error", "request body exceeds the limit of 1024 bytes"),
        ),
        env={"MAX_REQUEST_BYTES": "1KiB"},
    ),
    Fault(
        "header line over the limit",
        raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"),
        Outcome(
            431,
            431,
            "/v1/models",
            method="GET",
            body=anthropicError("invalid_request_error", "a request header line exceeds 16384 bytes"),
        ),
    ),
    Fault(
        "headers over the limit",
        raw(
            b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))
            + b"\r\n"
        ),
        Outcome(
            431,
            431,
            "/v1/chat/completions",
            method="GET",
            body=openaiError("invalid_request_error", "request headers exceed 16384 bytes"),
        ),
    ),
    Fault(
        "slow headers",
        trickleHeaders,
        Outcome(
            408,
            408,
            "/v1/messages",
            body=anthropicError("timeout_error", "request headers were not received in time"),
        ),
        env={"CLIENT_HEADER_TIMEOUT": "0.5"},
    ),
    Fault(
        "absolute-URI request",
        raw(b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"),
        Outcome(
            400,
            400,
            "invalid",
            method="GET",
            body=anthropicError("invalid_request_error", "only origin-form request targets are accepted"),
        ),
    ),
    Fault(
        "CONNECT request",
        raw(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n"),
        Outcome(
            400,
            400,
            "invalid",
            method="OTHER",
            body=anthropicError("invalid_request_error", "only origin-form request targets are accepted"),
        ),
    ),
    Fault(
        "dot-dot traversal",
        raw(b"GET /api/anthropic/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        Outcome(
            400,
            400,
            "invalid",
            method="GET",
            body=anthropicError("invalid_request_error", "request path must not contain . or .. segments"),
        ),
    ),
    Fault(
        "encoded traversal",
        raw(b"GET /v1/%2e%2e/%2e%2e/admin/reset-rate-limit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        Outcome(
            400,
            400,
            "invalid",
            method="GET",
            body=anthropicError("invalid_request_error", "request path must not contain . or .. segments"),
        ),
    ),
    Fault(
        "double-encoded traversal",
        raw(
            b"POST /api/coding/paas/v4/%252e%252e/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        ),
        Outcome(
            400,
            400,
            "invalid",
            body=openaiError("invalid_request_error", "request path is encoded more than once"),
        ),
    ),
    Fault(
        "Transfer-Encoding plus Content-Length",
        raw(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        Outcome(
            400, 400, "/v1/messages", body=anthropicError("invalid_request_error", "malformed HTTP request")
        ),
    ),
    Fault(
        "unknown client key (Anthropic)",
        post(b"/v1/messages", messagesBody()),
        Outcome(
            401,
            401,
            "/v1/messages",
            body=anthropicError("authentication_error", "the client key is not valid for this proxy"),
        ),
        env={"PROXY_API_KEYS": "team:team-key-0123456789abcdef"},
    ),
    Fault(
        "unknown client key (OpenAI)",
        post(b"/v1/chat/completions", chatBody(), OPENAI),
        Outcome(
            401,
            401,
            "/v1/chat/completions",
            body={
                "error": {
                    "message": "the client key is not valid for this proxy",
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        ),
        env={"PROXY_API_KEYS": "team:team-key-0123456789abcdef"},
    ),
]


def _samples(stack: Stack, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """
    Every sample of metric C{name} (with its C{_total} suffix), by labels.
    """
    found = {}
    for metric in stack.proxy.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
@pytest_twisted.ensureDeferred
async def test_fault(reactor: Any, makeStack: Any, fault: Fault) -> None:
    """
    Run one row of the matrix and assert its whole outcome.
    """
    refused = _refusedPort()
    env = {name: value.format(refused=refused) for name, value in fault.env.items()}
    fakeClock = FrozenClock(reactor) if fault.frozenFake else None
    stack: Stack = await makeStack(fault.scenario, fakeClock=fakeClock, **env)
    client = await fault.behaviour(stack, reactor)
    expected = fault.outcome
    assert UPSTREAM_KEY.encode() not in client.raw

    if expected.status is None:
        assert client.raw == b""
    else:
        response = client.response()
        assert response.status == expected.status
        if expected.body is not None:
            assert response.header(b"content-type") == [expected.contentType]
            assert json.loads(response.body) == expected.body
            assert response.header(b"content-length") == [b"%d" % (len(response.body),)]
        if expected.streamError is not None:
            assert client.raw.endswith(b"0\r\n\r\n"), "the stream did not end cleanly"
            parsed = events(response.body)
            assert response.body.endswith(expected.streamError)
            assert len(parsed) > 1
            for _name, data in parsed:
                json.loads(data)

    # What became of the upstream call.
    received = stack.fake.received
    if expected.upstream == "never":
        assert received == []
    else:
        assert len(received) == 1
        assert await received[0].done == expected.upstream

    # Let the access record land (a disconnect is noticed a turn later).
    await sleep(reactor, 0.05)
    assert _samples(stack, "zai_proxy_requests_total") == {
        (
            ("method", expected.method),
            ("path", expected.route),
            ("status_code", str(expected.recorded)),
            ("variant", "production"),
        ): 1.0
    }
    assert _samples(stack, "zai_proxy_upstream_errors_total") == {
        (("error_type", kind), ("variant", "production")): count
        for kind, count in expected.upstreamErrors.items()
    }
    assert len(stack.proxy.inFlight) == 0
    if fault.check is not None:
        await fault.check(stack, reactor, client)
