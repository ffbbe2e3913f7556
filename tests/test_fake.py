"""
Tests for L{zaiproxy.fake.FakeZai} over real loopback sockets: routes,
auth, recording, every mode in both dialects, frame splitting, and
back-pressure from a reader that stops reading.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.web.client import Agent, HTTPConnectionPool

from zaiproxy.fake import FakeZai, Scenario, formatScenario, inputTokensFor, usageFor
from zaiproxy.fake.errors import errorMessage
from zaiproxy.fake.testing import (
    FrozenClock,
    RunningFake,
    rawRequest,
    startFake,
)

KEY = "test-key.secret"
MESSAGES = "/api/anthropic/v1/messages"
COUNT = "/api/anthropic/v1/messages/count_tokens"
A_MODELS = "/api/anthropic/v1/models"
CHAT = "/api/paas/v4/chat/completions"
CODING_CHAT = "/api/coding/paas/v4/chat/completions"
O_MODELS = "/api/paas/v4/models"
CODING_MODELS = "/api/coding/paas/v4/models"

ANTHROPIC_AUTH = {"x-api-key": KEY}
OPENAI_AUTH = {"Authorization": f"Bearer {KEY}"}

Serve = Callable[..., Awaitable[RunningFake]]


@pytest_twisted.async_yield_fixture
async def serve(reactor: Any) -> AsyncIterator[Serve]:
    """
    Start fakes on ephemeral ports; stop them all after the test.
    """
    running: list[RunningFake] = []

    async def start(fake: FakeZai | None = None, **kwargs: Any) -> RunningFake:
        if fake is None:
            fake = FakeZai(reactor, **kwargs)
        r = await startFake(reactor, fake)
        running.append(r)
        return r

    yield start
    for r in running:
        await r.stop()


@pytest_twisted.async_yield_fixture
async def http(reactor: Any) -> AsyncIterator[HTTPClient]:
    """
    A treq client on its own pool, closed after the test.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


async def call(
    http: HTTPClient,
    fake: RunningFake,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    scenario: str | None = None,
) -> tuple[int, Any, bytes]:
    """
    Make a request; return status, response headers and the whole body.
    """
    allHeaders = dict(headers or {})
    if scenario is not None:
        allHeaders["x-fake-scenario"] = scenario
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    requestHeaders: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in allHeaders.items()}
    response = await http.request(
        method,
        fake.url(path),
        data=data,
        headers=requestHeaders,
        unbuffered=True,
    )
    content = await treq.content(response)
    return response.code, response.headers, content


def sse(data: bytes) -> list[tuple[str | None, Any]]:
    """
    Parse an SSE body into (event name, JSON or "[DONE]") pairs.
    """
    events: list[tuple[str | None, Any]] = []
    for block in data.split(b"\n\n"):
        if not block:
            continue
        name = None
        payload = ""
        for line in block.split(b"\n"):
            field, _, value = line.partition(b": ")
            if field == b"event":
                name = value.decode()
            elif field == b"data":
                payload = value.decode()
        events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


