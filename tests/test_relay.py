"""
Tests for L{zaiproxy.relay.relay}, over real sockets: the fake Z.AI on one
loopback port, the proxy on another, and raw or treq clients. A stream's
opening, which is about reactor turns, runs on a clock instead: the fake
behind treq's in-memory agent.
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any

import pytest
import pytest_twisted
from support.clients import ANTHROPIC, OPENAI, chatBody, ended, events, messagesBody, settled, sleep
from support.doubles import MemoryUpstream, PushRequest
from support.stack import UPSTREAM_KEY, Stack
from treq.testing import RequestTraversalAgent
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from zaiproxy.dialects import Dialect
from zaiproxy.fake import FakeZai, parseScenario, usageFor
from zaiproxy.fake.testing import FrozenClock, RawClient, delayedCalls, rawRequest
from zaiproxy.front.site import InFlight
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.record import Exchange
from zaiproxy.observe.reporter import Reporter
from zaiproxy.relay.context import RelayContext
from zaiproxy.relay.reading import MAX_UNREAD, MAX_UNREAD_BYTES, READ_OPENING_AFTER
from zaiproxy.relay.relay import Relay
from zaiproxy.relay.routes import Forward
from zaiproxy.relay.states import IllegalMove, Phase
from zaiproxy.usage.accounting import Accounting, ModelLabels, Pricing
from zaiproxy.usage.body import RequestBody
from zaiproxy.usage.tokens import Counting, FallbackCounter


async def proxied(
    stack: Stack, reactor: Any, path: bytes, body: bytes, headers: Any = ANTHROPIC, method: bytes = b"POST"
) -> RawClient:
    return await rawRequest(reactor, stack.port, method, path, headers, body)


def assertNoSecret(client: RawClient) -> None:
    assert UPSTREAM_KEY.encode() not in client.raw


# -- byte-exact streaming ----------------------------------------------------


@pytest.mark.parametrize("scenario", ["events=20", "events=20 split=true thinking=true tool=true"])
@pytest_twisted.ensureDeferred
async def test_streamRelayedByteForByte(
    reactor: Any, makeStack: Any, scenario: str, logEvents: list[dict[str, Any]]
) -> None:
    """
    A stream reaches the client exactly as the upstream sent it, even when
    the upstream cuts frames across writes: compared with the same answer
    fetched straight from a twin fake.
    """
    viaProxy = await makeStack(scenario, fakeClock=FrozenClock(reactor))
    direct = await makeStack(scenario, fakeClock=FrozenClock(reactor))
    client = await proxied(viaProxy, reactor, b"/v1/messages?beta=true", messagesBody())
    await ended(client)
    straight = await rawRequest(
        reactor,
        direct.upstream.port,
        b"POST",
        b"/api/anthropic/v1/messages",
        [*ANTHROPIC[:2], (b"x-api-key", UPSTREAM_KEY.encode())],
        messagesBody(),
    )
    await ended(straight)
    response, expected = client.response(), straight.response()
    assert response.status == 200
    assert response.body == expected.body
    assert len(response.body) == viaProxy.fake.received[0].bytesSent
    assert [name for name, _ in events(response.body)][:2] == ["message_start", "ping"]
    assert response.header(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert client.raw.endswith(b"0\r\n\r\n")
    assertNoSecret(client)
    labels = {"method": "POST", "path": "/v1/messages", "variant": "production"}
    assert viaProxy.sample("zai_proxy_requests_total", status_code="200", **labels) == 1
    assert viaProxy.sample("zai_proxy_response_size_bytes_sum", status_code="200", **labels) == len(
        response.body
    )
    assert viaProxy.sample("zai_proxy_time_to_first_byte_seconds_count", **labels) == 1
    # The proxy's request id reaches the client and the access log alike.
    [requestId] = response.header(b"x-zaiproxy-request-id")
    [access] = [e for e in logEvents if e.get("log_namespace") == "zaiproxy.access"]
    assert access["requestId"] == requestId.decode()


@pytest_twisted.ensureDeferred
async def test_jsonBodyRelayedWithLength(reactor: Any, makeStack: Any) -> None:
    """
    A non-streaming answer passes unchanged, with its Content-Length.
    """
    viaProxy = await makeStack(fakeClock=FrozenClock(reactor))
    direct = await makeStack(fakeClock=FrozenClock(reactor))
    client = await proxied(viaProxy, reactor, b"/v1/chat/completions", chatBody(stream=False), OPENAI)
    await ended(client)
    straight = await rawRequest(
        reactor,
        direct.upstream.port,
        b"POST",
        b"/api/coding/paas/v4/chat/completions",
        [(b"authorization", b"Bearer " + UPSTREAM_KEY.encode())],
        chatBody(stream=False),
    )
    await ended(straight)
    response = client.response()
    assert response.status == 200
    assert response.body == straight.response().body
    assert response.header(b"content-length") == [b"%d" % len(response.body)]
    assert response.header(b"transfer-encoding") == []
    assert json.loads(response.body)["usage"]["prompt_tokens"] > 0


@pytest_twisted.ensureDeferred
async def test_largeRequestBodyByteForByte(reactor: Any, makeStack: Any) -> None:
    """
    A request body over 100 kB (which twisted.web keeps in a temporary file)
    reaches the upstream byte for byte, never re-serialised.
    """
    stack = await makeStack()
    text = "é 漢字 " * 150000
    body = messagesBody(stream=False, text=text).replace(b'{"model"', b'{ "model"')
    client = await proxied(stack, reactor, b"/v1/messages", body)
    await ended(client)
    assert client.response().status == 200
    assert stack.fake.received[0].body == body
    assert stack.sample(
        "zai_proxy_request_size_bytes_sum", method="POST", path="/v1/messages", variant="production"
    ) == len(body)


@pytest_twisted.ensureDeferred
async def test_firstEventBeforeStreamEnds(reactor: Any, makeStack: Any) -> None:
    """
    The first event reaches the client while the upstream is still working
    on the next one.
    """
    stack = await makeStack("events=3 interval=0.4")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    await client.when(lambda c: b"event: message_start" in c.raw)
    record = stack.fake.received[0]
    assert not record.done.called
    assert b"message_stop" not in client.raw
    await ended(client)
    assert b"event: message_stop" in client.raw


# -- backpressure and disconnects ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slowReaderPausesUpstream(reactor: Any, makeStack: Any) -> None:
    """
    A client that stops reading stops the upstream too (the proxy does not
    buffer the stream); when it reads again the stream resumes; when it
    leaves, the upstream call is cancelled.
    """
    stack = await makeStack("events=1000000 deltaSize=1000")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    await client.when(lambda c: c.received > 1_000_000)
    client.connection.pauseProducing()
    record = stack.fake.received[0]
    stalled = await settled(reactor, lambda: record.bytesSent)
    await sleep(reactor, 0.5)
    assert record.bytesSent == stalled
    # Only socket buffers lie between the fake and the client, not a stream.
    assert stalled - client.received < 64 * 2**20
    assert stalled < 1_000_000 * 1000 // 4
    client.connection.resumeProducing()
    await client.when(lambda c: c.received > stalled + 5_000_000)
    assert record.bytesSent > stalled
    client.connection.abortConnection()
    assert await record.done == "disconnected"


@pytest_twisted.ensureDeferred
async def test_disconnectBeforeHeadersCancelsUpstream(reactor: Any, makeStack: Any) -> None:
    """
    A client that leaves while the upstream is still thinking (no headers
    yet) has the upstream call cancelled within 100 ms.
    """
    stack = await makeStack("mode=hang")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    record = await stack.fake.whenReceived(1)
    await sleep(reactor, 0.1)
    left = reactor.seconds()
    client.connection.abortConnection()
    assert await record.done == "disconnected"
    assert record.disconnectedAt - left < 0.1
    await sleep(reactor, 0.05)
    assert (
        stack.sample(
            "zai_proxy_requests_total",
            method="POST",
            path="/v1/messages",
            status_code="499",
            variant="production",
        )
        == 1
    )
    assert len(stack.proxy.inFlight) == 0


@pytest_twisted.ensureDeferred
async def test_disconnectMidStreamCancelsUpstream(reactor: Any, makeStack: Any) -> None:
    """
    A client that leaves mid-stream has the upstream connection closed
    within 100 ms.
    """
    stack = await makeStack("events=100 interval=0.05")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    await client.when(lambda c: c.raw.count(b"content_block_delta") >= 2)
    record = stack.fake.received[0]
    left = reactor.seconds()
    client.connection.abortConnection()
    assert await record.done == "disconnected"
    assert record.disconnectedAt - left < 0.1
    await sleep(reactor, 0.05)
    assert (
        stack.sample(
            "zai_proxy_requests_total",
            method="POST",
            path="/v1/messages",
            status_code="499",
            variant="production",
        )
        == 1
    )


# -- upstream failures ---------------------------------------------------------


@pytest.mark.parametrize(
    "path, headers, body, envelope",
    [
        (b"/v1/messages", ANTHROPIC, messagesBody(), "anthropic"),
        (b"/v1/chat/completions", OPENAI, chatBody(), "openai"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_firstByteTimeout(
    reactor: Any, makeStack: Any, path: bytes, headers: Any, body: bytes, envelope: str
) -> None:
    """
    No response headers within UPSTREAM_FIRST_BYTE_TIMEOUT: 504 in the
    route's dialect, the upstream call is dropped, and it is counted.
    """
    stack = await makeStack("mode=hang", UPSTREAM_FIRST_BYTE_TIMEOUT="0.3")
    client = await proxied(stack, reactor, path, body, headers)
    await ended(client)
    response = client.response()
    assert response.status == 504
    error = json.loads(response.body)
    if envelope == "anthropic":
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "0.3 s" in error["error"]["message"]
    else:
        assert error["error"]["type"] == "server_error"
    assert await stack.fake.received[0].done == "disconnected"
    assert (
        stack.sample("zai_proxy_upstream_errors_total", error_type="first_byte_timeout", variant="production")
        == 1
    )


@pytest.mark.parametrize(
    "path, headers, body, marker",
    [
        (b"/v1/messages", ANTHROPIC, messagesBody(), b"event: error\ndata: "),
        (b"/v1/chat/completions", OPENAI, chatBody(), b'data: {"error":'),
    ],
)
@pytest_twisted.ensureDeferred
async def test_idleTimeoutEndsStreamWithError(
    reactor: Any, makeStack: Any, path: bytes, headers: Any, body: bytes, marker: bytes
) -> None:
    """
    An upstream silent for longer than UPSTREAM_IDLE_TIMEOUT mid-stream: the
    client's stream ends cleanly with an error event its SDK will raise on.
    """
    stack = await makeStack("mode=stall-mid after=2", UPSTREAM_IDLE_TIMEOUT="0.3")
    client = await proxied(stack, reactor, path, body, headers)
    await ended(client)
    assert client.raw.endswith(b"0\r\n\r\n")
    response = client.response()
    assert response.status == 200
    parsed = events(response.body)
    assert marker in response.body
    last = json.loads(parsed[-1][1])
    assert "sent nothing for 0.3 s" in json.dumps(last)
    assert await stack.fake.received[0].done == "disconnected"
    assert (
        stack.sample("zai_proxy_upstream_errors_total", error_type="idle_timeout", variant="production") == 1
    )


@pytest_twisted.ensureDeferred
async def test_resetMidStreamEndsOnABoundary(reactor: Any, makeStack: Any) -> None:
    """
    An upstream reset mid-stream, even inside a frame: the client gets every
    whole event, then an error event, then a clean end.
    """
    stack = await makeStack("mode=reset-mid after=3 split=true")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    await ended(client)
    response = client.response()
    parsed = events(response.body)
    assert parsed[-1][0] == "error"
    assert json.loads(parsed[-1][1])["error"]["type"] == "api_error"
    for _name, data in parsed:
        json.loads(data)
    assert client.raw.endswith(b"0\r\n\r\n")
    assert stack.sample("zai_proxy_upstream_errors_total", error_type="read_error", variant="production") == 1


@pytest_twisted.ensureDeferred
async def test_resetBeforeHeaders(reactor: Any, makeStack: Any) -> None:
    """
    An upstream that drops the connection before answering: 502, once the
    retry (one here: each waits the network backoff) fails the same way.
    """
    stack = await makeStack("mode=reset", MAX_RETRIES="1")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    await ended(client)
    response = client.response()
    assert response.status == 502
    assert len(stack.fake.received) == 2
    assert stack.sample("zai_proxy_retry_attempts_total", reason="network_error", variant="production") == 1
    assert (
        json.loads(response.body)["error"]["message"]
        == "the upstream closed the connection before responding"
    )
    assert (
        stack.sample(
            "zai_proxy_upstream_errors_total", error_type="upstream_connection", variant="production"
        )
        == 1
    )


@pytest_twisted.ensureDeferred
async def test_connectionRefused(reactor: Any, makeStack: Any) -> None:
    """
    Nothing listening upstream: 502 in the route's dialect, once the retry
    (one here: each waits the network backoff) is refused too.
    """
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    stack = await makeStack(ZAI_OPENAI_TARGET_URL=f"http://127.0.0.1:{port}/v4", MAX_RETRIES="1")
    client = await proxied(stack, reactor, b"/v1/chat/completions", chatBody(), OPENAI)
    await ended(client)
    response = client.response()
    assert response.status == 502
    assert stack.sample("zai_proxy_retry_attempts_total", reason="network_error", variant="production") == 1
    assert json.loads(response.body)["error"]["message"] == "the upstream refused the connection"


@pytest_twisted.ensureDeferred
async def test_connectTimeout(reactor: Any, makeStack: Any) -> None:
    """
    An upstream that never accepts the connection (its backlog is full):
    504 after UPSTREAM_CONNECT_TIMEOUT.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    try:
        await sleep(reactor, 0.1)
        stack = await makeStack(
            ZAI_TARGET_URL=f"http://127.0.0.1:{port}/api/anthropic", UPSTREAM_CONNECT_TIMEOUT="0.3"
        )
        started = reactor.seconds()
        client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
        await ended(client)
        assert client.response().status == 504
        assert 0.25 < reactor.seconds() - started < 2
        assert (
            stack.sample(
                "zai_proxy_upstream_errors_total", error_type="connect_timeout", variant="production"
            )
            == 1
        )
    finally:
        for filler in fillers:
            filler.close()
        server.close()


