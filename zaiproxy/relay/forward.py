# -*- test-case-name: tests.test_forward -*-
"""
Getting an answer from Z.AI for one request: admission, attempts, and
retries before the first byte reaches the client.

A L{Forwarder} waits for the limiter's admission, sends the request, and
reads error answers whole (they are small) to learn Z.AI's code: a "slow
down" 429 is retried after a backoff (admitted again each time), a quota
429 puts the limiter on hold and goes to the client with its reset time,
anything else passes through unchanged. Every wait ends at once when the
client leaves.

It never writes to the client: what it hands the relay is an L{Answer}, a
value (a response to stream, Z.AI's error to pass on, a refusal of our own,
or word that the client is gone), and the relay writes it. What happened
on the way (waits, failed attempts, retries) is kept in a L{Trail} for
the request's record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
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

from zaiproxy.dialects.zai_errors import MAX_ERROR_BYTES, ZaiError, errorRequestId, parseError
from zaiproxy.limits.admission import NotAdmitted, Permit, QueueTimeout, QuotaHeld
from zaiproxy.limits.retry import NETWORK, parseRetryAfter, retryWait, zaiHeaders
from zaiproxy.observe.record import Exchange
from zaiproxy.relay.context import RelayContext
from zaiproxy.relay.headers import upstreamRequestHeaders
from zaiproxy.relay.routes import Forward
from zaiproxy.relay.upstream import BodyProtocol, DiscardBody, bodyProducerFor

__all__ = [
    "MAX_ERROR_BODY",
    "PACED_ROUTES",
    "Answer",
    "Forwarder",
    "Gone",
    "PassOn",
    "Refusal",
    "Stream",
    "Trail",
]

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

#: The model calls: paced by the limiter, and their streams end with a
#: last event of their own.
PACED_ROUTES = frozenset(["/v1/messages", "/v1/chat/completions"])

Headers = tuple[tuple[bytes, bytes], ...]


@attrs.frozen
class Stream:
    """
    An answer to relay as it arrives; C{permit} is the admission slot it
    holds until it ends (L{None} for calls the limiter does not pace).
    """

    response: IResponse
    permit: Permit | None = None


@attrs.frozen
class PassOn:
    """
    Z.AI's error answer, read whole, to pass on unchanged but for
    C{headers} (the X-Zai-* headers of a 429).
    """

    response: IResponse
    body: bytes
    headers: Headers = ()


@attrs.frozen
class Refusal:
    """
    An error answer of the proxy's own, in the client's dialect.
    """

    status: int
    message: str
    code: str | None = None
    headers: Headers = ()


@attrs.frozen
class Gone:
    """
    The client left before an answer: nothing to write.
    """


Answer = Stream | PassOn | Refusal | Gone


@attrs.define
class Trail:
    """
    What happened on the way to an answer, for the request's record.

    @ivar errorType: the last failure (upstream or the proxy's queue).
    @ivar upstreamErrors: one per failed attempt.
    """

    queueWait: float = 0.0
    errorType: str | None = None
    upstreamErrors: tuple[str, ...] = ()
    zaiErrors: tuple[tuple[str, str | None], ...] = ()
    retries: tuple[str, ...] = ()
    attempts: int = 0
    zaiRequestId: str | None = None

    def failed(self, errorType: str) -> None:
        self.errorType = errorType
        self.upstreamErrors += (errorType,)

    def copyTo(self, exchange: Exchange) -> None:
        """
        Put what happened on the way in the request's record.
        """
        exchange.queueWait = self.queueWait
        exchange.errorType = self.errorType
        exchange.upstreamErrors = self.upstreamErrors
        exchange.zaiErrors = self.zaiErrors
        exchange.retries = self.retries
        exchange.attempts = self.attempts
        if self.zaiRequestId is not None:
            exchange.zaiRequestId = self.zaiRequestId


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
        client: str,
        relayedErrors: frozenset[int] = frozenset(),
    ) -> None:
        """
        @param client: who the request is from, for the fair queue.
        @param relayedErrors: error statuses handed over as a response to
            relay rather than read here (count_tokens' 404, which the relay
            answers by counting).
        """
        self._context = context
        self._relayedErrors = relayedErrors
        self._request = request
        self._route = route
        self._client = client
        self._limiter = context.limiter if route.label in PACED_ROUTES else None
        self._result: Deferred[Answer] = Deferred()
        self._waiting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._errorBody: _ErrorBody | None = None
        self._permit: Permit | None = None
        self._retries = 0
        self._timedOut = False
        self._cancelled: str | None = None
        self.trail = Trail()

    # -- the answer ------------------------------------------------------------

    def start(self) -> Deferred[Answer]:
        """
        The answer, once there is one; it never fails.
        """
        limiter = self._limiter
        if limiter is not None:
            held = limiter.quotaHeld()
            if held is not None:
                self._quotaHeld(*held)
                return self._result
        self._admit()
        return self._result

    def _answer(self, answer: Answer) -> None:
        if not isinstance(answer, Stream):
            self._releasePermit()
        if not self._result.called:
            self._result.callback(answer)

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
            self._answer(Gone())
        else:
            self._refuse(503, None, "the proxy is shutting down; retry")

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
        self.trail.queueWait += permit.waited
        self._attempt()

    def _notAdmitted(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            self._stopped()
            return
        failure.trap(NotAdmitted)
        refusal = failure.value
        assert isinstance(refusal, NotAdmitted)
        if isinstance(refusal, QuotaHeld):
            # Another proxy sharing the key was told the quota is gone.
            self._quotaHeld(refusal.until, refusal.error)
            return
        retryAfter = math.ceil(refusal.retryAfter)
        if isinstance(refusal, QueueTimeout):
            errorType = "queue_timeout"
            message = (
                f"waited {refusal.waited:g} s in the proxy's queue without being admitted; "
                f"retry after {retryAfter} s"
            )
        else:
            errorType, message = "queue_full", f"the proxy's queue is full; retry after {retryAfter} s"
        # The proxy's own refusal, not an upstream error.
        self.trail.errorType = errorType
        self._refuse(429, None, message, headers=((b"retry-after", b"%d" % (retryAfter,)),))

    def _quotaHeld(self, until: float, error: ZaiError) -> None:
        """
        Z.AI said the quota is gone until a stated time: answer that here,
        without spending a request upstream.
        """
        headers = zaiHeaders(error, self._context.clock.seconds(), upstreamRetryAfter=False)
        reset = dict(headers).get(b"x-zai-rate-limit-reset", b"").decode()
        self._refuse(
            429,
            None,
            f"Z.AI's usage limit is reached (code {error.code}); it resets at {reset}. "
            "The proxy answers this itself until then.",
            code=error.code,
            headers=tuple(headers),
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
        self.trail.attempts += 1
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
            self._refuse(
                504,
                "first_byte_timeout",
                f"the upstream sent no response within {self._context.firstByteTimeout:g} s",
            )
            return
        for test, status, errorType, message in _NO_RESPONSE:
            if test(failure):
                if errorType == "upstream_connection" and self._retry(NETWORK, "network_error"):
                    return
                self._refuse(status, errorType, message)
                return
        if not failure.check(
            netError.ConnectionClosed, netError.ConnectError, CancelledError, *_CONNECTION_ERRORS
        ):
            self.log.failure("upstream request to {route} failed", failure=failure, route=self._route.label)
        if self._retry(NETWORK, "network_error"):
            return
        self._refuse(502, "upstream_connection", "the upstream closed the connection before responding")

    def _gotResponse(self, response: IResponse) -> None:
        self._waiting = None
        if self._cancelled is not None:
            response.deliverBody(DiscardBody())
            self._cancelTimer()
            self._stopped()
            return
        if response.code < 400 or response.code in self._relayedErrors:
            self._cancelTimer()
            self._answer(Stream(response, self._permit))
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
            self._refuse(504, "first_byte_timeout", "the upstream's error answer did not arrive in time")
            return
        error = self._readError(response, body, oversized)
        code = response.code
        self._releasePermit()
        self.trail.failed(str(code))
        if code == 429 and error.cls == "quota":
            self.log.warn(
                "429 quota exhausted (code {code}): not retrying, returning reset metadata", code=error.code
            )
        elif code == 429 and self._limiter is not None:
            asked = parseRetryAfter(
                response.headers.getRawHeaders(b"retry-after", [None])[0], self._context.clock.seconds()
            )
            if self._retry(error.cls, "429", asked, error.retryAfter, error):
                return
            if error.cls != "configuration":
                self.log.warn("429 {cls} (code {code}), max retries exceeded", cls=error.cls, code=error.code)
        headers: Headers = ()
        if code == 429:
            upstreamRetryAfter = response.headers.hasHeader(b"retry-after")
            headers = tuple(zaiHeaders(error, self._context.clock.seconds(), upstreamRetryAfter))
        self._answer(PassOn(response, body, headers))

    def _readError(self, response: IResponse, body: bytes, oversized: bool) -> ZaiError:
        """
        Z.AI's error code, class and hints; a 429's goes to the limiter.
        """
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
            self.trail.zaiErrors += ((error.cls, error.code),)
        if not oversized:
            self.trail.zaiRequestId = errorRequestId(body) or self.trail.zaiRequestId
        if self._limiter is not None and response.code == 429:
            self._limiter.observe(error)
        return error

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
        self.trail.retries += (reason,)
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

    def _refuse(
        self,
        status: int,
        errorType: str | None,
        message: str,
        code: str | None = None,
        headers: Headers = (),
    ) -> None:
        """
        Answer with an error of our own; C{errorType} names an upstream
        failure, if that is what it is.
        """
        if errorType is not None:
            self.trail.failed(errorType)
        if self._cancelled == "client":
            self._answer(Gone())
            return
        self._answer(Refusal(status, message, code, headers))

    def _bug(self, failure: Failure) -> None:
        self.log.failure("forwarding to {route} failed", failure=failure, route=self._route.label)
        if not self._result.called:
            self._result.errback(failure)