async def waitFor(reactor: Any, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """
    Poll until C{condition()} holds.
    """
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not reached")
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


# routes and bodies


@pytest_twisted.ensureDeferred
async def test_anthropicStream(serve: Serve, http: HTTPClient) -> None:
    """
    A streamed Messages request gets SSE with the event-stream headers.
    """
    fake = await serve()
    status, headers, body = await call(
        http, fake, MESSAGES + "?beta=true", {"model": "claude-x", "stream": True}
    )
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    assert headers.getRawHeaders("cache-control") == ["no-cache"]
    assert headers.getRawHeaders("content-length") is None
    events = sse(body)
    assert [n for n, _ in events][:2] == ["message_start", "ping"]
    assert [n for n, _ in events][-2:] == ["message_delta", "message_stop"]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "hello " * 5
    assert events[0][1]["message"]["model"] == "glm-4.7"
    record = fake.fake.received[0]
    assert record.route == "messages" and record.stream
    assert await record.done == "completed"
    assert record.bytesSent == len(body)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", [CHAT, CODING_CHAT])
async def test_openaiStream(serve: Serve, http: HTTPClient, path: str) -> None:
    """
    Both chat-completions paths stream OpenAI chunks ending in [DONE].
    """
    fake = await serve()
    status, headers, body = await call(http, fake, path, {"stream": True, "messages": []})
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    events = sse(body)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    assert events[-2][1]["choices"][0]["finish_reason"] == "stop"
    assert events[-2][1]["usage"]["prompt_tokens"] == inputTokensFor(fake.fake.received[0].body)


@pytest_twisted.ensureDeferred
async def test_anthropicJson(reactor: Any, serve: Serve, http: HTTPClient) -> None:
    """
    Without C{stream: true} the answer is one JSON message with a
    Content-Length.
    """
    fake = await serve()
    request = {"model": "claude-x", "max_tokens": 10, "messages": []}
    status, headers, body = await call(http, fake, MESSAGES, request)
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["application/json; charset=UTF-8"]
    # treq's content decoder hides Content-Length: look at the raw answer.
    raw = await rawRequest(reactor, fake.port, b"POST", MESSAGES.encode(), body=b"{}")
    await raw.closed
    response = raw.response()
    assert response.header(b"content-length") == [b"%d" % (len(response.body),)]
    assert response.header(b"transfer-encoding") == []
    message = json.loads(body)
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": "hello " * 5}]
    sent = fake.fake.received[0].body
    assert message["usage"] == {
        "input_tokens": inputTokensFor(sent),
        "output_tokens": usageFor(Scenario(), sent).outputTokens,
        "cache_read_input_tokens": 0,
    }


@pytest_twisted.ensureDeferred
async def test_openaiJson(serve: Serve, http: HTTPClient) -> None:
    """
    A non-streamed completion is one JSON body.
    """
    fake = await serve()
    status, _, body = await call(http, fake, CODING_CHAT, {"stream": False})
    assert status == 200
    completion = json.loads(body)
    assert completion["choices"][0]["message"]["content"] == "hello " * 5
    assert completion["request_id"] == completion["id"]


@pytest_twisted.ensureDeferred
async def test_countTokens(serve: Serve, http: HTTPClient) -> None:
    """
    count_tokens answers with the input count the usage would report, and
    can be turned into a 404 for gateways that lack it.
    """
    fake = await serve()
    request = {"model": "claude-x", "messages": [{"role": "user", "content": "hi " * 100}]}
    status, _, body = await call(http, fake, COUNT + "?beta=true", request)
    assert status == 200
    assert json.loads(body) == {"input_tokens": inputTokensFor(json.dumps(request).encode())}
    status, _, body = await call(http, fake, COUNT, request, scenario="mode=not-found")
    assert status == 404
    assert json.loads(body)["type"] == "error"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", [O_MODELS, CODING_MODELS])
async def test_openaiModels(serve: Serve, http: HTTPClient, path: str) -> None:
    """
    The OpenAI model list.
    """
    fake = await serve()
    status, _, body = await call(http, fake, path, method="GET")
    assert status == 200
    listing = json.loads(body)
    assert listing["object"] == "list"
    assert "glm-4.7" in [m["id"] for m in listing["data"]]


@pytest_twisted.ensureDeferred
async def test_anthropicModels(serve: Serve, http: HTTPClient) -> None:
    """
    The Anthropic model list, query string ignored.
    """
    fake = await serve()
    status, _, body = await call(http, fake, A_MODELS + "?limit=1000", method="GET")
    assert status == 200
    listing = json.loads(body)
    assert listing["has_more"] is False
    assert listing["data"][0]["type"] == "model"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "method, path, anthropic",
    [
        ("POST", "/api/anthropic/v1/complete", True),
        ("GET", MESSAGES, True),
        ("POST", "/v1/chat/completions", False),
        ("POST", "/api/paas/v4/embeddings", False),
        ("GET", "/", False),
    ],
)
async def test_unknownRoutes(serve: Serve, http: HTTPClient, method: str, path: str, anthropic: bool) -> None:
    """
    Anything else is a 404 with a JSON error in the path's envelope.
    """
    fake = await serve(apiKey=KEY)
    status, _, body = await call(http, fake, path, {} if method == "POST" else None, method=method)
    assert status == 404
    error = json.loads(body)
    if anthropic:
        assert error["type"] == "error" and error["error"]["type"] == "404"
    else:
        assert error["error"]["code"] == "404"
    assert fake.fake.received[0].route is None


