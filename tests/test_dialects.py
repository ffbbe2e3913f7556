"""
Tests for L{zaiproxy.dialects}: the proxy's own errors in each envelope.
"""

from __future__ import annotations

import json

from zaiproxy.dialects import Dialect, errorBody, streamErrorEvent


def test_anthropicErrorBody() -> None:
    """
    Anthropic's envelope, with the error type Anthropic uses for the status.
    """
    assert json.loads(errorBody(Dialect.anthropic, 413, "too big")) == {
        "type": "error",
        "error": {"type": "request_too_large", "message": "too big"},
    }
    assert json.loads(errorBody(Dialect.anthropic, 504, "slow"))["error"]["type"] == "api_error"
    assert json.loads(errorBody(Dialect.anthropic, 429, "x", "1302"))["error"] == {
        "type": "rate_limit_error",
        "message": "x",
        "code": "1302",
    }


def test_openaiErrorBody() -> None:
    """
    OpenAI's envelope.
    """
    assert json.loads(errorBody(Dialect.openai, 400, "bad")) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}
    }
    assert json.loads(errorBody(Dialect.openai, 502, "down"))["error"]["type"] == "server_error"


def test_streamErrorEvents() -> None:
    """
    Mid-stream errors are one whole SSE event each.
    """
    anthropic = streamErrorEvent(Dialect.anthropic, "cut")
    assert anthropic.startswith(b"event: error\ndata: ") and anthropic.endswith(b"\n\n")
    assert json.loads(anthropic.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "cut"},
    }
    openai = streamErrorEvent(Dialect.openai, "cut")
    assert openai.startswith(b"data: ") and openai.endswith(b"\n\n")
    assert json.loads(openai[6:])["error"]["message"] == "cut"


# -- what is counted -----------------------------------------------------------

import pytest  # noqa: E402

from zaiproxy.dialects import addUsage, anthropic, openai  # noqa: E402
from zaiproxy.dialects.sse import Event, EventParser  # noqa: E402
from zaiproxy.dialects.usage import Usage  # noqa: E402
from zaiproxy.fake import parseScenario, usageFor  # noqa: E402
from zaiproxy.fake.chat import chatStream  # noqa: E402
from zaiproxy.fake.content import contentFor, idsFor  # noqa: E402
from zaiproxy.fake.messages import messageStream  # noqa: E402

CLAUDE_CODE_REQUEST = {
    "model": "claude-sonnet-5",
    "max_tokens": 32000,
    "stream": True,
    "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.88;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [
        {"role": "user", "content": "Read a.py"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "EqQB"},
                {"type": "redacted_thinking", "data": "opaque-encrypted"},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "a.py"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "print(1)"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [
                        {"type": "text", "text": "nested"},
                        {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                    ],
                },
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0"}},
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "doc text"},
                },
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0"},
                },
                {"type": "text", "text": "now fix it", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ],
    "tools": [
        {
            "name": "Read",
            "description": "Read a file",
            "input_schema": {"type": "object"},
            "cache_control": {"type": "ephemeral"},
        }
    ],
}


def test_anthropicRequestTexts() -> None:
    """
    Everything the model reads is counted: system blocks, text, thinking,
    tool inputs and results (nested too), text documents and tool
    definitions; images, PDFs and redacted thinking are not.
    """
    assert anthropic.requestTexts(CLAUDE_CODE_REQUEST) == [
        "x-anthropic-billing-header: cc_version=2.1.88;",
        "You are Claude Code.",
        "Read a.py",
        "I should read it.",
        '{"file_path":"a.py"}',
        "print(1)",
        "nested",
        "doc text",
        "now fix it",
        '{"name":"Read","description":"Read a file","input_schema":{"type":"object"}}',
    ]
    assert anthropic.requestTexts(
        {"system": "plain system", "messages": [{"role": "user", "content": "hi"}]}
    ) == ["plain system", "hi"]
    assert anthropic.requestTexts(["not", "a", "request"]) == []
    assert anthropic.requestTexts({"messages": "garbage", "tools": 3}) == []


def test_openaiRequestTexts() -> None:
    """
    Message contents (strings or text parts, not images), carried-over
    reasoning, tool calls and tool definitions.
    """
    body = {
        "model": "glm-4.7",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "thinking it over",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        ],
    }
    assert openai.requestTexts(body) == [
        "Be brief.",
        "look",
        "thinking it over",
        "get_weather",
        '{"city":"Paris"}',
        "sunny",
        '{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}',
    ]


def test_responseTexts() -> None:
    """
    Non-streamed answers: text, thinking and tool inputs; content,
    reasoning and tool arguments.
    """
    assert anthropic.responseTexts(
        {
            "content": [
                {"type": "thinking", "thinking": "hmm"},
                {"type": "text", "text": "Hi"},
                {"type": "tool_use", "input": {"a": 1}},
            ]
        }
    ) == ["hmm", "Hi", '{"a":1}']
    assert openai.responseTexts(
        {
            "choices": [
                {
                    "message": {
                        "content": "Hi",
                        "reasoning_content": "hmm",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                    }
                }
            ]
        }
    ) == ["Hi", "hmm", "f", "{}"]


