# -*- test-case-name: tests.test_fake_bodies -*-
"""
Z.AI's error bodies: business codes, their HTTP statuses and English
messages, and the envelopes they travel in.

Z.AI reports errors with a string business code (zai-api.md §5): the
OpenAI-compatible endpoints put it in C{error.code}; the Anthropic endpoint
puts it in C{error.type} inside Anthropic's C{{"type":"error"}} envelope, but
sometimes answers in the OpenAI shape too, and in-band stream errors use
C{error.code}. Quota messages carry a naive reset stamp in Beijing time.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from .scenario import Scenario

__all__ = [
    "BEIJING",
    "anthropicErrorBody",
    "errorBody",
    "errorMessage",
    "inbandErrorBody",
    "openaiErrorBody",
    "resetStamp",
    "statusForCode",
]

#: The time zone of Z.AI's reset stamps (undocumented; UTC+8 is the usual guess).
BEIJING = timezone(timedelta(hours=8), "UTC+8")

_STATUS_BY_CODE: dict[str, int] = {
    **dict.fromkeys(["1302", "1303", "1305", "1308", "1310", "1312", "1113"], 429),
    **dict.fromkeys(["1210", "1211", "1214", "1261"], 400),
    **dict.fromkeys(["1000", "1001", "1002", "1003", "1004", "401"], 401),
    "404": 404,
    "500": 500,
}

_MESSAGES: dict[str, str] = {
    "500": "Internal server error",
    "1000": "Authentication failed",
    "1001": "Authentication parameter not received in Header",
    "1002": "Invalid Authentication Token",
    "1003": "Authentication Token expired",
    "1004": "Authentication failed, token verification failed",
    "401": "Authentication failed, the token is expired or invalid",
    "404": "Not Found",
    "1113": "Insufficient balance or no resource package. Please recharge.",
    "1210": "Invalid API parameter, please check the documentation.",
    "1211": "Unknown Model",
    "1214": "Invalid field value in the request body",
    "1261": "Prompt too long",
    "1302": "Rate limit reached for requests",
    "1303": "High frequency usage of this API, please reduce the request frequency",
    "1305": "The service may be temporarily overloaded, please try again later",
    "1308": "Usage limit reached for 5 hour. Your limit will reset at {reset}",
    "1310": "Weekly/Monthly Limit Exhausted. Your limit will reset at {reset}",
    "1312": "This model is currently overloaded, please try again later or switch models",
}


def statusForCode(code: str) -> int:
    """
    The HTTP status Z.AI uses for a business code: 429 for throttling and
    quota, 400 for bad requests, 401 for auth, 400 for anything unknown.
    """
    return _STATUS_BY_CODE.get(code, 400)


def resetStamp(now: float, resetIn: float) -> str:
    """
    The naive C{YYYY-MM-DD HH:MM:SS} Beijing-time stamp Z.AI writes in quota
    messages, C{resetIn} seconds after C{now}.
    """
    moment = datetime.fromtimestamp(now + resetIn, tz=BEIJING)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def errorMessage(code: str, now: float, resetIn: float) -> str:
    """
    Z.AI's English message for C{code}.
    """
    template = _MESSAGES.get(code, f"Error code {code}")
    return template.replace("{reset}", resetStamp(now, resetIn))


def _withRetryAfter(error: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    if scenario.retryAfter > 0:
        value = scenario.retryAfter
        error["retry_after"] = int(value) if float(value).is_integer() else value
    return error


def openaiErrorBody(
    code: str, message: str, requestId: str | None = None, scenario: Scenario | None = None
) -> dict[str, Any]:
    """
    C{{"error":{"code":...,"message":...}}}, Z.AI's own envelope.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if scenario is not None:
        _withRetryAfter(error, scenario)
    body: dict[str, Any] = {"error": error}
    if requestId is not None:
        body["request_id"] = requestId
    return body


def anthropicErrorBody(
    code: str, message: str, requestId: str | None = None, scenario: Scenario | None = None
) -> dict[str, Any]:
    """
    C{{"type":"error","error":{"type":code,...}}}: Anthropic's envelope with
    Z.AI's business code where Anthropic puts its error type.
    """
    error: dict[str, Any] = {"type": code, "message": message}
    if scenario is not None:
        _withRetryAfter(error, scenario)
    body: dict[str, Any] = {"type": "error", "error": error}
    if requestId is not None:
        body["request_id"] = requestId
    return body


def errorBody(dialect: str, scenario: Scenario, now: float, requestId: str) -> dict[str, Any]:
    """
    The body of an HTTP error answer for C{scenario.code}, in the envelope
    the scenario asks for on an endpoint of C{dialect} (C{"anthropic"} or
    C{"openai"}).
    """
    message = errorMessage(scenario.code, now, scenario.resetIn)
    envelope = scenario.envelope
    if envelope == "native":
        envelope = dialect
    if envelope == "anthropic":
        return anthropicErrorBody(scenario.code, message, requestId, scenario)
    # The OpenAI endpoints send no request_id in their error bodies; the
    # Anthropic endpoint does when it falls back to the OpenAI envelope.
    return openaiErrorBody(scenario.code, message, requestId if dialect == "anthropic" else None, scenario)


def inbandErrorBody(dialect: str, scenario: Scenario, now: float, requestId: str) -> dict[str, Any]:
    """
    The JSON of an error frame inside an HTTP 200 stream.

    Z.AI uses its own C{error.code} envelope here, even on the Anthropic
    endpoint (with a C{request_id}); C{envelope=anthropic} gives Anthropic's
    own C{{"type":"error",...}} frame instead.
    """
    message = errorMessage(scenario.code, now, scenario.resetIn)
    if scenario.envelope == "anthropic":
        return anthropicErrorBody(scenario.code, message, requestId, scenario)
    return openaiErrorBody(scenario.code, message, requestId if dialect == "anthropic" else None, scenario)