@pytest_twisted.ensureDeferred
async def test_upstreamErrorsPassThrough(reactor: Any, makeStack: Any) -> None:
    """
    Z.AI's own errors reach the client unchanged (status and body), and are
    counted by status.
    """
    stack = await makeStack("mode=error code=1308")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    await ended(client)
    response = client.response()
    assert response.status == 429
    body = json.loads(response.body)
    assert body["error"]["type"] == "1308"
    assert body["error"]["message"].startswith("Usage limit reached for 5 hour")
    assert stack.sample("zai_proxy_upstream_errors_total", error_type="429", variant="production") == 1
    assert (
        stack.sample(
            "zai_proxy_requests_total",
            method="POST",
            path="/v1/messages",
            status_code="429",
            variant="production",
        )
        == 1
    )
    assertNoSecret(client)


@pytest_twisted.ensureDeferred
async def test_retryThenSuccess(reactor: Any, makeStack: Any) -> None:
    """
    Through the real proxy: a 1303 is retried after the backoff and the
    client sees only the success.
    """
    from zaiproxy.fake import parseScenario

    stack = await makeStack(MAX_RETRIES="2")
    stack.fake.queue.append(parseScenario("mode=error code=1303"))
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody(stream=False))
    await ended(client)
    assert client.response().status == 200
    assert len(stack.fake.received) == 2
    assert 0.5 <= stack.fake.received[1].receivedAt - stack.fake.received[0].receivedAt < 1.5
    assert stack.sample("zai_proxy_retry_attempts_total", reason="429", variant="production") == 1
    assert (
        stack.sample(
            "zai_proxy_zai_errors_total", **{"class": "frequency", "code": "1303", "variant": "production"}
        )
        == 1
    )


