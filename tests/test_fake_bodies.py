"""
Tests for the fake's pure builders: error bodies, usage numbers, ids, the
Anthropic and OpenAI frames and bodies, and the script that paces, splits
and breaks them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from zaiproxy.fake import chat, messages
from zaiproxy.fake.content import (
    THINKING_DELTAS,
    contentFor,
    idsFor,
    inputTokensFor,
    usageFor,
)
from zaiproxy.fake.errors import (
    errorBody,
    errorMessage,
    inbandErrorBody,
    resetStamp,
    statusForCode,
)
from zaiproxy.fake.scenario import Scenario
from zaiproxy.fake.script import (
    Abort,
    Finish,
    Headers,
    Stall,
    Wait,
    Write,
    bodyScript,
    splitFrame,
    streamScript,
)

#: 2026-01-01 00:00:00 UTC, i.e. 08:00:00 in Beijing.
NOW = 1767225600.0


def sseEvents(data: bytes) -> list[tuple[str | None, Any]]:
    """
    Parse an SSE body strictly: every event ends with a blank line.
    """
    assert data.endswith(b"\n\n")
    events: list[tuple[str | None, Any]] = []
    for block in data[:-2].split(b"\n\n"):
        name = None
        payload = None
        for line in block.split(b"\n"):
            field, _, value = line.partition(b": ")
            if field == b"event":
                name = value.decode()
            elif field == b"data":
                payload = value.decode()
            else:
                raise AssertionError(f"unexpected line {line!r}")
        assert payload is not None
        events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


def streamBytes(dialect: str, scenario: Scenario, body: bytes = b"x" * 40) -> bytes:
    content = contentFor(scenario)
    usage = usageFor(scenario, body)
    ids = idsFor(1, NOW)
    module: Any = messages if dialect == "anthropic" else chat
    build = module.messageStream if dialect == "anthropic" else module.chatStream
    return b"".join(f.data for f in build(scenario, content, usage, ids))


# errors


STATUS_TABLE = {
    "1302": 429,
    "1303": 429,
    "1305": 429,
    "1308": 429,
    "1310": 429,
    "1312": 429,
    "1113": 429,
    "1210": 400,
    "1211": 400,
    "1214": 400,
    "1261": 400,
    "1000": 401,
    "1001": 401,
    "1002": 401,
    "1003": 401,
    "1004": 401,
    "401": 401,
    "500": 500,
    "9999": 400,
}


@pytest.mark.parametrize("code, status", sorted(STATUS_TABLE.items()))
def test_statusForCode(code: str, status: int) -> None:
    """
    Throttling and quota codes are 429, bad requests 400, auth 401.
    """
    assert statusForCode(code) == status


def test_resetStampIsBeijingTime() -> None:
    """
    Reset stamps are naive UTC+8 times, C{resetIn} seconds ahead.
    """
    assert resetStamp(NOW, 0) == "2026-01-01 08:00:00"
    assert resetStamp(NOW, 3600) == "2026-01-01 09:00:00"


@pytest.mark.parametrize(
    "code, text",
    [
        ("1302", "Rate limit reached for requests"),
        ("1305", "The service may be temporarily overloaded, please try again later"),
        (
            "1308",
            "Usage limit reached for 5 hour. Your limit will reset at 2026-01-01 09:00:00",
        ),
        (
            "1310",
            "Weekly/Monthly Limit Exhausted. Your limit will reset at 2026-01-01 09:00:00",
        ),
        ("1113", "Insufficient balance or no resource package. Please recharge."),
        ("1211", "Unknown Model"),
        ("1261", "Prompt too long"),
    ],
)
def test_messages(code: str, text: str) -> None:
    """
    The English messages follow Z.AI's, with a deterministic reset stamp.
    """
    assert errorMessage(code, NOW, 3600) == text


@pytest.mark.parametrize("code", ["1303", "1312", "1214", "1210", "1001", "500", "77"])
def test_everyCodeHasAMessage(code: str) -> None:
    """
    Every code gets some non-empty message.
    """
    assert errorMessage(code, NOW, 3600)


@pytest.mark.parametrize("code", sorted(STATUS_TABLE))
def test_errorEnvelopes(code: str) -> None:
    """
    The Anthropic endpoint puts the code in C{error.type} with a request id;
    the OpenAI endpoints use C{error.code}; C{envelope=openai} makes the
    Anthropic endpoint use the OpenAI shape (with its request id).
    """
    s = Scenario(mode="error", code=code)
    message = errorMessage(code, NOW, 3600)
    assert errorBody("anthropic", s, NOW, "rid") == {
        "type": "error",
        "error": {"type": code, "message": message},
        "request_id": "rid",
    }
    assert errorBody("openai", s, NOW, "rid") == {"error": {"code": code, "message": message}}
    openaiStyle = Scenario(mode="error", code=code, envelope="openai")
    assert errorBody("anthropic", openaiStyle, NOW, "rid") == {
        "error": {"code": code, "message": message},
        "request_id": "rid",
    }
    anthropicStyle = Scenario(mode="error", code=code, envelope="anthropic")
    assert errorBody("openai", anthropicStyle, NOW, "rid")["error"]["type"] == code


def test_retryAfterInBody() -> None:
    """
    C{retryAfter} adds C{error.retry_after}; absent by default.
    """
    assert "retry_after" not in errorBody("openai", Scenario(), NOW, "r")["error"]
    body = errorBody("openai", Scenario(retryAfter=7), NOW, "r")
    assert body["error"]["retry_after"] == 7
    body = errorBody("anthropic", Scenario(retryAfter=1.5), NOW, "r")
    assert body["error"]["retry_after"] == 1.5


def test_inbandErrorBodies() -> None:
    """
    In-band errors use Z.AI's C{error.code} envelope on both endpoints.
    """
    s = Scenario(mode="inband-error", code="1310")
    message = errorMessage("1310", NOW, 3600)
    assert inbandErrorBody("anthropic", s, NOW, "rid") == {
        "error": {"code": "1310", "message": message},
        "request_id": "rid",
    }
    assert inbandErrorBody("openai", s, NOW, "rid") == {"error": {"code": "1310", "message": message}}


# content, usage, ids


def test_deltaSize() -> None:
    """
    C{deltaSize} repeats or cuts C{deltaText} to exactly that many characters.
    """
    assert contentFor(Scenario(deltaText="abc", deltaSize=7)).textDelta == "abcabca"
    assert contentFor(Scenario(deltaText="abcdef", deltaSize=2)).textDelta == "ab"
    assert contentFor(Scenario(deltaText="", deltaSize=3)).textDelta == "xxx"
    assert contentFor(Scenario(deltaText="é", deltaSize=1000)).textDelta == "é" * 1000


def test_usageNumbers() -> None:
    """
    Input is a quarter of the body bytes, output a quarter of every
    generated character, both at least one.
    """
    body = b"y" * 403
    assert inputTokensFor(body) == 100
    assert inputTokensFor(b"") == 1
    usage = usageFor(Scenario(events=5, deltaText="hello "), body)
    assert (usage.inputTokens, usage.outputTokens) == (100, 7)
    assert (usage.cacheReadTokens, usage.reasoningTokens) == (0, 0)
    assert usageFor(Scenario(events=0), body).outputTokens == 1

    full = usageFor(
        Scenario(events=2, deltaText="abcd", thinking=True, tool=True, cacheRead=50),
        body,
    )
    thinkingChars = len("".join(THINKING_DELTAS))
    toolChars = len('{"city": "Paris"}')
    assert full.outputTokens == (thinkingChars + 8 + toolChars) // 4
    assert full.reasoningTokens == thinkingChars // 4
    assert (full.promptTokens, full.totalTokens) == (150, 150 + full.outputTokens)


def test_ids() -> None:
    """
    Ids look like Z.AI's (a Beijing-time stamp and 16 hex digits) and depend
    only on the request number and the clock.
    """
    ids = idsFor(3, NOW)
    assert ids.base.startswith("20260101080000")
    assert len(ids.base) == 30
    int(ids.base[14:], 16)
    assert ids == idsFor(3, NOW)
    assert ids != idsFor(4, NOW)
    assert ids.messageId(True) == "msg_" + ids.base
    assert ids.messageId(False) == ids.base
    assert ids.created == int(NOW)


# Anthropic


def test_anthropicStreamShape() -> None:
    """
    message_start with Z.AI's 0/0 usage, ping, one text block, message_delta
    with the real usage, message_stop.
    """
    events = sseEvents(streamBytes("anthropic", Scenario(events=3)))
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for name, data in events:
        assert data["type"] == name
    start = events[0][1]["message"]
    assert start["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert start["model"] == "glm-4.7"
    assert start["id"].startswith("msg_")
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "hello "}
    assert events[7][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": 10,
            "output_tokens": 4,
            "cache_read_input_tokens": 0,
            "server_tool_use": {"web_search_requests": 0},
            "service_tier": "standard",
        },
    }


def test_anthropicCompactJson() -> None:
    """
    Frames are C{event:}/C{data:} pairs of compact JSON.
    """
    raw = streamBytes("anthropic", Scenario(events=1))
    assert raw.startswith(b'event: message_start\ndata: {"type":"message_start",')
    assert b", " not in raw.replace(b'", "', b"")


def test_anthropicThinkingAndTool() -> None:
    """
    Thinking, then text, then a tool call, each block with its own index.
    """
    events = sseEvents(streamBytes("anthropic", Scenario(events=2, thinking=True, tool=True)))
    starts = [d for n, d in events if n == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "thinking"),
        (1, "text"),
        (2, "tool_use"),
    ]
    deltas = [d for n, d in events if n == "content_block_delta"]
    thinking = "".join(d["delta"].get("thinking", "") for d in deltas if d["index"] == 0)
    assert thinking == "".join(THINKING_DELTAS)
    assert deltas[len(THINKING_DELTAS)]["delta"]["type"] == "signature_delta"
    arguments = "".join(d["delta"]["partial_json"] for d in deltas if d["index"] == 2)
    assert json.loads(arguments) == {"city": "Paris"}
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_anthropicUsageModes() -> None:
    """
    C{start} reports input up front and cumulative output at the end;
    C{none} reports no usage at all.
    """
    events = sseEvents(streamBytes("anthropic", Scenario(usage="start", cacheRead=5)))
    assert events[0][1]["message"]["usage"] == {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 5,
        "output_tokens": 1,
    }
    assert events[-2][1]["usage"] == {"output_tokens": 7}
    raw = streamBytes("anthropic", Scenario(usage="none"))
    assert b"usage" not in raw


def test_anthropicOptions() -> None:
    """
    Model name, id prefix and stop reason follow the scenario.
    """
    s = Scenario(model="glm-5", msgPrefix=False, stopReason="model_context_window_exceeded")
    events = sseEvents(streamBytes("anthropic", s))
    assert events[0][1]["message"]["model"] == "glm-5"
    assert not events[0][1]["message"]["id"].startswith("msg_")
    assert events[-2][1]["delta"]["stop_reason"] == "model_context_window_exceeded"


def test_anthropicBody() -> None:
    """
    A non-streamed message has every block and the usage Z.AI reports.
    """
    s = Scenario(events=2, thinking=True, tool=True, cacheRead=3)
    body = messages.messageBody(s, contentFor(s), usageFor(s, b"z" * 80), idsFor(1, NOW))
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use"]
    assert body["content"][1]["text"] == "hello hello "
    assert body["content"][2]["input"] == {"city": "Paris"}
    assert body["stop_reason"] == "tool_use"
    assert body["usage"]["input_tokens"] == 20
    assert body["usage"]["cache_read_input_tokens"] == 3
    none = Scenario(usage="none")
    assert "usage" not in messages.messageBody(none, contentFor(none), usageFor(none, b""), idsFor(1, NOW))


def test_anthropicModels() -> None:
    """
    The model list has Anthropic's shape.
    """
    body = messages.modelsBody()
    assert body["has_more"] is False
    assert {
        "id": "glm-4.7",
        "display_name": "GLM-4.7",
        "type": "model",
        "created_at": "2025-12-22T00:00:00Z",
    } in body["data"]
    assert body["first_id"] == body["data"][0]["id"]
    assert body["last_id"] == body["data"][-1]["id"]


# OpenAI


def test_openaiStreamShape() -> None:
    """
    C{data:}-only chunks with one id, the role in every delta, usage and
    C{finish_reason} on the final chunk, then C{[DONE]}.
    """
    events = sseEvents(streamBytes("openai", Scenario(events=3)))
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [d for _, d in events[:-1]]
    assert len(chunks) == 4
    assert len({c["id"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "glm-4.7"
        assert c["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == [
        "hello ",
        "hello ",
        "hello ",
        "",
    ]
    assert "finish_reason" not in chunks[0]["choices"][0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_openaiStreamWithoutDone() -> None:
    """
    C{done=false} ends the stream after the C{finish_reason} chunk, with
    no C{[DONE]}; the rest is as usual.
    """
    complete = streamBytes("openai", Scenario(events=3))
    assert streamBytes("openai", Scenario(events=3, done=False)) == complete[: -len(b"data: [DONE]\n\n")]
    assert complete.endswith(b"\n\ndata: [DONE]\n\n")


def test_openaiThinkingAndTool() -> None:
    """
    C{reasoning_content} first, then content, then tool-call fragments by
    index; the finish reason says C{tool_calls}.
    """
    events = sseEvents(streamBytes("openai", Scenario(events=1, thinking=True, tool=True)))
    deltas = [d["choices"][0]["delta"] for _, d in events[:-2]]
    assert [d.get("reasoning_content") for d in deltas[:3]] == list(THINKING_DELTAS)
    assert deltas[3]["content"] == "hello "
    calls = [d["tool_calls"][0] for d in deltas[4:]]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert all(c["index"] == 0 for c in calls)
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert events[-2][1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openaiUsageModes() -> None:
    """
    C{start} sends OpenAI's own extra usage chunk with no choices; C{none}
    sends no usage.
    """
    events = sseEvents(streamBytes("openai", Scenario(usage="start")))
    assert "usage" not in events[-3][1]
    assert events[-2][1]["choices"] == []
    assert events[-2][1]["usage"]["prompt_tokens"] == 10
    assert b"usage" not in streamBytes("openai", Scenario(usage="none"))


def test_openaiBody() -> None:
    """
    A non-streamed completion carries Z.AI's C{request_id} and the usage.
    """
    s = Scenario(events=2, thinking=True, tool=True)
    body = chat.chatBody(s, contentFor(s), usageFor(s, b"z" * 80), idsFor(1, NOW))
    message = body["choices"][0]["message"]
    assert message["content"] == "hello hello "
    assert message["reasoning_content"] == "".join(THINKING_DELTAS)
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["object"] == "chat.completion"
    assert body["request_id"] == body["id"]
    assert body["usage"]["prompt_tokens"] == 20


def test_openaiModels() -> None:
    """
    The model list has OpenAI's shape.
    """
    body = chat.modelsBody()
    assert body["object"] == "list"
    assert {"id": "glm-4.7", "object": "model", "created": 1766332800, "owned_by": "z-ai"} in body["data"]


# the script


def writes(actions: list[Any]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Write))


def script(dialect: str, scenario: Scenario) -> list[Any]:
    content = contentFor(scenario)
    usage = usageFor(scenario, b"")
    ids = idsFor(1, NOW)
    if dialect == "anthropic":
        frames = messages.messageStream(scenario, content, usage, ids)
        error = messages.event("error", inbandErrorBody("anthropic", scenario, NOW, "r"))
    else:
        frames = chat.chatStream(scenario, content, usage, ids)
        error = chat.chunk(inbandErrorBody("openai", scenario, NOW, "r"))
    return list(streamScript(scenario, [(b"X", b"y")], frames, error))


def textDeltas(data: bytes, dialect: str) -> int:
    return data.count(b'"text_delta"') if dialect == "anthropic" else data.count(b'"content":"hello "')


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
def test_scriptOk(dialect: str) -> None:
    """
    A healthy stream: headers, every frame, finish.
    """
    actions = script(dialect, Scenario())
    assert actions[0] == Headers(200, [(b"X", b"y")])
    assert actions[-1] == Finish()
    assert writes(actions) == streamBytes(dialect, Scenario(), b"")


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
def test_scriptPacing(dialect: str) -> None:
    """
    Content deltas after the first wait C{interval}; C{firstByteDelay} comes
    before the headers.
    """
    actions = script(dialect, Scenario(events=4, interval=0.5, firstByteDelay=2))
    assert actions[:2] == [Wait(2), Headers(200, [(b"X", b"y")])]
    assert actions.count(Wait(0.5)) == 3


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
@pytest.mark.parametrize(
    "mode, last", [("reset-mid", Abort()), ("stall-mid", Stall()), ("truncate", Finish())]
)
def test_scriptMidFailures(dialect: str, mode: str, last: object) -> None:
    """
    The mid-stream failures send C{after} deltas and none of the closing
    frames, then abort, stall or finish.
    """
    for after in (0, 2, 50):
        actions = script(dialect, Scenario(mode=mode, after=after))
        assert actions[-1] == last
        data = writes(actions)
        assert textDeltas(data, dialect) == min(after, 5)
        assert b"message_delta" not in data
        assert b"message_stop" not in data
        assert b"finish_reason" not in data
        assert b"[DONE]" not in data


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
def test_scriptInbandError(dialect: str) -> None:
    """
    An in-band error comes first by default, or after C{after} deltas, then
    the stream ends cleanly.
    """
    first = script(dialect, Scenario(mode="inband-error", code="1310"))
    data = writes(first)
    assert [type(a) for a in first] == [Headers, Write, Finish]
    if dialect == "anthropic":
        assert data.startswith(b'event: error\ndata: {"error":{"code":"1310",')
    else:
        assert data.startswith(b'data: {"error":{"code":"1310",')
    later = writes(script(dialect, Scenario(mode="inband-error", code="1305", after=3)))
    assert textDeltas(later, dialect) == 3
    assert later.endswith(b"\n\n")
    assert b'"code":"1305"' in later.split(b"\n\n")[-2]


def test_splitFrameCuts() -> None:
    """
    Every frame is cut in at least two pieces, at varying places: inside
    the terminator, inside a multi-byte character, and elsewhere.
    """
    frame = 'data: {"text":"héllo wörld"}\n\n'.encode()
    cutsSeen = set()
    for number in range(8):
        pieces = splitFrame(frame, number)
        assert len(pieces) >= 2
        assert b"".join(pieces) == frame
        assert all(pieces)
        offsets = [sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces))]
        cutsSeen.update(offsets)
        # some cut always lands inside a multi-byte character
        assert any(frame[o] & 0xC0 == 0x80 for o in offsets)
    assert len(frame) - 1 in cutsSeen  # between the two newlines
    assert splitFrame(b"x", 0) == [b"x"]


def test_scriptSplit() -> None:
    """
    With C{split}, each frame becomes several writes C{splitDelay} apart and
    the bytes are unchanged.
    """
    plain = script("anthropic", Scenario(events=3))
    split = script("anthropic", Scenario(events=3, split=True, splitDelay=0.01))
    assert writes(split) == writes(plain)
    plainWrites = sum(isinstance(a, Write) for a in plain)
    assert sum(isinstance(a, Write) for a in split) >= 2 * plainWrites
    assert Wait(0.01) in split


def test_bodyScript() -> None:
    """
    Complete bodies carry a Content-Length; C{truncate} sends half chunked
    and finishes; the other mid failures promise all and send half.
    """
    body = b'{"a":"' + b"x" * 100 + b'"}'
    ok = list(bodyScript(Scenario(), 200, [], body))
    assert ok == [Headers(200, [(b"Content-Length", b"108")]), Write(body), Finish()]
    cut = list(bodyScript(Scenario(mode="truncate"), 200, [], body))
    assert cut == [Headers(200, []), Write(body[:54]), Finish()]
    reset = list(bodyScript(Scenario(mode="reset-mid", firstByteDelay=1), 200, [], body))
    assert reset == [
        Wait(1),
        Headers(200, [(b"Content-Length", b"108")]),
        Write(body[:54]),
        Abort(),
    ]
    assert list(bodyScript(Scenario(mode="stall-mid"), 200, [], body))[-1] == Stall()
