# -*- test-case-name: tests.test_dialects -*-
"""
The OpenAI chat-completions dialect (what the openai SDK speaks).
"""

from __future__ import annotations

import json

__all__ = ["errorBody", "errorType", "streamErrorEvent"]

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
    return {
        "error": {
            "message": message,
            "type": errorType(status),
            "param": None,
            "code": code,
        }
    }


def errorBody(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(_error(status, message, code), separators=(",", ":")).encode()


def streamErrorEvent(message: str, code: str | None = None) -> bytes:
    # The openai SDK raises APIError on a data event that carries "error".
    data = json.dumps(_error(502, message, code), separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"