# auth


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "path, headers, status",
    [
        (MESSAGES, {"x-api-key": KEY}, 200),
        (MESSAGES, {"Authorization": f"Bearer {KEY}"}, 200),
        (MESSAGES, {"Authorization": f"bearer {KEY}"}, 200),
        (MESSAGES, {}, 401),
        (MESSAGES, {"x-api-key": "wrong"}, 401),
        (MESSAGES, {"Authorization": "Bearer wrong"}, 401),
        (MESSAGES, {"Authorization": KEY}, 401),
        (COUNT, {"x-api-key": KEY}, 200),
        (A_MODELS, {}, 401),
        (CHAT, {"Authorization": f"Bearer {KEY}"}, 200),
        (CHAT, {"x-api-key": KEY}, 401),
        (CODING_CHAT, {}, 401),
        (CODING_MODELS, {"Authorization": "Bearer nope"}, 401),
        (O_MODELS, {"Authorization": f"Bearer {KEY}"}, 200),
    ],
)
async def test_auth(serve: Serve, http: HTTPClient, path: str, headers: dict[str, str], status: int) -> None:
    """
    With a key set, Anthropic endpoints take C{x-api-key} or a bearer
    token, OpenAI endpoints a bearer token; failures are 401 in the
    endpoint's envelope.
    """
    fake = await serve(apiKey=KEY)
    method = "GET" if path.endswith("models") else "POST"
    got, _, body = await call(http, fake, path, {} if method == "POST" else None, headers, method=method)
    assert got == status
    if status == 401:
        error = json.loads(body)
        if path.startswith("/api/anthropic"):
            assert error["type"] == "error"
            assert error["error"]["type"] in ("1001", "1002")
        else:
            assert error["error"]["code"] in ("1001", "1002")


@pytest_twisted.ensureDeferred
async def test_noKeyAcceptsAll(serve: Serve, http: HTTPClient) -> None:
    """
    Without a key any request is accepted.
    """
    fake = await serve()
    status, _, _ = await call(http, fake, CHAT, {}, {"Authorization": "Bearer whatever"})
    assert status == 200


# bad requests


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'"text"'])
async def test_malformedJson(serve: Serve, http: HTTPClient, body: bytes) -> None:
    """
    A POST body that is not a JSON object gets 400 code 1210.
    """
    fake = await serve()
    status, _, answer = await call(http, fake, MESSAGES, body)
    assert status == 400
    assert json.loads(answer)["error"]["type"] == "1210"
    status, _, answer = await call(http, fake, CHAT, body)
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "1210"


@pytest_twisted.ensureDeferred
async def test_badScenarioHeader(serve: Serve, http: HTTPClient) -> None:
    """
    A bad scenario header is the test's bug: 400 with code "fake" saying
    what is wrong.
    """
    fake = await serve()
    status, _, body = await call(http, fake, MESSAGES, {}, scenario="mode=explode")
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "fake"
    assert "explode" in error["message"] and "mode" in error["message"]


# scenario selection


@pytest_twisted.ensureDeferred
async def test_scenarioPrecedence(serve: Serve, http: HTTPClient) -> None:
    """
    The header beats the queue, which beats the defaults; a header names
    only what it changes; only model requests consume the queue.
    """
    fake = await serve(defaults=Scenario(events=2, deltaText="d"))
    fake.fake.queue.extend([Scenario(events=3, deltaText="q"), Scenario(events=4, deltaText="r")])

    def text(body: bytes) -> str:
        return "".join(d["delta"]["text"] for n, d in sse(body) if n == "content_block_delta")

    _, _, body = await call(http, fake, MESSAGES, {"stream": True}, scenario="events=1")
    assert text(body) == "d"
    assert len(fake.fake.queue) == 2
    await call(http, fake, COUNT, {})
    await call(http, fake, A_MODELS, method="GET")
    assert len(fake.fake.queue) == 2
    _, _, body = await call(http, fake, MESSAGES, {"stream": True})
    assert text(body) == "qqq"
    _, _, body = await call(http, fake, CHAT, {"stream": False})
    assert json.loads(body)["choices"][0]["message"]["content"] == "rrrr"
    _, _, body = await call(http, fake, MESSAGES, {"stream": True})
    assert text(body) == "dd"
    assert [r.scenario.events for r in fake.fake.received if r.scenario] == [1, 2, 2, 3, 4, 2]