def test_usageFrom() -> None:
    """
    Reported usage in both shapes; OpenAI's cached tokens are moved out of
    the prompt count into cache_read.
    """
    assert anthropic.usageFrom(
        {"input_tokens": 19, "output_tokens": 5, "cache_read_input_tokens": 12928}
    ) == Usage(19, 5, 12928, 0)
    assert anthropic.usageFrom({"input_tokens": 1, "cache_creation_input_tokens": 7}) == Usage(1, 0, 0, 7)
    assert anthropic.usageFrom(None) is None
    assert openai.usageFrom(
        {
            "prompt_tokens": 81,
            "completion_tokens": 186,
            "total_tokens": 267,
            "prompt_tokens_details": {"cached_tokens": 6},
        }
    ) == Usage(75, 186, 6, 0)
    assert openai.usageFrom({"prompt_tokens": "x", "completion_tokens": -3}) == Usage(0, 0, 0, 0)
    assert openai.usageJSON(Usage(75, 186, 6)) == {
        "prompt_tokens": 81,
        "completion_tokens": 186,
        "total_tokens": 267,
        "prompt_tokens_details": {"cached_tokens": 6},
    }


def stream(spec: str, dialect: str) -> list[Event]:
    scenario = parseScenario(spec)
    body = b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}]}'
    frames = (messageStream if dialect == "anthropic" else chatStream)(
        scenario, contentFor(scenario), usageFor(scenario, body), idsFor(1, 1767225600.0)
    )
    return EventParser().feed(b"".join(f.data for f in frames))


def test_anthropicStreamReader() -> None:
    """
    Z.AI's stream: 0/0 in message_start, the numbers in message_delta; the
    reader keeps the larger of each, and the output text of every kind.
    """
    scenario = parseScenario("events=3 thinking=true tool=true deltaText=ab")
    expected = usageFor(scenario, b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}]}')
    reader = anthropic.StreamReader()
    events = stream("events=3 thinking=true tool=true deltaText=ab", "anthropic")
    assert [reader.event(e) for e in events] == [None] * len(events)
    assert reader.usage == Usage(expected.inputTokens, expected.outputTokens, expected.cacheReadTokens, 0)
    assert reader.model == "glm-4.7"
    thinking, text, tool = reader.output.texts()
    assert text == "ababab" and thinking and tool.startswith("{")
    assert reader.error is None


def test_anthropicStreamWithoutUsage() -> None:
    """
    A stream without usage is flagged at message_start and message_delta.
    """
    reader = anthropic.StreamReader()
    flags = [reader.event(e) for e in stream("events=2 usage=none", "anthropic")]
    assert [f for f in flags if f] == ["start", "delta"]
    assert reader.usage is None


def test_anthropicFramesKeptRaw() -> None:
    """
    Whole frames are kept unparsed unless they hold message_start,
    message_delta or an error: those carry usage, the model or the error.
    """
    scenario = parseScenario("events=2")
    body = b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}]}'
    frames = messageStream(scenario, contentFor(scenario), usageFor(scenario, body), idsFor(1, 1767225600.0))
    reader = anthropic.StreamReader()
    kept = {
        f.data.split(b"\n", 1)[0][len(b"event: ") :].decode(): reader.cut(f.data) == [(False, f.data)]
        for f in frames
    }
    assert kept == {
        "message_start": False,
        "content_block_start": True,
        "ping": True,
        "content_block_delta": True,
        "content_block_stop": True,
        "message_delta": False,
        "message_stop": True,
    }
    error = b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"x"}}\n\n'
    assert reader.cut(error) == [(True, error)]


def test_openaiStreamReader() -> None:
    """
    Usage from the last content chunk; without usage, [DONE] is flagged.
    """
    reader = openai.StreamReader()
    assert all(reader.event(e) is None for e in stream("events=2 cacheRead=4", "openai"))
    assert reader.usage is not None and reader.usage.cacheRead == 4
    reader = openai.StreamReader()
    flags = [reader.event(e) for e in stream("events=2 usage=none", "openai")]
    assert [f for f in flags if f] == ["done"]
    assert reader.output.texts() == ["hello hello "]


def test_inbandErrors() -> None:
    """
    Errors inside a 200 stream are read with their Z.AI code.
    """
    reader = anthropic.StreamReader()
    [event] = EventParser().feed(
        b'event: error\ndata: {"error":{"code":"1310","message":"Weekly/Monthly Limit Exhausted"},'
        b'"request_id":"r"}\n\n'
    )
    reader.event(event)
    assert reader.error is not None
    assert (reader.error.code, reader.error.cls) == ("1310", "quota")
    chatReader = openai.StreamReader()
    [event] = EventParser().feed(b'data: {"error":{"code":"1305","message":"busy"}}\n\n')
    chatReader.event(event)
    assert chatReader.error is not None
    assert (chatReader.error.code, chatReader.error.cls) == ("1305", "frequency")


def test_injection() -> None:
    """
    Usage is added in each dialect's own shape.
    """
    [start, *_] = stream("events=1 usage=none", "anthropic")
    frame = anthropic.frameWithUsage(start, "start", Usage())
    [parsed] = EventParser().feed(frame)
    assert parsed.name == b"message_start"
    assert json.loads(parsed.data)["message"]["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    reader = openai.StreamReader()
    for event in stream("events=1 usage=none", "openai"):
        reader.event(event)
    [chunk] = EventParser().feed(reader.usageChunk(Usage(10, 3)))
    document = json.loads(chunk.data)
    assert document["choices"] == [] and document["usage"]["total_tokens"] == 13
    assert document["id"] == json.loads(stream("events=1 usage=none", "openai")[0].data)["id"]


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"id":"x","content":[]}', b'{"id":"x","content":[],"usage":{"a":1}}'),
        (b'{ "id" : "x" }\n', b'{ "id" : "x","usage":{"a":1}}\n'),
        (b"{}", b'{"usage":{"a":1}}'),
        (b"[1]", None),
        (b"", None),
    ],
)
def test_addUsage(body: bytes, expected: bytes | None) -> None:
    """
    Usage is added as text: every byte the upstream sent stays as it was.
    """
    assert addUsage(body, {"a": 1}) == expected
