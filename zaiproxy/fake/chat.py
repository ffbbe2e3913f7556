# -*- test-case-name: tests.test_fake_bodies -*-
"""
The OpenAI chat-completions side of the fake: stream chunks, completion
bodies and the model list, shaped as Z.AI's C{/api/paas/v4} and
C{/api/coding/paas/v4} endpoints send them (zai-api.md §2, §3.1).

Z.AI repeats C{"role":"assistant"} in every delta and puts C{usage} on the
final chunk together with C{finish_reason}, without being asked.
C{usage=start} gives OpenAI's own C{include_usage} shape instead: an extra
chunk with empty C{choices} just before C{[DONE]}.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .content import TOOL_NAME, Content, Ids, Usage, dumps
from .scenario import Scenario
from .script import CLOSING, DELTA, Frame

__all__ = [
    "DONE",
    "MODELS",
    "chatBody",
    "chatStream",
    "chunk",
    "modelsBody",
    "usageBody",
]

#: The models the fake lists: (id, creation time).
MODELS: tuple[tuple[str, int], ...] = (
    ("glm-4.5", 1753660800),
    ("glm-4.5-air", 1753660800),
    ("glm-4.6", 1759190400),
    ("glm-4.7", 1766332800),
    ("glm-5", 1770768000),
    ("glm-5.1", 1775520000),
)

#: The stream terminator.
DONE = b"data: [DONE]\n\n"


def chunk(payload: dict[str, Any]) -> bytes:
    """
    One SSE event: C{data: <compact json>} and a blank line, no C{event:}.
    """
    return b"data: " + dumps(payload) + b"\n\n"


def _finishReason(scenario: Scenario) -> str:
    if scenario.stopReason:
        return scenario.stopReason
    return "tool_calls" if scenario.tool else "stop"


def usageBody(usage: Usage) -> dict[str, Any]:
    """
    Z.AI's C{usage} object.
    """
    return {
        "prompt_tokens": usage.promptTokens,
        "completion_tokens": usage.outputTokens,
        "total_tokens": usage.totalTokens,
        "prompt_tokens_details": {"cached_tokens": usage.cacheReadTokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoningTokens},
    }


def chatStream(scenario: Scenario, content: Content, usage: Usage, ids: Ids) -> Iterator[Frame]:
    """
    The frames of a streamed answer, lazily.
    """
    head = {
        "id": ids.base,
        "created": ids.created,
        "object": "chat.completion.chunk",
        "model": scenario.model,
    }

    def withDelta(delta: dict[str, Any]) -> dict[str, Any]:
        return {
            **head,
            "choices": [{"index": 0, "delta": {"role": "assistant", **delta}}],
        }

    for piece in content.thinking:
        yield Frame(chunk(withDelta({"reasoning_content": piece})), DELTA)
    if content.textEvents:
        textChunk = Frame(chunk(withDelta({"content": content.textDelta})), DELTA)
        for _ in range(content.textEvents):
            yield textChunk
    for number, piece in enumerate(content.toolFragments):
        call: dict[str, Any] = {"index": 0}
        if number == 0:
            call.update(id=ids.toolCallId, type="function")
            call["function"] = {"name": TOOL_NAME, "arguments": piece}
        else:
            call["function"] = {"arguments": piece}
        yield Frame(chunk(withDelta({"tool_calls": [call]})), DELTA)

    final: dict[str, Any] = {
        **head,
        "choices": [
            {
                "index": 0,
                "finish_reason": _finishReason(scenario),
                "delta": {"role": "assistant", "content": ""},
            }
        ],
    }
    if scenario.usage == "reported":
        final["usage"] = usageBody(usage)
    yield Frame(chunk(final), CLOSING)
    if scenario.usage == "start":
        yield Frame(chunk({**head, "choices": [], "usage": usageBody(usage)}), CLOSING)
    if scenario.done:
        yield Frame(DONE, CLOSING)


def chatBody(scenario: Scenario, content: Content, usage: Usage, ids: Ids) -> dict[str, Any]:
    """
    A non-streamed answer, as Z.AI returns it (with its C{request_id}).
    """
    message: dict[str, Any] = {"content": content.text, "role": "assistant"}
    if content.thinking:
        message["reasoning_content"] = content.thinkingText
    if content.toolFragments:
        message["tool_calls"] = [
            {
                "id": ids.toolCallId,
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": content.toolArguments},
            }
        ]
    body: dict[str, Any] = {
        "choices": [{"finish_reason": _finishReason(scenario), "index": 0, "message": message}],
        "created": ids.created,
        "id": ids.base,
        "model": scenario.model,
        "object": "chat.completion",
        "request_id": ids.requestId,
    }
    if scenario.usage != "none":
        body["usage"] = usageBody(usage)
    return body


def modelsBody() -> dict[str, Any]:
    """
    The OpenAI-shaped model list.
    """
    return {
        "object": "list",
        "data": [
            {"id": mid, "object": "model", "created": created, "owned_by": "z-ai"} for mid, created in MODELS
        ],
    }