@pytest_twisted.ensureDeferred
async def test_cookie(serve: Serve, http: HTTPClient) -> None:
    """
    C{cookie=true} adds a numbered C{Set-Cookie}.
    """
    fake = await serve()
    _, headers, _ = await call(http, fake, CHAT, {}, scenario="cookie=true")
    assert headers.getRawHeaders("set-cookie") == ["zfake=1; Path=/"]
    _, headers, _ = await call(http, fake, MESSAGES, {"stream": True}, scenario="cookie=1")
    assert headers.getRawHeaders("set-cookie") == ["zfake=2; Path=/"]
    _, headers, _ = await call(http, fake, MESSAGES, {})
    assert headers.getRawHeaders("set-cookie") is None


# recording


@pytest_twisted.ensureDeferred
async def test_recordsRequests(reactor: Any, serve: Serve) -> None:
    """
    Every request is recorded with its raw target, every header pair
    (repeats kept), the exact body bytes and the time; C{whenReceived}
    waits for the n-th one.
    """
    fake = await serve(fake=FakeZai(FrozenClock(reactor, 1000.0)))
    second = fake.fake.whenReceived(2)
    assert not second.called
    body = '{"stream": false, "text": "h\u00e9llo \u4e16\u754c"}'.encode()
    client = await rawRequest(
        reactor,
        fake.port,
        b"POST",
        b"/api/anthropic/v1/messages?beta=true&x=1",
        [
            (b"X-Api-Key", b"k1"),
            (b"anthropic-beta", b"a"),
            (b"Anthropic-Beta", b"b"),
            (b"Content-Type", b"application/json"),
        ],
        body,
    )
    await client.closed
    first = await fake.fake.whenReceived(1)
    assert first.number == 1
    assert first.method == b"POST"
    assert first.uri == b"/api/anthropic/v1/messages?beta=true&x=1"
    assert first.path == b"/api/anthropic/v1/messages"
    assert first.query == b"beta=true&x=1"
    assert first.body == body
    assert first.json()["text"] == "h\u00e9llo \u4e16\u754c"
    assert first.header(b"ANTHROPIC-BETA") == [b"a", b"b"]
    assert first.header(b"x-api-key") == [b"k1"]
    assert (b"anthropic-beta", b"b") in [(k.lower(), v) for k, v in first.headers]
    assert first.receivedAt == 1000.0
    assert first.statusCode == 200
    assert await first.done == "completed"
    assert first.disconnectedAt is None
    assert first.bytesSent == len(client.response().body)

    client = await rawRequest(reactor, fake.port, b"GET", b"/api/paas/v4/models")
    await client.closed
    assert (await second).path == b"/api/paas/v4/models"
    assert (await fake.fake.whenReceived(2)).query is None
    with pytest.raises(ValueError):
        fake.fake.whenReceived(0)


# error modes


CODES = sorted(
    [
        "1302",
        "1303",
        "1305",
        "1308",
        "1310",
        "1312",
        "1113",
        "1210",
        "1211",
        "1214",
        "1261",
        "1000",
        "1001",
        "1002",
        "1003",
        "1004",
        "401",
        "500",
        "4242",
    ]
)
EXPECTED_STATUS = {"1210": 400, "1211": 400, "1214": 400, "1261": 400, "4242": 400, "500": 500}


@pytest_twisted.ensureDeferred
async def test_errorCodes(reactor: Any, serve: Serve, http: HTTPClient) -> None:
    """
    C{mode=error} answers each code with its status and Z.AI's body, in
    the Anthropic envelope on the Anthropic endpoint and the OpenAI one on
    the chat endpoints.
    """
    clock = FrozenClock(reactor, 1767225600.0)
    fake = await serve(fake=FakeZai(clock))
    for code in CODES:
        expected = EXPECTED_STATUS.get(code, 401 if code.startswith("100") or code == "401" else 429)
        message = errorMessage(code, clock.now, 3600)
        for path in (MESSAGES, CHAT):
            status, headers, body = await call(
                http, fake, path, {"stream": True}, scenario=f"mode=error code={code}"
            )
            assert status == expected, (code, path)
            assert headers.getRawHeaders("retry-after") is None
            assert headers.getRawHeaders("content-type") == ["application/json; charset=UTF-8"]
            error = json.loads(body)
            if path == MESSAGES:
                assert error["type"] == "error"
                assert error["error"] == {"type": code, "message": message}
                assert error["request_id"]
            else:
                assert error == {"error": {"code": code, "message": message}}


