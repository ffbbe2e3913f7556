# -*- test-case-name: tests.test_dialects -*-
"""
The Anthropic Messages dialect (what Claude Code and the anthropic SDK speak).
"""

from __future__ import annotations

import json

__all__ = ["errorBody", "errorType", "streamErrorEvent"]

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


def errorBody(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(_error(status, message, code), separators=(",", ":")).encode()


def streamErrorEvent(message: str, code: str | None = None) -> bytes:
    data = json.dumps(_error(502, message, code), separators=(",", ":"))
    return b"event: error\ndata: " + data.encode() + b"\n\n"