@pytest_twisted.ensureDeferred
async def test_quotaHeldLocally(reactor: Any, makeStack: Any) -> None:
    """
    Through the real proxy: a quota 429 reaches the client with its reset
    metadata; the next call (another dialect) is answered by the proxy
    without reaching Z.AI.
    """
    stack = await makeStack("mode=error code=1310 resetIn=7200")
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody(stream=False))
    await ended(client)
    response = client.response()
    assert response.status == 429
    assert response.header(b"x-zai-error-class") == [b"quota"]
    assert 7190 <= int(response.header(b"retry-after")[0]) <= 7200
    again = await proxied(stack, reactor, b"/v1/chat/completions", chatBody(stream=False), OPENAI)
    await ended(again)
    assert again.response().status == 429
    assert json.loads(again.response().body)["error"]["code"] == "1310"
    assert len(stack.fake.received) == 1
    assert stack.proxy.health.document()["rate_limit"]["quota_hold_code"] == "1310"


# -- a stream's opening, sent before the usage tap is made ----------------------


def tapMade(rig: OpeningRig) -> bool:
    reading = rig.relay._reading
    return reading is not None and reading.made


class OpeningRig:
    """
    One counted relay on a clock: the real fake behind treq's in-memory
    agent, a L{DummyRequest} for the client.
    """

    def __init__(
        self,
        scenario: str,
        dialect: Dialect = Dialect.anthropic,
        counted: bool = True,
        pump: bool = True,
        body: bytes | None = None,
    ) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_767_225_600.0)
        self.fake = FakeZai(self.clock, apiKey=UPSTREAM_KEY, defaults=parseScenario(scenario))
        self.agent = RequestTraversalAgent(self.fake)
        self.metrics = Metrics("test", "0")
        accounting = Accounting(
            self.clock,
            Counting(self.clock, FallbackCounter()),
            ModelLabels([], "glm-4"),
            Pricing({}),
        )
        self.context = RelayContext(
            clock=self.clock,
            upstream=MemoryUpstream(self.agent),  # type: ignore[arg-type]
            reporter=Reporter(self.metrics),
            apiKey=UPSTREAM_KEY.encode(),
            firstByteTimeout=300.0,
            idleTimeout=120.0,
            accounting=accounting,
        )
        if dialect is Dialect.openai:
            self.route = Forward(
                "/v1/chat/completions", dialect, b"http://zai.test/api/coding/paas/v4/chat/completions"
            )
            self.body = chatBody()
        else:
            self.route = Forward("/v1/messages", dialect, b"http://zai.test/api/anthropic/v1/messages")
            self.body = messagesBody()
        if body is not None:
            self.body = body
        self.request = PushRequest([b""])
        self.request.method = b"POST"
        self.request.content = io.BytesIO(self.body)
        exchange = Exchange(
            method="POST", route=self.route.label, startedAt=self.clock.seconds(), model="glm-4.7"
        )
        requestBody = RequestBody(self.request.content) if counted else None
        self.relay = Relay(
            self.request.asRequest(), self.route, exchange, self.context, InFlight(), requestBody
        )
        self.relay.start()
        if pump:
            self.pump()

    def pump(self) -> None:
        """
        Deliver what is due now, without moving time.
        """
        for _ in range(20):
            self.agent.flush()
            self.clock.advance(0)

    def runOut(self) -> None:
        while not self.request.finished:
            self.clock.advance(0.01)
            self.pump()

    def written(self) -> bytes:
        return b"".join(self.request.written)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"variant": "test", **labels})

    def tokens(self, direction: str) -> float:
        return sum(
            self.sample(
                "zai_proxy_tokens_total", direction=direction, model="glm-4.7", pricing_tier=tier, client="-"
            )
            or 0.0
            for tier in ("peak", "off_peak")
        )


