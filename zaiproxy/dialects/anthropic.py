# -*- test-case-name: tests.test_dialects -*-
"""
The Anthropic Messages dialect (what Claude Code and the anthropic SDK
speak): error bodies, what a request and an answer contain for token
counting, and where usage is reported or must be added.
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
    "frameWithUsage",
    "requestTexts",
    "responseTexts",
    "streamEnded",
    "streamErrorEvent",
    "usageFrom",
    "usageJSON",
]

# Anthropic's error types by status (docs.claude.com/en/api/errors).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def errorType(status: int) -> str:
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _error(status: int, message: str, code: str | None) -> dict[str, object]:
    error: dict[str, object] = {"type": errorType(status), "message": message}
    if code is not None:
        error["code"] = code
    return {"type": "error", "error": error}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def errorBody(status: int, message: str, code: str | None = None) -> bytes:
    return _dumps(_error(status, message, code)).encode()


def streamErrorEvent(message: str, code: str | None = None) -> bytes:
    return b"event: error\ndata: " + _dumps(_error(502, message, code)).encode() + b"\n\n"


# An event line starts a line; JSON text cannot hold a raw newline, so a
# delta's text that mentions these words cannot match.
_END = re.compile(rb"(?:^|\n)event: ?(?:message_stop|error)\r?\n")


def streamEnded(events: bytes) -> bool:
    """
    Whether these whole events end the stream: C{message_stop}, or an
    C{error} event (the client is told already). A stream that ends
    without either was cut short.
    """
    return (b"message_stop" in events or b"error" in events) and _END.search(events) is not None


# -- what gets counted ---------------------------------------------------------


def _blockTexts(content: Any, out: list[str]) -> None:
    """
    The texts the model reads in a C{system} value or a message's content.

    Images, base64 documents and redacted thinking carry no countable text
    and are not counted.
    """
    if isinstance(content, str):
        out.append(content)
        return
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            out.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            out.append(block["thinking"])
        elif kind in ("tool_use", "server_tool_use"):
            out.append(_dumps(block.get("input", {})))
        elif isinstance(kind, str) and (kind == "tool_result" or kind.endswith("_tool_result")):
            _blockTexts(block.get("content"), out)
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text":
                if isinstance(source.get("data"), str):
                    out.append(source["data"])
            elif isinstance(source, dict) and source.get("type") == "content":
                _blockTexts(source.get("content"), out)


def requestTexts(body: Any) -> list[str]:
    """
    Everything a Messages request makes the model read: the system prompt,
    every message's text, tool calls and results, thinking, and the tool
    definitions (as compact JSON).
    """
    out: list[str] = []
    if not isinstance(body, dict):
        return out
    _blockTexts(body.get("system"), out)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            _blockTexts(message.get("content"), out)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict):
            out.append(_dumps({k: v for k, v in tool.items() if k != "cache_control"}))
    return out


def responseTexts(body: Any) -> list[str]:
    """
    The output of a non-streamed answer: text, thinking and tool inputs.
    """
    out: list[str] = []
    if isinstance(body, dict):
        _blockTexts(body.get("content"), out)
    return out


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usageFrom(usage: Any) -> Usage | None:
    """
    A C{usage} object, or L{None} if there is none.
    """
    if not isinstance(usage, dict):
        return None
    return Usage(
        input=_count(usage.get("input_tokens")),
        output=_count(usage.get("output_tokens")),
        cacheRead=_count(usage.get("cache_read_input_tokens")),
        cacheWrite=_count(usage.get("cache_creation_input_tokens")),
    )


def usageJSON(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "cache_creation_input_tokens": usage.cacheWrite,
        "cache_read_input_tokens": usage.cacheRead,
    }


#: The events that may carry usage, the model or an error: a frame that
#: mentions one is parsed (see L{StreamReader.cut}), and only these are read.
_MUST_READ = (b"message_start", b"message_delta", b"error")


class StreamReader:
    """
    Reads an Anthropic stream as it passes: the output text (kept, never
    the raw stream), the usage, the model, and an in-band error.
    """

    def __init__(self) -> None:
        self.output = OutputText(decode=_keptTexts)
        self.usage: Usage | None = None
        self.final = False
        self.model: str | None = None
        #: Z.AI's id of the answer (C{message_start}'s message id).
        self.upstreamId: str | None = None
        self.error: ZaiError | None = None

    def cut(self, frames: bytes) -> list[tuple[bool, bytes]] | None:
        """
        Whole frames cut into those to parse now (C{True}: any that mentions
        C{message_start}, C{message_delta} or C{error}, which may carry
        usage, the model or an error) and runs to keep unparsed (deltas,
        pings, message_stop: only their text could ever be needed, see
        L{OutputText}); see L{framesMentioning}.
        """
        return framesMentioning(frames, _MUST_READ)

    def event(self, event: Event) -> str | None:
        """
        Take one event; return C{"start"} or C{"delta"} when a
        C{message_start} or C{message_delta} carries no usage at all (the
        anthropic SDK fails on such a stream).
        """
        name = event.name
        if name == b"content_block_delta":
            # Decoded only if the text is ever counted (see OutputText).
            self.output.addLater(event.data)
            return None
        if name not in _MUST_READ:
            return None
        try:
            document = readJSON(event.data)
        except ValueError:
            return None
        if not isinstance(document, dict):
            return None
        if name == b"error":
            self.error = errorFromJSON(document) or ZaiError(None, "unknown")
            return None
        if name == b"message_start":
            message = document.get("message")
            if not isinstance(message, dict):
                return None
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            self.upstreamId = upstreamId(message)
            usage = usageFrom(message.get("usage"))
            if usage is None:
                return "start"
        else:
            usage = usageFrom(document.get("usage"))
            if usage is None:
                return "delta"
            # Only message_delta's numbers are final (Z.AI's start says 0/0).
            self.final = True
        self.usage = usage if self.usage is None else self.usage.largest(usage)
        return None


def deltaTexts(data: bytes) -> list[tuple[str, str]]:
    """
    The text a C{content_block_delta} event adds, by kind.
    """
    try:
        delta = readJSON(data)["delta"]
        kind = delta["type"]
    except (ValueError, KeyError, TypeError):
        return []
    field = _DELTA_FIELDS.get(kind) if isinstance(kind, str) else None
    if field is None:
        return []
    text = delta.get(field[1])
    return [(field[0], text)] if isinstance(text, str) else []


def _keptTexts(kept: bytes) -> list[tuple[str, str]]:
    """
    The text of what L{StreamReader} kept undecoded (only deltas have any).
    """
    return [text for data in keptData(kept) for text in deltaTexts(data)]


#: Delta type -> (kind of output, the field holding its text).
_DELTA_FIELDS = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "input_json_delta": ("tool", "partial_json"),
}


def frameWithUsage(event: Event, where: str, usage: Usage) -> bytes:
    """
    The event re-written with C{usage} added (to the message in
    C{message_start}, at the top of C{message_delta}).
    """
    document = readJSON(event.data)
    if where == "start":
        document["message"]["usage"] = usageJSON(usage)
    else:
        document["usage"] = usageJSON(usage)
    name = event.name or b"message"
    return b"event: " + name + b"\ndata: " + _dumps(document).encode() + b"\n\n"