@pytest_twisted.ensureDeferred
async def test_errorOptions(serve: Serve, http: HTTPClient) -> None:
    """
    The status can be forced, the Anthropic endpoint can use the OpenAI
    envelope, and Retry-After can be added in the body and as a header.
    """
    fake = await serve()
    status, headers, body = await call(
        http,
        fake,
        MESSAGES,
        {},
        scenario="mode=error code=1305 status=529 envelope=openai retryAfter=3 retryAfterHeader=2.5",
    )
    assert status == 529
    assert headers.getRawHeaders("retry-after") == ["2.5"]
    error = json.loads(body)
    assert "type" not in error
    assert error["error"]["code"] == "1305"
    assert error["error"]["retry_after"] == 3
    assert error["request_id"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", [MESSAGES, CHAT])
async def test_inbandError(serve: Serve, http: HTTPClient, path: str) -> None:
    """
    An in-band error is an HTTP 200 stream whose first event is Z.AI's
    error frame, ending cleanly.
    """
    fake = await serve()
    status, _, body = await call(http, fake, path, {"stream": True}, scenario="mode=inband-error code=1310")
    assert status == 200
    events = sse(body)
    assert len(events) == 1
    name, data = events[0]
    assert data["error"]["code"] == "1310"
    assert data["error"]["message"].startswith("Weekly/Monthly Limit Exhausted.")
    if path == MESSAGES:
        assert name == "error"
        assert data["request_id"]
    else:
        assert name is None
    assert await fake.fake.received[0].done == "completed"


@pytest_twisted.ensureDeferred
async def test_inbandErrorAfterContent(serve: Serve, http: HTTPClient) -> None:
    """
    With C{after}, content comes first, then the error, then the end.
    """
    fake = await serve()
    _, _, body = await call(
        http, fake, CHAT, {"stream": True}, scenario="mode=inband-error,code=1305,after=2"
    )
    events = sse(body)
    assert [d["choices"][0]["delta"]["content"] for _, d in events[:2]] == ["hello "] * 2
    assert events[2][1] == {
        "error": {
            "code": "1305",
            "message": "The service may be temporarily overloaded, please try again later",
        }
    }
    assert len(events) == 3


# connection-level modes (raw clients)


def streamRequest(path: str = MESSAGES) -> dict[str, Any]:
    return {"method": b"POST", "path": path.encode(), "body": b'{"stream":true}'}


@pytest_twisted.ensureDeferred
async def test_reset(reactor: Any, serve: Serve) -> None:
    """
    C{reset} drops the connection before sending a byte.
    """
    fake = await serve(defaults=Scenario(mode="reset"))
    client = await rawRequest(reactor, fake.port, **streamRequest())
    await client.closed
    assert client.raw == b""
    record = fake.fake.received[0]
    assert await record.done == "disconnected"
    assert record.abortedByFake
    assert record.disconnectedAt is not None


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path, marker", [(MESSAGES, b"text_delta"), (CHAT, b'"content":"hello "')])
async def test_resetMid(reactor: Any, serve: Serve, path: str, marker: bytes) -> None:
    """
    C{reset-mid} sends headers and C{after} deltas, then drops the
    connection without the chunked terminator.
    """
    fake = await serve(defaults=Scenario(mode="reset-mid", after=3))
    client = await rawRequest(reactor, fake.port, **streamRequest(path))
    await client.closed
    assert client.lostReason is not None
    assert not client.lostReason.check(ConnectionDone)
    response = client.response()
    assert response.status == 200
    assert response.body.count(marker) == 3
    assert not client.raw.endswith(b"0\r\n\r\n")
    assert await fake.fake.received[0].done == "disconnected"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", [MESSAGES, CHAT])
async def test_truncate(reactor: Any, serve: Serve, path: str) -> None:
    """
    C{truncate} ends the HTTP response cleanly but without the closing
    events.
    """
    fake = await serve(defaults=Scenario(mode="truncate"))
    client = await rawRequest(reactor, fake.port, **streamRequest(path))
    await client.closed
    assert client.raw.endswith(b"\r\n0\r\n\r\n")
    body = client.response().body
    assert body.endswith(b"\n\n")
    for closing in (b"message_delta", b"message_stop", b"finish_reason", b"[DONE]"):
        assert closing not in body
    assert await fake.fake.received[0].done == "completed"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["hang", "stall-mid"])
