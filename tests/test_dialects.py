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
