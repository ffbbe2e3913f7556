# -*- test-case-name: tests.test_fake_bodies -*-
"""
The Anthropic Messages side of the fake: stream events, message bodies,
C{count_tokens} and the model list, shaped as Z.AI's Anthropic-compatible
endpoint sends them (zai-api.md §3.2, §4.2).

Z.AI departs from Anthropic in one way that matters to a proxy: its
C{message_start} reports zero usage and the real counts arrive only in
C{message_delta}. C{usage=start} gives Anthropic's own behaviour instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .content import TOOL_ARGUMENTS, TOOL_NAME, Content, Ids, Usage, dumps
from .scenario import Scenario
from .script import CLOSING, DELTA, STRUCTURE, Frame

__all__ = [
    "MODELS",
    "countTokensBody",
    "event",
    "messageBody",
    "messageStream",
    "modelsBody",
]

#: The models the fake lists: (id, display name, creation stamp).
MODELS: tuple[tuple[str, str, str], ...] = (
    ("glm-4.5-air", "GLM-4.5-Air", "2025-07-28T00:00:00Z"),
    ("glm-4.6", "GLM-4.6", "2025-09-30T00:00:00Z"),
    ("glm-4.7", "GLM-4.7", "2025-12-22T00:00:00Z"),
    ("glm-5", "GLM-5", "2026-02-11T00:00:00Z"),
    ("glm-5.1", "GLM-5.1", "2026-04-07T00:00:00Z"),
)


def event(kind: str, payload: dict[str, Any]) -> bytes:
    """
    One SSE event: C{event: <kind>}, C{data: <compact json>}, blank line.
    """
    return b"event: " + kind.encode("ascii") + b"\ndata: " + dumps(payload) + b"\n\n"


def _stopReason(scenario: Scenario) -> str:
    if scenario.stopReason:
        return scenario.stopReason
    return "tool_use" if scenario.tool else "end_turn"


def _finalUsage(usage: Usage) -> dict[str, Any]:
    """
    Z.AI's C{message_delta} usage: everything, at the end.
    """
    return {
        "input_tokens": usage.inputTokens,
        "output_tokens": usage.outputTokens,
        "cache_read_input_tokens": usage.cacheReadTokens,
        "server_tool_use": {"web_search_requests": 0},
        "service_tier": "standard",
    }


def _startUsage(scenario: Scenario, usage: Usage) -> dict[str, Any] | None:
    if scenario.usage == "reported":
        return {"input_tokens": 0, "output_tokens": 0}
    if scenario.usage == "start":
        return {
            "input_tokens": usage.inputTokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cacheReadTokens,
            "output_tokens": 1,
        }
    return None


def _deltaUsage(scenario: Scenario, usage: Usage) -> dict[str, Any] | None:
    if scenario.usage == "reported":
        return _finalUsage(usage)
    if scenario.usage == "start":
        return {"output_tokens": usage.outputTokens}
    return None


def messageStream(scenario: Scenario, content: Content, usage: Usage, ids: Ids) -> Iterator[Frame]:
    """
    The frames of a streamed answer, lazily (a stream may be 100 MB).
    """
    message: dict[str, Any] = {
        "id": ids.messageId(scenario.msgPrefix),
        "type": "message",
        "role": "assistant",
        "model": scenario.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    startUsage = _startUsage(scenario, usage)
    if startUsage is not None:
        message["usage"] = startUsage
    yield Frame(event("message_start", {"type": "message_start", "message": message}))
    yield Frame(event("ping", {"type": "ping"}))
    yield from _contentBlocks(content, ids)
    messageDelta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": _stopReason(scenario), "stop_sequence": None},
    }
    deltaUsage = _deltaUsage(scenario, usage)
    if deltaUsage is not None:
        messageDelta["usage"] = deltaUsage
    yield Frame(event("message_delta", messageDelta), CLOSING)
    yield Frame(event("message_stop", {"type": "message_stop"}), CLOSING)


def _contentBlocks(content: Content, ids: Ids) -> Iterator[Frame]:
    """
    The content blocks, in Z.AI's order: thinking, text, tool use.
    """
    index = 0
    if content.thinking:
        yield _blockStart(index, {"type": "thinking", "thinking": "", "signature": ""})
        for piece in content.thinking:
            yield _blockDelta(index, {"type": "thinking_delta", "thinking": piece})
        # Not a DELTA frame: the signature carries no text.
        signature = {"type": "signature_delta", "signature": ids.signature}
        yield Frame(
            event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": signature})
        )
        yield _blockStop(index)
        index += 1
    if content.textEvents:
        yield _blockStart(index, {"type": "text", "text": ""})
        # Every text delta is the same event: build it once.
        delta = _blockDelta(index, {"type": "text_delta", "text": content.textDelta})
        for _ in range(content.textEvents):
            yield delta
        yield _blockStop(index)
        index += 1
    if content.toolFragments:
        yield _blockStart(
            index,
            {"type": "tool_use", "id": ids.toolUseId, "name": TOOL_NAME, "input": {}},
        )
        for piece in content.toolFragments:
            yield _blockDelta(index, {"type": "input_json_delta", "partial_json": piece})
        yield _blockStop(index)


def _blockStart(index: int, block: dict[str, Any]) -> Frame:
    return Frame(
        event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        ),
        STRUCTURE,
    )


def _blockDelta(index: int, delta: dict[str, Any]) -> Frame:
    return Frame(
        event(
            "content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": delta},
        ),
        DELTA,
    )


def _blockStop(index: int) -> Frame:
    return Frame(
        event("content_block_stop", {"type": "content_block_stop", "index": index}),
        STRUCTURE,
    )


def messageBody(scenario: Scenario, content: Content, usage: Usage, ids: Ids) -> dict[str, Any]:
    """
    A non-streamed answer, as Z.AI's Anthropic endpoint returns it.
    """
    blocks: list[dict[str, Any]] = []
    if content.thinking:
        blocks.append({"type": "thinking", "thinking": content.thinkingText, "signature": ids.signature})
    if content.textEvents:
        blocks.append({"type": "text", "text": content.text})
    if content.toolFragments:
        blocks.append(
            {
                "type": "tool_use",
                "id": ids.toolUseId,
                "name": TOOL_NAME,
                "input": dict(TOOL_ARGUMENTS),
            }
        )
    body: dict[str, Any] = {
        "id": ids.messageId(scenario.msgPrefix),
        "type": "message",
        "role": "assistant",
        "model": scenario.model,
        "content": blocks,
        "stop_reason": _stopReason(scenario),
        "stop_sequence": None,
    }
    if scenario.usage != "none":
        body["usage"] = {
            "input_tokens": usage.inputTokens,
            "output_tokens": usage.outputTokens,
            "cache_read_input_tokens": usage.cacheReadTokens,
        }
    return body


def countTokensBody(inputTokens: int) -> dict[str, Any]:
    """
    The C{count_tokens} answer.
    """
    return {"input_tokens": inputTokens}


def modelsBody() -> dict[str, Any]:
    """
    The Anthropic-shaped model list.
    """
    data = [
        {"id": mid, "display_name": name, "type": "model", "created_at": created}
        for mid, name, created in MODELS
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"],
        "last_id": data[-1]["id"],
    }