@pytest.mark.parametrize("path", [MESSAGES, CHAT])
async def test_silentUntilClientLeaves(reactor: Any, serve: Serve, mode: str, path: str) -> None:
    """
    C{hang} sends nothing, C{stall-mid} stops after C{after} deltas; both
    keep the connection open with no timers until the client leaves, which
    fires C{done} with "disconnected".
    """
    fake = await serve(defaults=Scenario(mode=mode, after=1))
    calls = len(reactor.getDelayedCalls())
    client = await rawRequest(reactor, fake.port, **streamRequest(path))
    record = await fake.fake.whenReceived(1)
    if mode == "stall-mid":
        await client.when(lambda c: b"hello " in c.raw)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert not record.done.called
    assert fake.fake.inFlight == 1
    if mode == "hang":
        assert client.raw == b""
    else:
        assert client.response().body.count(b"hello ") == 1
        assert record.statusCode == 200
    assert len(reactor.getDelayedCalls()) <= calls + 1  # twisted.web's idle timer at most
    assert client.transport is not None
    client.transport.loseConnection()
    assert await record.done == "disconnected"
    assert record.disconnectedAt is not None
    assert not record.abortedByFake
    assert fake.fake.inFlight == 0


@pytest_twisted.ensureDeferred
async def test_abortAll(reactor: Any, serve: Serve) -> None:
    """
    C{abortAll} frees hanging connections.
    """
    fake = await serve(defaults=Scenario(mode="hang"))
    client = await rawRequest(reactor, fake.port, **streamRequest())
    record = await fake.fake.whenReceived(1)
    fake.fake.abortAll()
    await client.closed
    assert await record.done == "disconnected"


@pytest_twisted.ensureDeferred
async def test_nonStreamFailures(reactor: Any, serve: Serve) -> None:
    """
    On a JSON answer, C{truncate} sends half the body and ends cleanly, and
    C{reset-mid} promises the whole length and drops the connection.
    """
    fake = await serve()
    client = await rawRequest(
        reactor, fake.port, b"POST", CHAT.encode(), [(b"x-fake-scenario", b"mode=truncate")], b"{}"
    )
    await client.closed
    body = client.response().body
    with pytest.raises(ValueError):
        json.loads(body)
    assert body.startswith(b'{"choices"')
    client = await rawRequest(
        reactor, fake.port, b"POST", CHAT.encode(), [(b"x-fake-scenario", b"mode=reset-mid")], b"{}"
    )
    await client.closed
    response = client.response()
    assert int(response.header(b"content-length")[0]) > len(response.body) > 0


# split frames


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", [MESSAGES, CHAT])
async def test_splitReassembles(reactor: Any, serve: Serve, path: str) -> None:
    """
    Split frames arrive in several TCP reads, some ending inside a frame
    (and inside multi-byte characters), and reassemble into exactly the
    bytes of the unsplit stream.
    """
    scenario = Scenario(events=6, deltaText="h\u00e9llo \u4e16\u754c ", thinking=True, tool=True)
    plain = await serve(fake=FakeZai(FrozenClock(reactor)))
    split = await serve(fake=FakeZai(FrozenClock(reactor)))
    spec = formatScenario(scenario)
    headers = [(b"x-fake-scenario", spec.encode())]
    one = await rawRequest(reactor, plain.port, b"POST", path.encode(), headers, b'{"stream":true}')
    splitHeaders = [(b"x-fake-scenario", spec.encode() + b" split=true splitDelay=0.002")]
    two = await rawRequest(reactor, split.port, b"POST", path.encode(), splitHeaders, b'{"stream":true}')
    await one.closed
    await two.closed
    expected = one.response().body
    assert two.response().body == expected
    assert "h\u00e9llo \u4e16\u754c".encode() in expected

    # Where did each read of the split stream end, relative to frame ends?
    start = two.headerEnd()
    offsets = []
    total = 0
    for read in two.reads:
        total += len(read)
        if total > start:
            offsets.append(total - start)
    midFrame = [o for o in offsets[:-1] if not _endsFrame(two.raw[start : start + o])]
    assert len(two.reads) > len(one.reads)
    assert midFrame, "no read ended inside a frame"