def test_openingSentBeforeTheTapIsMade() -> None:
    """
    Z.AI's opening burst reaches the client before the usage tap exists
    (nothing of it is read before Twisted's next poll sends it); the tap
    is made a moment later, and the usage recorded is Z.AI's.
    """
    rig = OpeningRig("events=3 interval=0.05")
    # Sent at once by Z.AI (and the fake): up to the first delta.
    assert [name for name, _ in events(rig.written())] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
    ]
    assert not tapMade(rig)
    rig.clock.advance(READ_OPENING_AFTER)
    assert tapMade(rig)
    rig.runOut()
    usage = usageFor(parseScenario("events=3"), rig.body)
    assert (rig.tokens("input"), rig.tokens("output")) == (usage.inputTokens, usage.outputTokens)
    assert rig.sample("zai_proxy_token_usage_source_total", source="reported") == 1


def test_longBurstIsNotHeldForTheRead() -> None:
    """
    A burst far longer than an opening (here 60 deltas in one read, then
    nothing) is read as it comes: more than MAX_UNREAD_BYTES is not held
    until the timer.
    """
    rig = OpeningRig("mode=stall-mid after=60 events=80 interval=0")
    assert rig.written().count(b"event: content_block_delta") == 60
    assert len(rig.written()) > MAX_UNREAD_BYTES
    assert tapMade(rig)
    assert rig.relay._reading is not None and rig.relay._reading._unread == []


