"""
The official Anthropic and OpenAI SDKs, pointed straight at the fake, must
parse what it sends: this checks the wire shapes against real consumers.

The SDKs are synchronous, so each conversation runs in a thread
(C{deferToThread}); calling them on the reactor thread would deadlock.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anthropic
import openai
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from zaiproxy.fake import FakeZai, Scenario, usageFor
from zaiproxy.fake.content import THINKING_DELTAS
from zaiproxy.fake.testing import RunningFake, startFake

KEY = "sdk-key.secret"
T = TypeVar("T")


@pytest_twisted.async_yield_fixture
async def fake(reactor: Any) -> AsyncIterator[RunningFake]:
    running = await startFake(reactor, FakeZai(reactor, apiKey=KEY))
    yield running
    await running.stop()


async def withAnthropic(fake: RunningFake, use: Callable[[anthropic.Anthropic], T], key: str = KEY) -> T:
    """
    Run C{use(client)} in a thread with a fresh client, closed afterwards.
    """

    def run() -> T:
        client = anthropic.Anthropic(
            base_url=fake.url("/api/anthropic"), api_key=key, max_retries=0, timeout=20
        )
        try:
            return use(client)
        finally:
            client.close()

    return await deferToThread(run)


async def withOpenAI(fake: RunningFake, use: Callable[[openai.OpenAI], T], key: str = KEY) -> T:
    def run() -> T:
        client = openai.OpenAI(
            base_url=fake.url("/api/coding/paas/v4"), api_key=key, max_retries=0, timeout=20
        )
        try:
            return use(client)
        finally:
            client.close()

    return await deferToThread(run)


#: The same question in each SDK's typed message shape.
ANTHROPIC_USER: list[anthropic.types.MessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]
OPENAI_USER: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]


def expectedUsage(fake: RunningFake, scenario: Scenario) -> Any:
    return usageFor(scenario, fake.fake.received[-1].body)


# Anthropic


@pytest_twisted.ensureDeferred
async def test_anthropicStream(fake: RunningFake) -> None:
    """
    The SDK's stream helper assembles thinking, text and a tool call, and
    takes the usage from C{message_delta} (Z.AI sends 0/0 up front).
    """

    def use(client: anthropic.Anthropic) -> Any:
        with client.messages.stream(
            model="claude-x-1",
            max_tokens=1000,
            messages=ANTHROPIC_USER,
            extra_headers={"x-fake-scenario": "events=4 thinking=true tool=true cacheRead=9"},
            extra_query={"beta": "true"},
        ) as stream:
            texts = list(stream.text_stream)
            return texts, stream.get_final_message()

    texts, message = await withAnthropic(fake, use)
    assert "".join(texts) == "hello " * 4
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "".join(THINKING_DELTAS)
    assert message.content[0].signature
    assert message.content[2].name == "get_weather"
    assert message.content[2].input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"
    assert message.model == "glm-4.7"
    usage = expectedUsage(fake, Scenario(events=4, thinking=True, tool=True, cacheRead=9))
    assert message.usage.input_tokens == usage.inputTokens
    assert message.usage.output_tokens == usage.outputTokens
    assert message.usage.cache_read_input_tokens == 9
    assert fake.fake.received[-1].query == b"beta=true"


@pytest_twisted.ensureDeferred
async def test_anthropicRawEvents(fake: RunningFake) -> None:
    """
    C{create(stream=True)} yields typed events with the Anthropic usage
    semantics when C{usage=start}.
    """

    def use(client: anthropic.Anthropic) -> list[Any]:
        with client.messages.create(
            model="claude-haiku",
            max_tokens=10,
            messages=ANTHROPIC_USER,
            stream=True,
            extra_headers={"x-fake-scenario": "usage=start events=2 msgPrefix=false"},
        ) as events:
            return list(events)

    events = await withAnthropic(fake, use)
    types = [e.type for e in events]
    assert types == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    usage = expectedUsage(fake, Scenario(events=2))
    assert events[0].message.usage.input_tokens == usage.inputTokens
    assert not events[0].message.id.startswith("msg_")
    assert events[-2].usage.output_tokens == usage.outputTokens


@pytest_twisted.ensureDeferred
async def test_anthropicCreate(fake: RunningFake) -> None:
    """
    A non-streamed message parses, as do count_tokens and the model list.
    """

    def use(client: anthropic.Anthropic) -> Any:
        message = client.messages.create(
            model="claude-x-1",
            max_tokens=10,
            messages=ANTHROPIC_USER,
            extra_headers={"x-fake-scenario": "stopReason=model_context_window_exceeded"},
        )
        counted = client.messages.count_tokens(model="claude-x-1", messages=ANTHROPIC_USER)
        models = [m.id for m in client.models.list()]
        return message, counted, models

    message, counted, models = await withAnthropic(fake, use)
    assert message.content[0].text == "hello " * 5
    assert message.stop_reason == "model_context_window_exceeded"
    assert message.usage.input_tokens == usageFor(Scenario(), fake.fake.received[0].body).inputTokens
    assert counted.input_tokens == usageFor(Scenario(), fake.fake.received[1].body).inputTokens
    assert "glm-4.7" in models
    # This SDK version sends its api_key as a bearer token, not x-api-key.
    sent = fake.fake.received[0]
    assert [KEY.encode()] in (
        sent.header(b"x-api-key"),
        [v.partition(b" ")[2] for v in sent.header(b"authorization")],
    )


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "spec, errorClass, status, code",
    [
        ("mode=error code=1308", anthropic.RateLimitError, 429, "1308"),
        ("mode=error code=1211", anthropic.BadRequestError, 400, "1211"),
        ("mode=error code=1305 status=529", anthropic.OverloadedError, 529, "1305"),
        ("mode=error code=500", anthropic.InternalServerError, 500, "500"),
        ("mode=not-found", anthropic.NotFoundError, 404, "404"),
    ],
)
async def test_anthropicErrors(
    fake: RunningFake, spec: str, errorClass: type[Exception], status: int, code: str
) -> None:
    """
    Error answers raise the SDK's error classes with the right status, and
    the body keeps Z.AI's code.
    """

    def use(client: anthropic.Anthropic) -> Exception:
        with pytest.raises(errorClass) as info:
            client.messages.create(
                model="claude",
                max_tokens=10,
                messages=ANTHROPIC_USER,
                stream=True,
                extra_headers={"x-fake-scenario": spec},
            )
        return info.value

    error: Any = await withAnthropic(fake, use)
    assert error.status_code == status
    assert error.body["error"]["type"] == code


@pytest_twisted.ensureDeferred
async def test_anthropicAuthError(fake: RunningFake) -> None:
    """
    A wrong key is an C{AuthenticationError}.
    """

    def use(client: anthropic.Anthropic) -> None:
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.create(model="claude", max_tokens=1, messages=ANTHROPIC_USER)

    await withAnthropic(fake, use, key="wrong")


@pytest_twisted.ensureDeferred
async def test_anthropicInbandError(fake: RunningFake) -> None:
    """
    An error event in a 200 stream raises while iterating.
    """

    def use(client: anthropic.Anthropic) -> Any:
        with pytest.raises(anthropic.APIStatusError) as info:
            with client.messages.stream(
                model="claude",
                max_tokens=10,
                messages=ANTHROPIC_USER,
                extra_headers={"x-fake-scenario": "mode=inband-error code=1310"},
            ) as stream:
                for _ in stream:
                    pass
        return info.value

    error = await withAnthropic(fake, use)
    # The error event's data, as the SDK parsed it: never its message text,
    # whose wording changes between SDK releases.
    assert isinstance(error.body, dict), error.body
    assert error.body["error"]["code"] == "1310"


# OpenAI


@pytest_twisted.ensureDeferred
async def test_openaiStream(fake: RunningFake) -> None:
    """
    The SDK streams reasoning, content and tool-call fragments, and sees
    the usage on the final chunk.
    """

    def use(client: openai.OpenAI) -> list[Any]:
        stream = client.chat.completions.create(
            model="glm-4.7",
            messages=OPENAI_USER,
            stream=True,
            extra_headers={"x-fake-scenario": "events=3 thinking=true tool=true cacheRead=4"},
        )
        with stream:
            return list(stream)

    chunks = await withOpenAI(fake, use)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    arguments = "".join(
        call.function.arguments or "" for c in chunks for call in (c.choices[0].delta.tool_calls or [])
    )
    assert reasoning == "".join(THINKING_DELTAS)
    assert content == "hello " * 3
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].delta.role == "assistant" for c in chunks)
    usage = expectedUsage(fake, Scenario(events=3, thinking=True, tool=True, cacheRead=4))
    final = chunks[-1].usage
    assert final is not None
    assert final.prompt_tokens == usage.promptTokens
    assert final.completion_tokens == usage.outputTokens
    assert final.total_tokens == usage.totalTokens
    assert final.prompt_tokens_details.cached_tokens == 4
    assert final.completion_tokens_details.reasoning_tokens == usage.reasoningTokens
    assert fake.fake.received[-1].header(b"authorization") == [f"Bearer {KEY}".encode()]


@pytest_twisted.ensureDeferred
async def test_openaiCreate(fake: RunningFake) -> None:
    """
    A non-streamed completion and the model list parse.
    """

    def use(client: openai.OpenAI) -> Any:
        completion = client.chat.completions.create(
            model="glm-4.7",
            messages=OPENAI_USER,
            extra_headers={"x-fake-scenario": "tool=true"},
        )
        return completion, [m.id for m in client.models.list()]

    completion, models = await withOpenAI(fake, use)
    message = completion.choices[0].message
    assert message.content == "hello " * 5
    assert message.tool_calls[0].function.name == "get_weather"
    assert completion.usage.prompt_tokens == usageFor(Scenario(), fake.fake.received[0].body).inputTokens
    assert "glm-4.7" in models


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "spec, errorClass, status",
    [
        ("mode=error code=1302", openai.RateLimitError, 429),
        ("mode=error code=1113", openai.RateLimitError, 429),
        ("mode=error code=1214", openai.BadRequestError, 400),
        ("mode=error code=401", openai.AuthenticationError, 401),
    ],
)
async def test_openaiErrors(fake: RunningFake, spec: str, errorClass: type[Exception], status: int) -> None:
    """
    Error answers raise the SDK's error classes with the right status.
    """

    def use(client: openai.OpenAI) -> Exception:
        with pytest.raises(errorClass) as info:
            client.chat.completions.create(
                model="glm-4.7",
                messages=OPENAI_USER,
                stream=True,
                extra_headers={"x-fake-scenario": spec},
            )
        return info.value

    error: Any = await withOpenAI(fake, use)
    assert error.status_code == status
    assert error.body["code"] == spec.split("code=")[1]


@pytest_twisted.ensureDeferred
async def test_openaiInbandError(fake: RunningFake) -> None:
    """
    A C{data: {"error": ...}} chunk raises C{APIError} mid-stream, after
    the content before it was delivered.
    """

    def use(client: openai.OpenAI) -> tuple[list[Any], Exception]:
        received: list[Any] = []
        with pytest.raises(openai.APIError) as info:
            stream = client.chat.completions.create(
                model="glm-4.7",
                messages=OPENAI_USER,
                stream=True,
                extra_headers={"x-fake-scenario": "mode=inband-error code=1305 after=2"},
            )
            with stream:
                for chunk in stream:
                    received.append(chunk)
        return received, info.value

    received, error = await withOpenAI(fake, use)
    assert len(received) == 2
    assert isinstance(error, openai.APIError)
    assert isinstance(error.body, dict)
    assert error.body["code"] == "1305"


@pytest_twisted.ensureDeferred
async def test_openaiAuthError(fake: RunningFake) -> None:
    """
    A wrong key is an C{AuthenticationError}.
    """

    def use(client: openai.OpenAI) -> None:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="glm-4.7", messages=OPENAI_USER)

    await withOpenAI(fake, use, key="wrong")
