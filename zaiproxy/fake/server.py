# -*- test-case-name: tests.test_fake -*-
"""
L{FakeZai}: a twisted.web resource that imitates Z.AI's Anthropic- and
OpenAI-compatible endpoints, records every request it receives, and answers
each one according to a L{Scenario}.

A scenario comes from the request's C{x-fake-scenario} header (so a test can
steer a request sent through the proxy or by an SDK), else from
L{FakeZai.queue}, else from the defaults.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from . import chat, messages
from .content import contentFor, dumps, idsFor, inputTokensFor, usageFor
from .errors import anthropicErrorBody, errorBody, inbandErrorBody, openaiErrorBody, statusForCode
from .responder import ReceivedRequest, Responder
from .scenario import Scenario, parseScenario
from .script import Action, bodyScript, silentScript, streamScript

__all__ = ["SCENARIO_HEADER", "FakeZai", "ReceivedRequest"]

log = Logger()

#: The request header that carries a scenario spec.
SCENARIO_HEADER = b"x-fake-scenario"

_JSON = (b"Content-Type", b"application/json; charset=UTF-8")
_SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream; charset=utf-8"),
    (b"Cache-Control", b"no-cache"),
)


@attrs.frozen
class _Route:
    method: bytes
    dialect: str
    name: str

    @property
    def generates(self) -> bool:
        """
        Whether this is a model request, which consumes a queued scenario.
        """
        return self.name in ("messages", "chat")


_ROUTES: dict[bytes, _Route] = {
    b"/api/anthropic/v1/messages": _Route(b"POST", "anthropic", "messages"),
    b"/api/anthropic/v1/messages/count_tokens": _Route(b"POST", "anthropic", "count_tokens"),
    b"/api/anthropic/v1/models": _Route(b"GET", "anthropic", "models"),
    b"/api/paas/v4/chat/completions": _Route(b"POST", "openai", "chat"),
    b"/api/coding/paas/v4/chat/completions": _Route(b"POST", "openai", "chat"),
    b"/api/paas/v4/models": _Route(b"GET", "openai", "models"),
    b"/api/coding/paas/v4/models": _Route(b"GET", "openai", "models"),
    b"/api/monitor/usage/quota/limit": _Route(b"GET", "monitor", "quota"),
}

#: What the quota endpoint answers unless a test sets L{FakeZai.quota}: the
#: current CREDIT_LIMIT shape (the Go zai-proxy's own parsing), five-hour and
#: weekly windows, plus a TIME_LIMIT entry the proxy must ignore.
DEFAULT_QUOTA = {
    "code": 200,
    "msg": "success",
    "success": True,
    "data": {
        "level": "pro",
        "limits": [
            {
                "type": "CREDIT_LIMIT",
                "unit": 3,
                "number": 5,
                "usage": 1000,
                "currentValue": 370,
                "remaining": 630,
                "percentage": 37,
                "nextResetTime": 1767229200000,
            },
            {
                "type": "CREDIT_LIMIT",
                "unit": 6,
                "number": 1,
                "usage": 10000,
                "currentValue": 1200,
                "remaining": 8800,
                "percentage": 12,
                "nextResetTime": 1767744000000,
            },
            {"type": "TIME_LIMIT", "unit": 5, "number": 1, "usage": 100, "currentValue": 1, "percentage": 1},
        ],
    },
}


class FakeZai(Resource):
    """
    The fake Z.AI upstream.

    The fake's own refusals (unknown path: 404; bad key: 401 with code 1001
    or 1002; body not a JSON object: 400 with code 1210; bad
    C{x-fake-scenario}: 400 with code C{fake}) are sent at once and ignore
    the scenario. The scenario applies to every known endpoint (so
    C{mode=not-found} can make C{count_tokens} a 404) but only model
    requests take one from the queue.

    @ivar received: every request, appended on arrival.
    @ivar queue: scenarios for the next model requests (messages and chat
        completions), consumed first in, first out when a request has no
        C{x-fake-scenario} header.
    @ivar defaults: the scenario used otherwise; a header spec overrides
        only the fields it names.
    @ivar capacity: if set, Z.AI's hidden rate limit: model requests beyond
        this many in any one second are answered 429 with code 1303 (the
        limiter's convergence test); C{refused} counts them.
    @ivar quota: the document the quota endpoint answers (C{quotaStatus}
        its status).
    """

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        apiKey: str | None = None,
        defaults: Scenario = Scenario(),  # noqa: B008 - a frozen attrs value: sharing it is safe
    ) -> None:
        """
        @param clock: schedules pacing and supplies the time for ids, usage
            stamps and reset stamps.
        @param apiKey: the key every request must carry, or L{None} to
            accept any request.
        """
        super().__init__()
        self.clock = clock
        self.apiKey = apiKey
        self.defaults = defaults
        self.received: list[ReceivedRequest] = []
        self.queue: list[Scenario] = []
        self.capacity: float | None = None
        self.refused = 0
        self._accepted: deque[float] = deque()
        self.quota: Any = DEFAULT_QUOTA
        self.quotaStatus = 200
        self._cookies = 0
        self._waiters: list[tuple[int, Deferred[ReceivedRequest]]] = []
        self._active: set[Responder] = set()

    def whenReceived(self, n: int) -> Deferred[ReceivedRequest]:
        """
        Fire with the C{n}-th request (1-based) once it has arrived.
        """
        if n < 1:
            raise ValueError(f"requests are counted from 1, not {n}")
        if len(self.received) >= n:
            return succeed(self.received[n - 1])
        waiting: Deferred[ReceivedRequest] = Deferred()
        self._waiters.append((n, waiting))
        return waiting

    @property
    def inFlight(self) -> int:
        """
        How many responses are still open (including hanging ones).
        """
        return len(self._active)

    def abortAll(self) -> None:
        """
        Abort every open response's connection: a quick way for a test to
        free the sockets of hanging or stalled answers.
        """
        for responder in list(self._active):
            responder.abort()

    def render(self, request: Any) -> int:
        finished = request.notifyFinish()
        record = self._receive(request)
        responder = Responder(self.clock, request, record, finished, self._active.discard)
        self._active.add(responder)
        streaming = False
        try:
            actions, streaming = self._answer(record)
        except Exception:
            log.failure("fake Z.AI: cannot answer {uri}", failure=Failure(), uri=record.uri)
            actions = self._plainError(record.dialect, 500, "500", "fake Z.AI failed")
        responder.run(actions, streaming)
        self._announce(record)
        return NOT_DONE_YET

    def _receive(self, request: Any) -> ReceivedRequest:
        request.content.seek(0)
        uri: bytes = request.uri
        path, mark, query = uri.partition(b"?")
        record = ReceivedRequest(
            number=len(self.received) + 1,
            method=request.method,
            uri=uri,
            path=path,
            query=query if mark else None,
            headers=[
                (name, value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            body=request.content.read(),
            receivedAt=self.clock.seconds(),
            dialect=(
                "anthropic"
                if path.startswith(b"/api/anthropic/")
                else "monitor"
                if path.startswith(b"/api/monitor/")
                else "openai"
            ),
        )
        self.received.append(record)
        return record

    def _announce(self, record: ReceivedRequest) -> None:
        """
        Fire the L{whenReceived} waiters that C{record} satisfies; called
        once its answer is under way, so a waiter may act on it (abort it,
        say).
        """
        ready = [(n, d) for n, d in self._waiters if n <= record.number]
        self._waiters = [(n, d) for n, d in self._waiters if n > record.number]
        for n, waiting in ready:
            waiting.callback(self.received[n - 1])

    def _answer(self, record: ReceivedRequest) -> tuple[Iterator[Action], bool]:
        """
        Choose the script for a request: the fake's own errors first, then
        whatever the scenario says.
        """
        route = _ROUTES.get(record.path)
        if route is None or route.method != record.method:
            return self._plainError(record.dialect, 404, "404", "Not Found"), False
        record.route = route.name
        if route.name == "quota":
            return self._quota(record), False
        if not self._authorized(route.dialect, record):
            return self._unauthorized(route.dialect, record), False

        scenario: Scenario | None = None
        specs = record.header(SCENARIO_HEADER)
        if specs:
            spec = " ".join(value.decode("utf-8", "replace") for value in specs)
            try:
                scenario = parseScenario(spec, self.defaults)
            except ValueError as e:
                body = dumps({"error": {"code": "fake", "message": str(e)}})
                return bodyScript(Scenario(), 400, [_JSON], body), False

        parsed: Any = None
        if record.method == b"POST":
            try:
                parsed = json.loads(record.body)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                message = "Invalid API parameter: the body is not a JSON object"
                return self._plainError(route.dialect, 400, "1210", message), False
            record.stream = parsed.get("stream") is True

        if scenario is None:
            scenario = self.queue.pop(0) if route.generates and self.queue else self.defaults
        if route.generates and self.capacity is not None and not self._withinCapacity():
            self.refused += 1
            scenario = attrs.evolve(scenario, mode="error", code="1303", status=429)
        record.scenario = scenario
        return self._script(route, record, scenario)

    def _withinCapacity(self) -> bool:
        """
        Whether one more model request fits in the hidden capacity (never
        more than C{capacity} in any one second).
        """
        assert self.capacity is not None
        now = self.clock.seconds()
        accepted = self._accepted
        while accepted and accepted[0] <= now - 1.0:
            accepted.popleft()
        if len(accepted) >= self.capacity:
            return False
        accepted.append(now)
        return True

    def _script(
        self, route: _Route, record: ReceivedRequest, scenario: Scenario
    ) -> tuple[Iterator[Action], bool]:
        now = self.clock.seconds()
        ids = idsFor(record.number, now)
        headers = self._scenarioHeaders(scenario)
        mode = scenario.mode
        if mode in ("hang", "reset"):
            return silentScript(scenario), False
        if mode == "error":
            errorHeaders = [*headers, _JSON]
            if scenario.retryAfterHeader > 0:
                errorHeaders.append((b"Retry-After", _number(scenario.retryAfterHeader)))
            status = scenario.status or statusForCode(scenario.code)
            body = dumps(errorBody(route.dialect, scenario, now, ids.requestId))
            return bodyScript(scenario, status, errorHeaders, body), False
        if mode == "not-found":
            body = dumps(self._errorEnvelope(route.dialect, "404", "Not Found", ids.requestId))
            return bodyScript(scenario, 404, [*headers, _JSON], body), False
        if mode == "inband-error" and not (route.generates and record.stream):
            body = dumps(inbandErrorBody(route.dialect, scenario, now, ids.requestId))
            return bodyScript(scenario, 200, [*headers, _JSON], body), False

        if route.name == "models":
            listing = messages.modelsBody() if route.dialect == "anthropic" else chat.modelsBody()
            return bodyScript(scenario, 200, [*headers, _JSON], dumps(listing)), False
        if route.name == "count_tokens":
            counted = messages.countTokensBody(inputTokensFor(record.body))
            return bodyScript(scenario, 200, [*headers, _JSON], dumps(counted)), False

        content = contentFor(scenario)
        usage = usageFor(scenario, record.body)
        dialect = messages if route.dialect == "anthropic" else chat
        if not record.stream:
            if dialect is messages:
                answer = messages.messageBody(scenario, content, usage, ids)
            else:
                answer = chat.chatBody(scenario, content, usage, ids)
            return bodyScript(scenario, 200, [*headers, _JSON], dumps(answer)), False

        if dialect is messages:
            frames = messages.messageStream(scenario, content, usage, ids)
            errorFrame = messages.event("error", inbandErrorBody("anthropic", scenario, now, ids.requestId))
        else:
            frames = chat.chatStream(scenario, content, usage, ids)
            errorFrame = chat.chunk(inbandErrorBody("openai", scenario, now, ids.requestId))
        streamHeaders = [*headers, *_SSE_HEADERS]
        return streamScript(scenario, streamHeaders, frames, errorFrame), True

    def _quota(self, record: ReceivedRequest) -> Iterator[Action]:
        """
        Z.AI's (undocumented) quota endpoint: it takes the raw key as
        C{Authorization} (clients also send it with Bearer, or as x-api-key).
        """
        if self.apiKey is not None:
            key = self.apiKey.encode("utf-8")
            presented = [v.strip() for v in record.header(b"authorization")]
            presented += [v.partition(b" ")[2].strip() for v in record.header(b"authorization")]
            presented += record.header(b"x-api-key")
            if key not in presented:
                body = dumps({"code": 401, "msg": "token expired or incorrect", "success": False})
                return bodyScript(Scenario(), 401, [_JSON], body)
        body = self.quota if isinstance(self.quota, bytes) else dumps(self.quota)
        return bodyScript(Scenario(), self.quotaStatus, [_JSON], body)

    def _scenarioHeaders(self, scenario: Scenario) -> list[tuple[bytes, bytes]]:
        if not scenario.cookie:
            return []
        self._cookies += 1
        return [(b"Set-Cookie", b"zfake=%d; Path=/" % (self._cookies,))]

    def _authorized(self, dialect: str, record: ReceivedRequest) -> bool:
        if self.apiKey is None:
            return True
        key = self.apiKey.encode("utf-8")
        for value in record.header(b"authorization"):
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip() == key:
                return True
        if dialect == "anthropic":
            return key in record.header(b"x-api-key")
        return False

    def _unauthorized(self, dialect: str, record: ReceivedRequest) -> Iterator[Action]:
        presented = bool(record.header(b"authorization")) or (
            dialect == "anthropic" and bool(record.header(b"x-api-key"))
        )
        if presented:
            return self._plainError(dialect, 401, "1002", "Invalid Authentication Token")
        return self._plainError(dialect, 401, "1001", "Authentication parameter not received in Header")

    def _errorEnvelope(
        self, dialect: str, code: str, message: str, requestId: str | None = None
    ) -> dict[str, Any]:
        if dialect == "anthropic":
            return anthropicErrorBody(code, message, requestId)
        return openaiErrorBody(code, message)

    def _plainError(self, dialect: str, status: int, code: str, message: str) -> Iterator[Action]:
        """
        The fake's own error answers (unknown path, auth, bad JSON): sent at
        once, whatever the scenario.
        """
        body = dumps(self._errorEnvelope(dialect, code, message))
        return bodyScript(Scenario(), status, [_JSON], body)


def _number(value: float) -> bytes:
    if float(value).is_integer():
        return b"%d" % (int(value),)
    return repr(float(value)).encode("ascii")