def test_manyOpeningsAreNotHeldForTheRead() -> None:
    """
    Chunks arriving in separate reads before the timer fires are each held
    unread only up to MAX_UNREAD of them; after that they are read as
    they come.
    """
    step = READ_OPENING_AFTER / 100
    rig = OpeningRig(f"mode=stall-mid after={MAX_UNREAD + 4} events=40 interval={step}")
    for _ in range(MAX_UNREAD + 8):
        rig.clock.advance(step)
        rig.pump()
    assert rig.clock.seconds() - 1_767_225_600.0 < READ_OPENING_AFTER
    assert rig.written().count(b"event: content_block_delta") == MAX_UNREAD + 4
    assert tapMade(rig)
    assert rig.relay._reading is not None and rig.relay._reading._unread == []


@pytest.mark.parametrize("counted", [True, False])
def test_openingLeavesAsOneWriteBeforeThePoll(counted: bool) -> None:
    """
    The chunks of a stream's first upstream read are written as one piece,
    by a call due at once (which the reactor runs before its next poll,
    the one that sends them), counted or not.
    """
    rig = OpeningRig("events=3 interval=0.05", counted=counted, pump=False)
    for _ in range(20):
        rig.agent.flush()
    assert rig.request.written == []
    assert [call.func for call in delayedCalls(rig.clock) if call.getTime() == rig.clock.seconds()] == [
        rig.relay._openingDue
    ]
    rig.clock.advance(0)
    [opening] = rig.request.written
    assert [name for name, _ in events(opening)] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
    ]
    rig.runOut()
    # Later chunks, each in a read of its own, go out as they come.
    assert [len(events(piece)) for piece in rig.request.written[1:]] == [1, 1, 1, 1, 1]


