# -*- test-case-name: tests.test_dialects -*-
"""
The two API dialects the proxy speaks, and the error bodies of each.

Every error the proxy makes itself must come back in the envelope the
client's SDK parses, or the client shows a useless "unexpected response".
"""

from __future__ import annotations

import enum

from zaiproxy.dialects import anthropic, openai

__all__ = ["Dialect", "errorBody", "streamErrorEvent"]


class Dialect(enum.Enum):
    """
    Which wire format a route speaks.
    """

    anthropic = "anthropic"
    openai = "openai"


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