def _endsFrame(chunkedPrefix: bytes) -> bool:
    # In chunked encoding a frame end is "\n\n" followed by the chunk CRLF.
    return chunkedPrefix.endswith(b"\n\n\r\n")


# pacing and back-pressure


@pytest_twisted.ensureDeferred
async def test_intervalOrdering(reactor: Any, serve: Serve) -> None:
    """
    With an interval, the client sees the first delta while the fake still
    holds the rest back.
    """
    fake = await serve(defaults=Scenario(events=3, interval=0.3))
    client = await rawRequest(reactor, fake.port, **streamRequest(CHAT))
    await client.when(lambda c: b'"content":"hello "' in c.raw)
    record = fake.fake.received[0]
    assert client.raw.count(b'"content":"hello "') == 1
    assert b"[DONE]" not in client.raw
    sentEarly = record.bytesSent
    await client.closed
    assert client.raw.count(b'"content":"hello "') == 3
    assert record.bytesSent > sentEarly
    assert client.response().body.endswith(b"data: [DONE]\n\n")


@pytest_twisted.ensureDeferred
async def test_backpressure(reactor: Any, serve: Serve) -> None:
    """
    A client that stops reading stalls the fake once the socket buffers
    fill: C{bytesSent} stops growing. When it reads again, the whole stream
    arrives.
    """
    events, size = 20000, 1000
    fake = await serve(defaults=Scenario(events=events, deltaSize=size))
    client = await rawRequest(reactor, fake.port, **streamRequest(CHAT))
    client.connection.pauseProducing()
    record = await fake.fake.whenReceived(1)

    # Wait until the fake stops making progress.
    previous = -1
    while record.bytesSent != previous:
        previous = record.bytesSent
        await task.deferLater(reactor, 0.3, lambda: None)
    stalledAt = record.bytesSent
    await task.deferLater(reactor, 0.3, lambda: None)
    assert record.bytesSent == stalledAt
    assert 0 < stalledAt < events * size
    assert not record.done.called

    client.connection.resumeProducing()
    await client.closed
    body = client.response().body
    assert body.count(b'"content":"') == events + 1
    assert body.endswith(b"data: [DONE]\n\n")
    assert record.bytesSent == len(body)
    assert await record.done == "completed"


# -- hidden capacity and the quota endpoint -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_hiddenCapacity(serve: Serve, http: HTTPClient) -> None:
    """
    With a capacity C, model requests beyond C in any one second get 1303;
    other routes are not counted.
    """
    from twisted.internet import reactor

    from zaiproxy.fake.testing import FrozenClock

    clock = FrozenClock(reactor)  # a frozen second: every request falls in it
    fake = FakeZai(clock)
    fake.capacity = 2
    running = await serve(fake)
    body = {"model": "glm-4.7", "messages": [{"role": "user", "content": "hi"}]}
    codes = [(await call(http, running, MESSAGES, body))[0] for _ in range(3)]
    assert codes == [200, 200, 429]
    status, _, content = await call(http, running, CHAT, body)
    assert status == 429 and json.loads(content)["error"]["code"] == "1303"
    assert (await call(http, running, A_MODELS, method="GET"))[0] == 200
    assert fake.refused == 2
    clock.now += 1.0
    assert (await call(http, running, MESSAGES, body))[0] == 200


@pytest_twisted.ensureDeferred
async def test_quotaEndpoint(serve: Serve, http: HTTPClient) -> None:
    """
    The quota endpoint takes the raw key (or Bearer, or x-api-key) and
    answers the configured document; a wrong key gets Z.AI's 401 envelope.
    """
    running = await serve(apiKey="k.secret")
    path = "/api/monitor/usage/quota/limit"
    for headers in (
        {"authorization": "k.secret"},
        {"authorization": "Bearer k.secret"},
        {"x-api-key": "k.secret"},
    ):
        status, _, content = await call(http, running, path, method="GET", headers=headers)
        assert status == 200
        assert json.loads(content)["data"]["limits"][0]["type"] == "CREDIT_LIMIT"
    status, _, content = await call(http, running, path, method="GET", headers={"authorization": "nope"})
    assert status == 401 and json.loads(content)["success"] is False
    running.fake.quota = b"not json"
    running.fake.quotaStatus = 503
    status, _, content = await call(http, running, path, method="GET", headers={"authorization": "k.secret"})
    assert (status, content) == (503, b"not json")