def test_usagelessMessageStartReadAtOnce() -> None:
    """
    A message_start without usage is read before it passes, so Z.AI's
    zeros are added to it (the anthropic SDK fails without them).
    """
    rig = OpeningRig("events=2 interval=0.05 usage=none")
    assert tapMade(rig)
    [start] = [data for name, data in events(rig.written()) if name == "message_start"]
    usage = json.loads(start)["message"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (0, 0)
    rig.runOut()
    assert rig.sample("zai_proxy_token_usage_source_total", source="estimated") == 1


@pytest.mark.parametrize("dialect", [Dialect.anthropic, Dialect.openai])
def test_streamEndsBeforeTheRead(dialect: Dialect) -> None:
    """
    A stream that ends before its opening is read: the end reads it first,
    and the read scheduled for later is cancelled.
    """
    rig = OpeningRig("events=2 interval=0", dialect)
    assert rig.request.finished
    assert not [
        call for call in delayedCalls(rig.clock) if getattr(call.func, "__name__", None) == "_readOpening"
    ]
    assert rig.sample("zai_proxy_token_usage_source_total", source="reported") == 1
    assert rig.tokens("output") == usageFor(parseScenario("events=2"), rig.body).outputTokens


def test_clientLeavesDuringTheOpening() -> None:
    """
    A client that leaves before the opening is read: the tap is made from
    the body kept at the start, and the cut answer is billed as partial.
    """
    rig = OpeningRig("events=3 interval=0.05")
    assert not tapMade(rig)
    rig.request.processingFailed(Failure(ConnectionDone()))
    rig.pump()
    assert tapMade(rig)
    assert rig.sample("zai_proxy_token_usage_source_total", source="partial") == 1
    # FallbackCounter: a quarter of the characters, at least 1: the prompt
    # "hi", and the first delta "hello " that was sent.
    assert (rig.tokens("input"), rig.tokens("output")) == (1, 1)
    assert not [
        call for call in delayedCalls(rig.clock) if getattr(call.func, "__name__", None) == "_readOpening"
    ]


def test_aBugRelayingTheOpeningEndsBothSides(logEvents: list[dict[str, Any]]) -> None:
    """
    The opening is relayed by a call the reactor runs, not by the
    upstream's parser: a bug there is logged, the client gets a 500 in
    its dialect rather than a hang, and the upstream is stopped.
    """
    rig = OpeningRig("events=3 interval=0.05", pump=False)

    def broken(data: bytes) -> None:
        raise ZeroDivisionError("a bug")

    rig.relay._relayEvents = broken  # type: ignore[method-assign]
    for _ in range(20):
        rig.agent.flush()
    rig.clock.advance(0)
    assert rig.request.finished
    assert rig.request.responseCode == 500
    assert json.loads(b"".join(rig.request.written))["error"]["message"] == "internal proxy error"
    assert [
        e for e in logEvents if e.get("log_failure") is not None and e["log_failure"].check(ZeroDivisionError)
    ]
    rig.pump()
    assert rig.relay._ended is not None
    assert not rig.clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_refusedRetryWithOneWorker(reactor: Any, makeStack: Any) -> None:
    """
    With one worker slot, a refused upstream's retries reuse the request's
    own slot: 502 once they run out, not a 429 after QUEUE_TIMEOUT spent
    queueing behind itself.
    """
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    stack = await makeStack(
        ZAI_TARGET_URL=f"http://127.0.0.1:{port}/api/anthropic",
        MAX_WORKERS="1",
        MAX_RETRIES="1",
        QUEUE_TIMEOUT="30",
    )
    client = await proxied(stack, reactor, b"/v1/messages", messagesBody())
    await ended(client)
    response = client.response()
    assert response.status == 502
    assert json.loads(response.body)["error"]["message"] == "the upstream refused the connection"
    assert stack.sample("zai_proxy_retry_attempts_total", reason="network_error", variant="production") == 1


def test_usageChunkAtACleanEndWithoutDone() -> None:
    """
    An OpenAI stream that ends after its finish_reason without C{[DONE]}
    or usage, from a client that asked for usage: the usage chunk (counted
    at once, here) goes last, and the response is finished once (it was
    finished twice: Twisted's "request.finish called twice").
    """
    body = json.dumps(
        {
            "model": "glm-4.7",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    rig = OpeningRig("events=2 interval=0 usage=none done=false", Dialect.openai, body=body)
    rig.runOut()
    assert rig.request.finished == 1
    chunks = [json.loads(data) for _, data in events(rig.written())]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    # FallbackCounter: a quarter of the characters, at least 1.
    assert chunks[-1]["usage"]["prompt_tokens"] == 1
    assert chunks[-1]["usage"]["completion_tokens"] == len("hello hello ") // 4
    assert rig.sample("zai_proxy_token_usage_source_total", source="estimated") == 1
    assert rig.sample("zai_proxy_upstream_errors_total", error_type="truncated") is None


@pytest.mark.parametrize("dialect", [Dialect.anthropic, Dialect.openai])
def test_truncatedStreamEndsWithAnError(dialect: Dialect) -> None:
    """
    A stream that ends cleanly without its last event ends with the
    dialect's error event, after every whole event sent; it counts as a
    truncated upstream error, and what was relayed as partial usage.
    """
    rig = OpeningRig("mode=truncate after=2 interval=0", dialect)
    rig.runOut()
    assert rig.request.finished == 1
    parsed = events(rig.written())
    message = "the upstream ended the stream before the answer was complete"
    if dialect is Dialect.anthropic:
        assert parsed[-1] == (
            "error",
            json.dumps(
                {"type": "error", "error": {"type": "api_error", "message": message}}, separators=(",", ":")
            ),
        )
        assert [name for name, _ in parsed].count("content_block_delta") == 2
    else:
        assert json.loads(parsed[-1][1])["error"]["message"] == message
        assert [json.loads(data)["choices"][0]["delta"]["content"] for _, data in parsed[:-1]] == [
            "hello "
        ] * 2
    assert rig.sample("zai_proxy_upstream_errors_total", error_type="truncated") == 1
    assert rig.sample("zai_proxy_token_usage_source_total", source="partial") == 1
    assert rig.sample("zai_proxy_token_usage_source_total", source="estimated") is None
    # FallbackCounter: a quarter of the characters, at least 1: the prompt
    # "hi", and the two deltas "hello hello " that were sent.
    assert (rig.tokens("input"), rig.tokens("output")) == (1, 3)


@pytest.mark.parametrize(
    "dialect, tail",
    [
        (Dialect.anthropic, b'event: message_stop\ndata: {"type":"message_stop"}\n\n'),
        (Dialect.openai, b"data: [DONE]\n\n"),
        (Dialect.openai, b'data: {"choices":[{"index":0,"finish_reason":"stop","delta":{}}]}\n\n'),
        (
            Dialect.anthropic,
            b'event: error\ndata: {"type":"error","error":{"type":"1234","message":"x"}}\n\n',
        ),
        (Dialect.openai, b'data: {"error":{"code":"1234","message":"x"}}\n\n'),
    ],
)
def test_streamEnded(dialect: Dialect, tail: bytes) -> None:
    """
    A stream's last event (or an in-band error) is seen in whole events,
    alone or after others, with CRLF line ends too; a delta that merely
    mentions one, or a null finish_reason, is not.
    """
    from zaiproxy.dialects import streamEnded

    delta = b'data: {"choices":[{"index":0,"finish_reason":null,"delta":{"content":"x"}}]}\n\n'
    mentions = (
        b'event: content_block_delta\ndata: {"delta":{"text":"\\nevent: message_stop\\n data: [DONE] '
        b'\\"finish_reason\\":\\"stop\\" \\"error\\""}}\n\n'
    )
    assert streamEnded(dialect, tail)
    assert streamEnded(dialect, delta + tail)
    assert streamEnded(dialect, tail.replace(b"\n", b"\r\n"))
    assert not streamEnded(dialect, delta)
    assert not streamEnded(dialect, mentions)


# -- phases ---------------------------------------------------------------------


@pytest.fixture
def phases(monkeypatch: pytest.MonkeyPatch) -> list[Phase]:
    """
    The phases every relay made in the test moves through, in order.
    """
    seen: list[Phase] = []
    move = Relay._moveTo

    def recording(relay: Relay, phase: Phase) -> None:
        move(relay, phase)
        seen.append(phase)

    monkeypatch.setattr(Relay, "_moveTo", recording)
    return seen


@pytest.mark.parametrize(
    "scenario, stream, expected",
    [
        ("events=3", True, [Phase.OPENING, Phase.RELAYING, Phase.ENDING, Phase.DONE]),
        ("events=3", False, [Phase.RELAYING, Phase.ENDING, Phase.DONE]),
        # Usage added to message_delta: the stream waits for the count.
        (
            "events=3 usage=none",
            True,
            [Phase.OPENING, Phase.RELAYING, Phase.HELD, Phase.RELAYING, Phase.ENDING, Phase.DONE],
        ),
        ("mode=error code=1211", True, [Phase.DONE]),
    ],
)
def test_phases(phases: list[Phase], scenario: str, stream: bool, expected: list[Phase]) -> None:
    """
    A relay moves through the phases its answer calls for, and no others.
    """
    rig = OpeningRig(scenario, body=messagesBody(stream=stream))
    rig.runOut()
    assert phases == expected
    assert rig.relay.phase is Phase.DONE


def test_clientGoneWhileForwarding(phases: list[Phase]) -> None:
    """
    A client that leaves before the answer ends the relay from FORWARDING.
    """
    rig = OpeningRig("mode=hang", pump=False)
    rig.request.processingFailed(Failure(ConnectionDone()))
    rig.pump()
    assert phases == [Phase.DONE]


def test_illegalMoveAnswersTheClient(logEvents: list[dict[str, Any]]) -> None:
    """
    An illegal move is a bug: it raises, and the relay's last errback still
    answers the client (500) and ends the request.
    """
    rig = OpeningRig("mode=hang")
    assert rig.relay.phase.value == "forwarding"
    with pytest.raises(IllegalMove):
        rig.relay._moveTo(Phase.ENDING)
    rig.relay._bug(Failure(IllegalMove("forwarding to ending")))
    assert rig.request.responseCode == 500
    assert rig.request.finished
    assert rig.relay.phase is Phase.DONE
    # The upstream call it no longer waits for was cancelled.
    rig.pump()
    assert rig.fake.received[0].disconnectedAt is not None
    [failure] = [e["log_failure"] for e in logEvents if "log_failure" in e]
    assert failure.check(IllegalMove)
    rig.pump()
