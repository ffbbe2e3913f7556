# -*- test-case-name: tests.test_forward -*-
"""
Getting an answer from Z.AI for one request: admission, attempts, and
retries before the first byte reaches the client.

A L{Forwarder} waits for the limiter's admission, sends the request, and
reads error answers whole (they are small) to learn Z.AI's code: a "slow
down" 429 is retried after a backoff (admitted again each time), a quota
429 puts the limiter on hold and goes to the client with its reset time,
anything else passes through unchanged. What it hands the relay is a
response whose body is to be streamed, or nothing when it has answered the
client itself. Every wait ends at once when the client leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

# RequestNotSent is public (documented, raised to Agent users) but twisted.web.client
# imports it from _newclient without listing it in __all__.
from twisted.web.client import (  # type: ignore[attr-defined]
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from zaiproxy.dialects import respondWithError
from zaiproxy.front.routes import Forward
from zaiproxy.limits.admission import NotAdmitted, Permit, QueueTimeout
from zaiproxy.limits.retry import NETWORK, parseRetryAfter, retryWait, zaiHeaders
from zaiproxy.limits.zai_errors import MAX_ERROR_BYTES, ZaiError, parseError
from zaiproxy.observe.exchange import CLIENT_CLOSED, Exchange
from zaiproxy.relay.headers import clientResponseHeaders, upstreamRequestHeaders
from zaiproxy.relay.upstream import BodyProtocol, DiscardBody, bodyProducerFor

if TYPE_CHECKING:
    from zaiproxy.relay.relay import RelayContext

__all__ = ["MAX_ERROR_BODY", "Forwarder"]

#: An error body is read whole up to this size (Z.AI's are tiny).
MAX_ERROR_BODY = 1 << 20

# Errors that mean the upstream connection went away, as the client wraps them.
_CONNECTION_ERRORS = (ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent, ResponseFailed)

# Upstream failures before response headers: (test, status, error_type, message).
_NO_RESPONSE: list[tuple[Callable[[Failure], Any], int, str, str]] = [
    (
        lambda f: f.check(netError.TimeoutError),
        504,
        "connect_timeout",
        "the upstream did not accept a connection in time",
    ),
    (
        lambda f: f.check(netError.DNSLookupError),
        502,
        "upstream_connection",
        "the upstream host name could not be resolved",
    ),
    (
        lambda f: f.check(netError.ConnectionRefusedError),
        502,
        "upstream_connection",
        "the upstream refused the connection",
    ),
]

_PHRASES = {429: b"Too Many Requests", 529: b"Overloaded"}


class _ErrorBody(BodyProtocol):
    """
    Read an error answer whole (bounded), to classify it before deciding.
    """

    def __init__(self, done: Callable[[bytes, bool], None]) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        if self._size < MAX_ERROR_BODY:
            self._chunks.append(data[: MAX_ERROR_BODY - self._size])
            self._size += len(data)
            if self._size >= MAX_ERROR_BODY:
                self.producer.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._done(b"".join(self._chunks), self._size > MAX_ERROR_BODY)


class Forwarder:
    """
    One request's attempts at Z.AI.
    """

    log = Logger()

    def __init__(
        self,
        context: RelayContext,
        request: Request,
        route: Forward,
        exchange: Exchange,
        client: str,
        wantsResponse: Callable[[int], bool] = lambda code: False,
    ) -> None:
        self._context = context
        self._wantsResponse = wantsResponse
        self._request = request
        self._route = route
        self._exchange = exchange
        self._client = client
        self._limiter = context.limiter if route.label in ("/v1/messages", "/v1/chat/completions") else None
        self._result: Deferred[IResponse | None] = Deferred()
        self._waiting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._errorBody: _ErrorBody | None = None
        self._permit: Permit | None = None
        self._retries = 0
        self._timedOut = False
        self._cancelled: str | None = None
        self.retried = False

    # -- the outcome -----------------------------------------------------------

    def start(self) -> Deferred[IResponse | None]:
        """
        A response to relay, or L{None} if the client was answered here (or
        left); C{exchange.status} says which.
        """
        limiter = self._limiter
        if limiter is not None and self._context.quotaHold:
            held = limiter.quotaHeld()
            if held is not None:
                self._quotaHeld(*held)
                return self._result
        self._admit()
        return self._result

    def _answered(self, status: int) -> None:
        self._exchange.status = status
        self._releasePermit()
        if not self._result.called:
            self._result.callback(None)

    def _relay(self, response: IResponse) -> None:
        self._result.callback(response)

    def cancel(self, why: str) -> None:
        """
        Stop waiting: C{"client"} (the client left) or C{"shutdown"}.
        """
        if self._result.called or self._cancelled is not None:
            return
        self._cancelled = why
        self._cancelTimer()
        if self._errorBody is not None and self._errorBody.transport is not None:
            self._errorBody.producer.stopProducing()
        elif self._waiting is not None:
            self._waiting.cancel()
        else:
            self._stopped()

    def _stopped(self) -> None:
        if self._cancelled == "client":
            self._answered(CLIENT_CLOSED)
        else:
            self._fail(503, None, "the proxy is shutting down; retry")

    def done(self, outcome: str, inFlight: int | None = None) -> None:
        """
        The relayed answer ended: tell the limiter how it went.
        """
        if self._limiter is not None and outcome != "none":
            self._limiter.record(outcome, inFlight)
        self._releasePermit()

    def _releasePermit(self) -> None:
        if self._permit is not None:
            self._permit.release()
            self._permit = None

    # -- admission --------------------------------------------------------------

    def _admit(self) -> None:
        if self._limiter is None:
            self._attempt()
            return
        waiting = self._waiting = self._limiter.admission.admit(self._client)
        waiting.addCallbacks(self._admitted, self._notAdmitted).addErrback(self._bug)

    def _admitted(self, permit: Permit) -> None:
        self._waiting = None
        self._permit = permit
        self._exchange.queueWait += permit.waited
        self._attempt()

    def _notAdmitted(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            self._stopped()
            return
        failure.trap(NotAdmitted)
        refusal = failure.value
        assert isinstance(refusal, NotAdmitted)
        retryAfter = math.ceil(refusal.retryAfter)
        self._request.setHeader(b"retry-after", b"%d" % (retryAfter,))
        if isinstance(refusal, QueueTimeout):
            waited = refusal.waited
            errorType = "queue_timeout"
            message = (
                f"waited {waited:g} s in the proxy's queue without being admitted; retry after {retryAfter} s"
            )
        else:
            errorType, message = "queue_full", f"the proxy's queue is full; retry after {retryAfter} s"
        self._fail(429, errorType, message, keepHeaders=True)

    def _quotaHeld(self, until: float, error: ZaiError) -> None:
        """
        Z.AI said the quota is gone until a stated time: answer that here,
        without spending a request upstream.
        """
        request = self._request
        now = self._context.clock.seconds()
        for name, value in zaiHeaders(error, now, upstreamRetryAfter=False):
            request.setHeader(name, value)
        reset = dict(zaiHeaders(error, now, False)).get(b"x-zai-rate-limit-reset", b"").decode()
        self._fail(
            429,
            None,
            f"Z.AI's usage limit is reached (code {error.code}); it resets at {reset}. "
            "The proxy answers this itself until then.",
            code=error.code,
            keepHeaders=True,
        )

    # -- attempts -----------------------------------------------------------------

    def _attempt(self) -> None:
        context = self._context
        request = self._request
        if request.content is None or getattr(request.content, "closed", False):
            self._stopped()
            return
        headers = upstreamRequestHeaders(request.requestHeaders, self._route.dialect, context.apiKey)
        body = bodyProducerFor(request.content, context.upstream.cooperator)
        self._timedOut = False
        self._timer = context.clock.callLater(context.firstByteTimeout, self._firstByteTimeout)
        try:
            pending = context.upstream.request(request.method, self._route.url, headers, body)
        except Exception:
            pending = Deferred()
            pending.errback(Failure())
        self._waiting = pending
        pending.addCallbacks(self._gotResponse, self._noResponse).addErrback(self._bug)

    def _firstByteTimeout(self) -> None:
        self._timer = None
        self._timedOut = True
        if self._errorBody is not None and self._errorBody.transport is not None:
            self._errorBody.producer.stopProducing()
        elif self._waiting is not None:
            self._waiting.cancel()

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _noResponse(self, failure: Failure) -> None:
        self._waiting = None
        self._cancelTimer()
        if self._cancelled is not None:
            self._stopped()
            return
        if self._timedOut:
            self._fail(
                504,
                "first_byte_timeout",
                f"the upstream sent no response within {self._context.firstByteTimeout:g} s",
            )
            return
        for test, status, errorType, message in _NO_RESPONSE:
            if test(failure):
                if errorType == "upstream_connection" and self._retry(NETWORK, "network_error"):
                    return
                self._fail(status, errorType, message)
                return
        if not failure.check(
            netError.ConnectionClosed, netError.ConnectError, CancelledError, *_CONNECTION_ERRORS
        ):
            self.log.failure("upstream request to {route} failed", failure=failure, route=self._route.label)
        if self._retry(NETWORK, "network_error"):
            return
        self._fail(502, "upstream_connection", "the upstream closed the connection before responding")

    def _gotResponse(self, response: IResponse) -> None:
        self._waiting = None
        if self._cancelled is not None:
            response.deliverBody(DiscardBody())
            self._cancelTimer()
            self._stopped()
            return
        if response.code < 400 or self._wantsResponse(response.code):
            self._cancelTimer()
            self._relay(response)
            return
        # An error: read it whole (the first-byte timer still runs) to learn
        # Z.AI's code before deciding.
        self._errorBody = _ErrorBody(lambda body, over: self._gotError(response, body, over))
        response.deliverBody(self._errorBody)

    def _gotError(self, response: IResponse, body: bytes, oversized: bool) -> None:
        self._errorBody = None
        self._cancelTimer()
        if self._cancelled is not None:
            self._stopped()
            return
        if self._timedOut:
            self._fail(504, "first_byte_timeout", "the upstream's error answer did not arrive in time")
            return
        context = self._context
        code = response.code
        if oversized:
            self.log.warn(
                "An error answer of {route} over {limit} bytes was cut to that size",
                route=self._route.label,
                limit=MAX_ERROR_BODY,
            )
        error = (
            parseError(body) if not oversized and len(body) <= MAX_ERROR_BYTES else ZaiError(None, "unknown")
        )
        if error.code is not None:
            context.reporter.zaiError(error)
        limiter = self._limiter
        if limiter is not None and code == 429:
            if error.cls in ("frequency", "unknown"):
                limiter.record("frequency")
            elif error.cls == "concurrency":
                limiter.record("concurrency", limiter.admission.inFlight)
        self._releasePermit()
        context.reporter.upstreamError(str(code))
        if code == 429 and error.cls == "quota":
            if limiter is not None and context.quotaHold:
                limiter.holdQuota(error)
            self.log.warn(
                "429 quota exhausted (code {code}): not retrying, returning reset metadata", code=error.code
            )
        elif code == 429 and limiter is not None:
            asked = parseRetryAfter(
                response.headers.getRawHeaders(b"retry-after", [None])[0], context.clock.seconds()
            )
            if self._retry(error.cls, "429", asked, error.retryAfter, error):
                return
            if error.cls != "configuration":
                self.log.warn("429 {cls} (code {code}), max retries exceeded", cls=error.cls, code=error.code)
        self._passThrough(response, body, error if code == 429 else None)

    def _retry(
        self,
        cls: str,
        reason: str,
        headerWait: float | None = None,
        bodyWait: float | None = None,
        error: ZaiError | None = None,
    ) -> bool:
        """
        Schedule another attempt if the contract allows; say whether it did.
        """
        context = self._context
        if self._retries >= context.maxRetries:
            return False
        wait = retryWait(cls, self._retries + 1, headerWait, bodyWait, context.jitter)
        if wait is None:
            return False
        self._retries += 1
        self.retried = True
        context.reporter.retry(reason)
        self.log.info(
            "{what}, retrying (attempt {attempt}/{attempts}) after {wait:.2f}s",
            what=f"429 {cls} (code {error.code})" if error is not None else "Upstream connection failed",
            attempt=self._retries + 1,
            attempts=context.maxRetries + 1,
            wait=wait,
        )
        self._timer = context.clock.callLater(wait, self._retryNow)
        return True

    def _retryNow(self) -> None:
        self._timer = None
        if self._permit is not None:
            # A connection that failed before Z.AI answered keeps its slot:
            # Z.AI saw no call, and asking for a new slot while holding this
            # one would queue behind itself (with one slot, until
            # QUEUE_TIMEOUT). A 429 gave its slot back before backing off.
            self._attempt()
        else:
            self._admit()

    # -- answers made here ----------------------------------------------------------

    def _passThrough(self, response: IResponse, body: bytes, error: ZaiError | None) -> None:
        """
        Z.AI's error answer, unchanged (plus the X-Zai-* headers on a 429).
        """
        request = self._request
        request.setResponseCode(response.code, response.phrase or _PHRASES.get(response.code))
        for name, values in clientResponseHeaders(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        if not response.headers.hasHeader(b"server"):
            request.responseHeaders.removeHeader(b"server")
        if error is not None:
            upstreamRetryAfter = response.headers.hasHeader(b"retry-after")
            for name, value in zaiHeaders(error, self._context.clock.seconds(), upstreamRetryAfter):
                request.setHeader(name, value)
        self._exchange.errorType = str(response.code)
        request.setHeader(b"content-length", b"%d" % (len(body),))
        if request.method != b"HEAD":
            request.write(body)
            self._exchange.responseBytes = len(body)
        request.finish()
        self._answered(response.code)

    def _fail(
        self,
        status: int,
        errorType: str | None,
        message: str,
        code: str | None = None,
        keepHeaders: bool = False,
    ) -> None:
        request = self._request
        if errorType is not None:
            self._exchange.errorType = errorType
            if errorType not in ("queue_full", "queue_timeout"):
                self._context.reporter.upstreamError(errorType)
        if self._cancelled == "client":
            self._answered(CLIENT_CLOSED)
            return
        if not keepHeaders:
            for name in (b"retry-after",):
                request.responseHeaders.removeHeader(name)
        self._exchange.responseBytes = respondWithError(request, self._route.dialect, status, message, code)
        self._answered(status)

    def _bug(self, failure: Failure) -> None:
        self.log.failure("forwarding to {route} failed", failure=failure, route=self._route.label)
        if not self._result.called:
            self._result.errback(failure)
