# -*- test-case-name: tests.test_dialects -*-
"""
The two API dialects the proxy speaks, and the error bodies of each.

Every error the proxy makes itself must come back in the envelope the
client's SDK parses, or the client shows a useless "unexpected response".
"""

from __future__ import annotations

import enum
import json
from typing import Any

from zaiproxy.dialects import anthropic, openai

__all__ = [
    "Dialect",
    "addUsage",
    "dialectModule",
    "errorBody",
    "respondWithError",
    "streamEnded",
    "streamErrorEvent",
]


class Dialect(enum.Enum):
    """
    Which wire format a route speaks.
    """

    anthropic = "anthropic"
    openai = "openai"


def dialectModule(dialect: Dialect) -> Any:
    """
    The module that reads and writes C{dialect}'s bodies and streams.
    """
    return openai if dialect is Dialect.openai else anthropic


def errorBody(dialect: Dialect, status: int, message: str, code: str | None = None) -> bytes:
    """
    A complete JSON error body for an HTTP error of C{status}.
    """
    if dialect is Dialect.openai:
        return openai.errorBody(status, message, code)
    return anthropic.errorBody(status, message, code)


def streamErrorEvent(dialect: Dialect, message: str, code: str | None = None) -> bytes:
    """
    One whole SSE event that tells a client mid-stream that the stream broke,
    so the SDK raises instead of treating a cut answer as complete.
    """
    if dialect is Dialect.openai:
        return openai.streamErrorEvent(message, code)
    return anthropic.streamErrorEvent(message, code)


def streamEnded(dialect: Dialect, events: bytes) -> bool:
    """
    Whether whole SSE events of a model call's stream hold its end (or an
    in-band error): a stream that ends without one was cut short.
    """
    return dialectModule(dialect).streamEnded(events)  # type: ignore[no-any-return]


def addUsage(body: bytes, usage: dict[str, object]) -> bytes | None:
    """
    C{body} (a JSON object) with a top-level C{usage} member added as text,
    so every byte the upstream sent stays as it was; L{None} if the body is
    not an object.
    """
    stripped = body.rstrip()
    if not stripped.endswith(b"}"):
        return None
    head = stripped[:-1].rstrip()
    member = b'"usage":' + json.dumps(usage, separators=(",", ":")).encode()
    separator = b"" if head.endswith(b"{") else b","
    return head + separator + member + b"}" + body[len(stripped) :]


# Statuses twisted.web has no reason phrase for (it would say "Unknown Status").
_PHRASES = {429: b"Too Many Requests", 529: b"Overloaded"}


def respondWithError(
    request: Any, dialect: Dialect, status: int, message: str, code: str | None = None
) -> int:
    """
    Answer C{request} with a JSON error in C{dialect} and finish it.

    Headers already set that still hold (C{Retry-After}, C{X-Zai-*},
    C{Connection}) stay; whatever described another body goes.

    @return: the number of body bytes written.
    """
    body = errorBody(dialect, status, message, code)
    request.setResponseCode(status, _PHRASES.get(status))
    headers = request.responseHeaders
    for name in (
        b"content-encoding",
        b"transfer-encoding",
        b"content-type",
        b"content-length",
        b"set-cookie",
    ):
        headers.removeHeader(name)
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
    if request.method == b"HEAD":
        body = b""
    request.write(body)
    request.finish()
    return len(body)
