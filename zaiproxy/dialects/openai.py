# -*- test-case-name: tests.test_dialects -*-
"""
The OpenAI chat-completions dialect (what the openai SDK speaks): error
bodies, what a request and an answer contain for token counting, and where
usage is reported or must be added.
"""

from __future__ import annotations

import json
import re
from typing import Any

from zaiproxy.dialects.sse import Event, framesMentioning, keptData, readJSON
from zaiproxy.dialects.usage import OutputText, Usage, upstreamId
from zaiproxy.dialects.zai_errors import ZaiError, errorFromJSON

__all__ = [
    "StreamReader",
    "errorBody",
    "errorType",
    "requestTexts",
    "responseTexts",
    "streamEnded",
    "streamErrorEvent",
    "usageFrom",
    "usageJSON",
]

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def errorType(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _error(status: int, message: str, code: str | None) -> dict[str, object]:
    return {"error": {"message": message, "type": errorType(status), "param": None, "code": code}}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def errorBody(status: int, message: str, code: str | None = None) -> bytes:
    return _dumps(_error(status, message, code)).encode()


def streamErrorEvent(message: str, code: str | None = None) -> bytes:
    # The openai SDK raises APIError on a data event that carries "error".
    return b"data: " + _dumps(_error(502, message, code)).encode() + b"\n\n"


# A data line that is [DONE] or an error object, or a finish_reason with a
# value: inside a JSON string these quotes would be escaped, so a delta's
# text that mentions them cannot match.
_END = re.compile(rb'(?:^|\n)data: ?(?:\[DONE\]|\{\s*"error")|"finish_reason"\s*:\s*"')


def streamEnded(events: bytes) -> bool:
    """
    Whether these whole events end the stream: C{data: [DONE]}, a chunk
    with a C{finish_reason} (Z.AI's last), or an in-band error (the client
    is told already). A stream that ends without any was cut short.
    """
    if b"[DONE]" not in events and b"finish_reason" not in events and b'"error"' not in events:
        return False
    return _END.search(events) is not None


# -- what gets counted ---------------------------------------------------------


def _contentTexts(content: Any, out: list[str]) -> None:
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])


def _toolCallTexts(calls: Any, out: list[str]) -> None:
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                out.append(function["name"])
            if isinstance(function.get("arguments"), str):
                out.append(function["arguments"])


def _messageTexts(message: Any, out: list[str]) -> None:
    if not isinstance(message, dict):
        return
    _contentTexts(message.get("content"), out)
    if isinstance(message.get("reasoning_content"), str):
        out.append(message["reasoning_content"])
    _toolCallTexts(message.get("tool_calls"), out)


def requestTexts(body: Any) -> list[str]:
    """
    Everything a chat request makes the model read: message contents (image
    parts are not counted), reasoning carried over, tool calls, and the
    tool definitions (as compact JSON).
    """
    out: list[str] = []
    if not isinstance(body, dict):
        return out
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        _messageTexts(message, out)
    for key in ("tools", "functions"):
        tools = body.get(key)
        for tool in tools if isinstance(tools, list) else ():
            out.append(_dumps(tool))
    return out


def responseTexts(body: Any) -> list[str]:
    """
    The output of a non-streamed answer: content, reasoning, tool arguments.
    """
    out: list[str] = []
    choices = body.get("choices") if isinstance(body, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            _messageTexts(choice.get("message"), out)
    return out


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usageFrom(usage: Any) -> Usage | None:
    """
    A C{usage} object, or L{None}. C{prompt_tokens} includes the cached
    part, which is moved to C{cacheRead}.
    """
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(
        input=max(0, _count(usage.get("prompt_tokens")) - cached),
        output=_count(usage.get("completion_tokens")),
        cacheRead=cached,
    )


def usageJSON(usage: Usage) -> dict[str, Any]:
    prompt = usage.input + usage.cacheRead
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output,
        "total_tokens": prompt + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cacheRead},
    }


def _chunkTexts(data: bytes) -> list[tuple[str, str]]:
    try:
        chunk = readJSON(data)
    except ValueError:
        return []
    return _deltaTexts(chunk) if isinstance(chunk, dict) else []


def _keptTexts(kept: bytes) -> list[tuple[str, str]]:
    """
    The text of what L{StreamReader} kept undecoded.
    """
    return [text for data in keptData(kept) for text in _chunkTexts(data)]


def _deltaTexts(chunk: dict[str, Any]) -> list[tuple[str, str]]:
    """
    The text a chunk's deltas add, by kind.
    """
    texts: list[tuple[str, str]] = []
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        if isinstance(delta.get("content"), str):
            texts.append(("content", delta["content"]))
        if isinstance(delta.get("reasoning_content"), str):
            texts.append(("reasoning", delta["reasoning_content"]))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                texts.append(("arguments", function["arguments"]))
    return texts


#: What a frame must mention to be parsed once the first chunk was read
#: (see L{StreamReader.cut}).
_MUST_READ = (b'"usage"', b'"error"', b"[DONE]")


class StreamReader:
    """
    Reads a chat-completions stream as it passes: output text, usage (from
    whichever chunk carries it), the model and ids, and an in-band error.
    """

    def __init__(self) -> None:
        self.output = OutputText(decode=_keptTexts)
        self.usage: Usage | None = None
        self.final = False
        self.model: str | None = None
        self.error: ZaiError | None = None
        self.chunkId: str = "chatcmpl-zaiproxy"
        #: Z.AI's id of the answer (its C{request_id}, else the chunks' C{id}).
        self.upstreamId: str | None = None
        self.created: int = 0
        self._seen = False

    def cut(self, frames: bytes) -> list[tuple[bool, bytes]] | None:
        """
        Whole frames cut into those to parse now (C{True}: the first chunk,
        until one is read, for the model and ids; then any that mentions
        usage, an error or C{[DONE]}) and runs to keep unparsed (deltas:
        only their text could ever be needed, see L{OutputText}); see
        L{framesMentioning}.
        """
        if self._seen:
            return framesMentioning(frames, _MUST_READ)
        end = frames.find(b"\n\n") + 2
        first = frames[:end]
        if end < 2 or b"data:" not in first:
            return None
        rest = framesMentioning(frames[end:], _MUST_READ) if end < len(frames) else []
        return None if rest is None else [(True, first), *rest]

    def event(self, event: Event) -> str | None:
        """
        Take one event; return C{"done"} at C{[DONE]} when no chunk carried
        usage (so usage can be added before it).
        """
        data = event.data
        if data[:6] == b"[DONE]":
            return "done" if self.usage is None else None
        if self._seen and b'"usage"' not in data and b'"error"' not in data:
            # A plain delta: its text is decoded only if ever counted (see
            # OutputText); the first chunk gave the model and ids.
            self.output.addLater(data)
            return None
        self._seen = True
        try:
            chunk = readJSON(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            self.error = errorFromJSON(chunk) or ZaiError(None, "unknown")
            return None
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if isinstance(chunk.get("id"), str):
            self.chunkId = chunk["id"]
        self.upstreamId = upstreamId(chunk) or self.upstreamId
        if isinstance(chunk.get("created"), int):
            self.created = chunk["created"]
        usage = usageFrom(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
            self.final = True
        for kind, text in _deltaTexts(chunk):
            self.output.add(kind, text)
        return None

    def usageChunk(self, usage: Usage) -> bytes:
        """
        The chunk OpenAI sends last when asked to include usage.
        """
        chunk = {
            "id": self.chunkId,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model or "",
            "choices": [],
            "usage": usageJSON(usage),
        }
        return b"data: " + _dumps(chunk).encode() + b"\n\n"
