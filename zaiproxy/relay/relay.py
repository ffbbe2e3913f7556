# -*- test-case-name: tests.test_relay -*-
"""
One request's journey: get an answer from Z.AI (L{Forwarder}: admission,
attempts, retries), relay it chunk by chunk with backpressure, and stop the
upstream as soon as the client leaves.

A L{Relay} is the body protocol of the upstream response and the push
producer registered with the client's request, so a client that reads
slowly pauses the upstream socket itself (no buffering in the proxy), and
every chunk goes from one socket to the other in a single method call, but
for a stream's opening: the chunks of its first upstream read go out as one
write, just before the poll that sends them.

When token counting is on, a L{UsageTap} reads the answer as it passes. It
may hand back a piece that is still being counted (usage added to a stream
that lacks it): everything after that piece waits, with the upstream paused,
until it is ready. A stream's opening burst is sent before the tap is even
made: Twisted sends what is written when the reactor next polls, so any
work done before that poll would delay the client's first byte.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from zaiproxy.dialects import respondWithError, streamEnded, streamErrorEvent
from zaiproxy.dialects.sse import MAX_PARTIAL_EVENT, lastEventEnd
from zaiproxy.front.routes import Forward
from zaiproxy.limits.admission import clientBucket
from zaiproxy.limits.limiter import RateLimiter
from zaiproxy.observe.exchange import CLIENT_CLOSED, Exchange, Reporter
from zaiproxy.relay.forward import Forwarder
from zaiproxy.relay.headers import clientResponseHeaders
from zaiproxy.relay.upstream import BodyProtocol, DiscardBody, DrainBody, Upstream
from zaiproxy.usage.accounting import Accounting
from zaiproxy.usage.tap import Piece, RequestBody, UsageTap, answerKind, readsLater

if TYPE_CHECKING:
    from zaiproxy.front.site import InFlight

__all__ = ["Relay", "RelayContext"]

#: Seconds after a stream's first chunk to read its opening burst, unless
#: something reads it sooner. Twisted sends that chunk at its next poll; a
#: call due at once would run before that poll, delaying the first byte.
READ_OPENING_AFTER = 0.001
#: At most this many chunks wait for that read (each is held until then),
#: none larger than MAX_UNREAD_BYTES: a burst larger than an opening (Z.AI's
#: is under 1 KiB) is read as it comes.
MAX_UNREAD = 16
MAX_UNREAD_BYTES = 4096

#: The routes whose streams are model answers, with a last event of their
#: own (see L{streamEnded}): one that ends without it was cut short.
MODEL_ROUTES = frozenset(["/v1/messages", "/v1/chat/completions"])


@attrs.frozen
class RelayContext:
    """
    What every relay shares: the clock, the upstream, where results go, and
    the timeouts.
    """

    clock: IReactorTime
    upstream: Upstream
    reporter: Reporter
    apiKey: bytes = attrs.field(repr=False)
    firstByteTimeout: float
    idleTimeout: float
    accounting: Accounting | None = None
    limiter: RateLimiter | None = None
    maxRetries: int = 0
    quotaHold: bool = True
    jitter: Callable[[float, float], float] = random.uniform


@implementer(IPushProducer)
class Relay(BodyProtocol):
    """
    Forwards one request and relays its response.

    Upstream data arrives in L{dataReceived} (this is the response's body
    protocol) and the client's transport pauses and resumes the upstream
    through L{pauseProducing}/L{resumeProducing} (this is also the request's
    producer).
    """

    log = Logger()

    def __init__(
        self,
        request: Request,
        route: Forward,
        exchange: Exchange,
        context: RelayContext,
        inFlight: InFlight[Relay],
        body: RequestBody | None = None,
    ) -> None:
        """
        @param body: the request body, kept for counting when this exchange
            is accounted for (L{None}: its answer is not read).
        """
        self._request = request
        self._route = route
        self._exchange = exchange
        self._context = context
        self._inFlight = inFlight
        self._body = body
        self._tap: UsageTap | None = None
        # A stream's opening chunks, sent before the tap is made.
        self._unread: list[bytes] = []
        self._readCall: IDelayedCall | None = None
        # A stream's first chunks, until the call below relays them as one.
        self._opened = False
        self._opening: list[bytes] | None = None
        self._openingCall: IDelayedCall | None = None
        self._mode = "none"
        self._forwarder: Forwarder | None = None
        self._answered = False
        self._idleTimer: IDelayedCall | None = None
        self._sse = False
        # A model answer's stream, and whether its last event was seen.
        self._watchEnd = False
        self._endSeen = False
        self._truncated = False
        self._partial = b""
        self._waiting: Deferred[bytes] | None = None
        self._backlog: list[Piece] = []
        self._ended: Failure | None = None
        self._endPieces = False
        self._clientPaused = False
        self._clientGone = False
        self._idleTimedOut = False
        self._shutdown = False
        self._registered = False
        self._done = False
        # notifyFinish() made after the client left never fires: ask first.
        request.notifyFinish().addErrback(self._clientLost)

    # -- forwarding ---------------------------------------------------------

    def start(self) -> None:
        """
        Get an answer upstream, then relay it.
        """
        self._inFlight.add(self)
        exchange = self._exchange
        self._forwarder = Forwarder(
            self._context,
            self._request,
            self._route,
            exchange,
            # Fairness by client key name, else by the seed's address buckets.
            exchange.keyName or clientBucket(exchange.client),
            wantsResponse=self._wantsResponse,
        )
        self._forwarder.start().addCallbacks(self._gotResponse, self._bug).addErrback(self._bug)

    def _wantsResponse(self, code: int) -> bool:
        # count_tokens' 404 is answered locally from the relayed response.
        return self._body is not None and answerKind(self._route.label, code, b"") == "local"

    def _fail(self, status: int, errorType: str | None, message: str) -> None:
        if errorType is not None:
            self._exchange.errorType = errorType
            self._context.reporter.upstreamError(errorType)
        self._exchange.responseBytes = respondWithError(self._request, self._route.dialect, status, message)
        self._finished(status)

    # -- the response -------------------------------------------------------

    def _gotResponse(self, response: IResponse | None) -> None:
        self._answered = True
        if response is None:
            # The forwarder answered the client itself (or the client left).
            self._finished(self._exchange.status)
            return
        if self._clientGone:
            response.deliverBody(DiscardBody())
            self._finished(CLIENT_CLOSED)
            return
        request = self._request
        contentType = response.headers.getRawHeaders(b"content-type", [b""])[0]
        sse = self._sse = contentType.lower().startswith(b"text/event-stream")
        self._watchEnd = sse and 200 <= response.code < 300 and self._route.label in MODEL_ROUTES
        if self._body is not None:
            self._mode = answerKind(self._route.label, response.code, contentType)
            if self._mode in ("body", "local"):
                self._tapNow()
        if self._mode == "local":
            self._answerLocally(response)
            return
        request.setResponseCode(response.code, response.phrase)
        headers = request.responseHeaders
        for name, values in clientResponseHeaders(response.headers):
            headers.setRawHeaders(name, values)
        if not response.headers.hasHeader(b"server"):
            headers.removeHeader(b"server")
        if (
            self._mode != "body"
            and not sse
            and response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
        ):
            # The body passes unchanged, so its length still holds.
            headers.setRawHeaders(b"content-length", [b"%d" % (response.length,)])
        self._exchange.status = response.code
        if response.code >= 400:
            self._exchange.errorType = str(response.code)
            self._context.reporter.upstreamError(str(response.code))
        response.deliverBody(self)

    def _answerLocally(self, response: IResponse) -> None:
        """
        Z.AI does not serve count_tokens: read and drop its answer (keeping
        the connection for reuse) and count the prompt here.
        """
        assert self._tap is not None
        response.deliverBody(DrainBody())
        self._exchange.status = 200
        self._tap.localCount().addCallbacks(self._localCounted, self._localFailed).addErrback(self._bug)

    def _localCounted(self, body: bytes) -> None:
        if self._clientGone:
            self._finished(CLIENT_CLOSED)
            return
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        self._send(body)
        request.finish()
        self._finished(200, complete=True)

    def _localFailed(self, failure: Failure) -> None:
        self.log.failure("counting tokens for count_tokens failed", failure=failure)
        if self._clientGone:
            self._finished(CLIENT_CLOSED)
            return
        self._fail(500, None, "count_tokens is not served upstream and could not be estimated")

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._registered = True
        self._startIdleTimer()

    def dataReceived(self, data: bytes) -> None:
        if self._idleTimer is not None:
            self._idleTimer.reset(self._context.idleTimeout)
        exchange = self._exchange
        if exchange.firstByteAt is None:
            self._context.reporter.firstByte(exchange)
        if self._mode == "body":
            assert self._tap is not None
            if not self._tap.hold(data):
                # Too large to account for: pass it on as it came.
                self._mode = "none"
                self._send(self._tap.takeHeld())
            return
        if self._sse:
            # Write whole events only, so an error event can always follow.
            if self._partial:
                data = self._partial + data
            end = lastEventEnd(data)
            if end != len(data):
                if len(data) - end <= MAX_PARTIAL_EVENT:
                    self._partial = data[end:]
                    data = data[:end]
                    if not data:
                        return
                else:
                    self._partial = b""
            else:
                self._partial = b""
            if self._watchEnd and not self._endSeen:
                self._endSeen = streamEnded(self._route.dialect, data)
            if self._opening is not None:
                self._opening.append(data)
                return
            if not self._opened:
                # The opening burst (every chunk of this reactor turn) goes
                # out as one piece, just before the poll that sends it.
                self._opened = True
                self._opening = [data]
                self._openingCall = self._context.clock.callLater(0, self._openingDue)
                return
            self._relayEvents(data)
            return
        self._send(data)

    def _relayEvents(self, data: bytes) -> None:
        """
        Relay whole events, read by the tap first when they must be.
        """
        if self._mode == "stream":
            tap = self._tap
            if tap is None:
                if len(data) <= MAX_UNREAD_BYTES and len(self._unread) < MAX_UNREAD and readsLater(data):
                    self._send(data)
                    self._unread.append(data)
                    if self._readCall is None:
                        self._readCall = self._context.clock.callLater(READ_OPENING_AFTER, self._readOpening)
                    return
                tap = self._tapNow()
            pieces = tap.feed(data)
            if pieces is None:
                if self._waiting is None:
                    self._send(data)
                    return
                pieces = [data]
            self._emit(pieces)
            return
        self._send(data)

    def _openingDue(self) -> None:
        self._openingCall = None
        try:
            self._sendOpening()
        except Exception:
            # Run by the reactor, not by the upstream's parser: a bug here
            # must still end both sides.
            self._bug(Failure())
            if self.transport is not None and self._ended is None:
                self.producer.stopProducing()

    def _sendOpening(self) -> None:
        """
        Relay a stream's opening burst: the chunks one upstream read
        delivered, joined, so they take one write and one byte test instead
        of one each. Twisted sends what is written at its next poll, and
        this runs before that poll (a call due now), so no byte waits; it
        also runs at once if the stream ends or the relay finishes first.
        """
        call, self._openingCall = self._openingCall, None
        if call is not None and call.active():
            call.cancel()
        opening, self._opening = self._opening, None
        if not opening or self._done:
            return
        data = b"".join(opening)
        if self._request.finished:
            # Answered already (an error of ours): read for usage only.
            if self._mode == "stream":
                self._tapNow().feed(data)
            return
        self._relayEvents(data)

    def _send(self, data: bytes) -> None:
        self._exchange.responseBytes += len(data)
        self._request.write(data)

    # -- the usage tap --------------------------------------------------------

    def _readOpening(self) -> None:
        self._readCall = None
        self._tapNow()

    def _tapNow(self) -> UsageTap:
        """
        The usage tap, made now if it is not yet, having read what was
        sent before it was made.
        """
        tap = self._tap
        if tap is not None:
            return tap
        if self._readCall is not None:
            self._readCall.cancel()
            self._readCall = None
        accounting = self._context.accounting
        assert accounting is not None and self._body is not None
        tap = self._tap = UsageTap(accounting, self._route.dialect, self._exchange, self._body, self._mode)
        if self._unread:
            unread, self._unread = self._unread, []
            tap.readRelayed(unread)
        return tap

    def _readTap(self) -> UsageTap | None:
        """
        The tap, once everything relayed is read; L{None} if this answer is
        not read.
        """
        if self._tap is None and self._mode != "stream":
            return None
        return self._tapNow()

    # -- pieces that wait for a count ---------------------------------------

    def _emit(self, pieces: list[Piece]) -> None:
        """
        Write C{pieces} in order; a piece still being counted holds back
        everything after it, with the upstream paused.
        """
        if self._waiting is not None:
            self._backlog.extend(pieces)
            return
        for index, piece in enumerate(pieces):
            if isinstance(piece, bytes):
                self._send(piece)
                continue
            self._waiting = piece
            self._backlog = list(pieces[index + 1 :])
            self._holdUpstream()
            piece.addErrback(self._pieceFailed).addCallback(self._released).addErrback(self._bug)
            return

    def _pieceFailed(self, failure: Failure) -> bytes:
        self.log.failure("adding usage to a stream failed", failure=failure)
        return b""

    def _released(self, data: bytes) -> None:
        self._waiting = None
        self._send(data)
        backlog, self._backlog = self._backlog, []
        self._emit(backlog)
        if self._waiting is None:
            self._resumeUpstream()
            self._maybeEnd()

    def _holdUpstream(self) -> None:
        self._cancelIdleTimer()
        if self._ended is None and self.transport is not None:
            self.producer.pauseProducing()

    def _resumeUpstream(self) -> None:
        if self._ended is None and self.transport is not None and not self._clientPaused:
            self.producer.resumeProducing()
            self._startIdleTimer()

    # -- the end of the response --------------------------------------------

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancelIdleTimer()
        if self._opening is not None:
            self._sendOpening()
        self._ended = reason
        self._maybeEnd()

    def _maybeEnd(self) -> None:
        """
        End the response once the upstream has ended and nothing waits.
        """
        reason = self._ended
        if reason is None or self._waiting is not None or self._done:
            return
        if self._clientGone:
            self._finished(CLIENT_CLOSED)
            return
        clean = (
            reason.check(ResponseDone, PotentialDataLoss) and not self._idleTimedOut and not self._shutdown
        )
        if not clean:
            self._streamBroke()
            return
        if not self._endPieces:
            if self._cutShort():
                self._truncated = True
                self._streamBroke()
                return
            self._endPieces = True
            pieces: list[Piece] = []
            if self._partial:
                pieces.append(self._partial)
                self._partial = b""
            if self._mode == "stream":
                pieces.extend(self._tapNow().endStream())
            elif self._mode == "body":
                assert self._tap is not None
                self._endBody(self._tap.endBody())
                return
            self._emit(pieces)
            # _emit may set _waiting or end the response: mypy keeps the
            # narrowing above across the call.
            if self._waiting is not None or self._done:
                # Still counting; or counted at once, and the release
                # (L{_released}) has ended the response already.
                return  # type: ignore[unreachable]
        self._unregister()
        self._request.finish()
        self._finished(self._exchange.status, complete=True)

    def _cutShort(self) -> bool:
        """
        Whether a model answer's stream ended cleanly without its last event
        (checked in a held half event too, which may lack its blank line).
        """
        if not self._watchEnd or self._endSeen:
            return False
        return not (self._partial and streamEnded(self._route.dialect, self._partial))

    def _endBody(self, piece: Piece) -> None:
        """
        Write a held JSON answer whole, with its (possibly new) length.
        """
        if not isinstance(piece, bytes):
            self._waiting = piece
            piece.addErrback(self._pieceFailed).addCallback(self._bodyReady).addErrback(self._bug)
            return
        self._bodyReady(piece)

    def _bodyReady(self, body: bytes) -> None:
        self._waiting = None
        if self._clientGone:
            self._finished(CLIENT_CLOSED)
            return
        request = self._request
        if request.method != b"HEAD":
            request.setHeader(b"content-length", b"%d" % (len(body),))
            self._send(body)
        self._unregister()
        request.finish()
        self._finished(self._exchange.status, complete=True)

    def _streamBroke(self) -> None:
        """
        End a response the upstream did not finish, so the client can tell.
        """
        if self._shutdown:
            errorType, message = None, "the proxy is shutting down; the stream was cut"
        elif self._idleTimedOut:
            errorType = "idle_timeout"
            message = f"the upstream sent nothing for {self._context.idleTimeout:g} s"
        elif self._truncated:
            errorType = "truncated"
            message = "the upstream ended the stream before the answer was complete"
        else:
            errorType = "read_error"
            message = "the upstream connection broke mid-response"
        request = self._request
        exchange = self._exchange
        self._unregister()
        if not request.startedWriting:
            # Nothing sent yet: a plain error response is still possible.
            status = 503 if errorType is None else 504 if errorType == "idle_timeout" else 502
            self._fail(status, errorType, message)
            return
        if errorType is not None:
            exchange.errorType = errorType
            self._context.reporter.upstreamError(errorType)
        if self._sse:
            # Drop the half event; the error event starts on a boundary.
            self._partial = b""
            self._send(streamErrorEvent(self._route.dialect, message))
            request.finish()
        else:
            # A JSON body cut short: make sure the client sees a truncated
            # response, never a falsely complete one.
            request.channel.forceAbortClient()
        self._finished(exchange.status)

    # -- IPushProducer, for the client's side --------------------------------

    def pauseProducing(self) -> None:
        # Silence while the client is the slow side is not upstream idleness.
        self._clientPaused = True
        self._cancelIdleTimer()
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._clientPaused = False
        if self._waiting is None:
            self._startIdleTimer()
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()

    def _startIdleTimer(self) -> None:
        if self._idleTimer is None and not self._done and self._ended is None:
            self._idleTimer = self._context.clock.callLater(self._context.idleTimeout, self._idleTimeout)

    def _cancelIdleTimer(self) -> None:
        if self._idleTimer is not None:
            if self._idleTimer.active():
                self._idleTimer.cancel()
            self._idleTimer = None

    def _idleTimeout(self) -> None:
        self._idleTimer = None
        self._idleTimedOut = True
        self.producer.stopProducing()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            if not self._clientGone:
                self._request.unregisterProducer()

    # -- endings ------------------------------------------------------------

    def _clientLost(self, failure: Failure) -> None:
        """
        The client went away: stop spending the user's quota at once.
        """
        self._clientGone = True
        self._registered = False
        if not self._answered and self._forwarder is not None:
            self._forwarder.cancel("client")
        elif self.transport is not None and self._ended is None:
            self.producer.stopProducing()

    def shutdown(self) -> None:
        """
        Cut this relay short because the proxy is stopping.
        """
        if self._done:
            return
        self._shutdown = True
        if not self._answered and self._forwarder is not None:
            self._forwarder.cancel("shutdown")
        elif self.transport is not None and self._ended is None:
            self.producer.stopProducing()

    def _finished(self, status: int, complete: bool = False) -> None:
        if self._done:
            return
        if self._opening is not None:
            # Still billed: read (and sent, if it still can be) first.
            self._sendOpening()
        self._done = True
        self._cancelIdleTimer()
        self._exchange.status = status
        if self._forwarder is not None:
            self._forwarder.done(*self._outcome(status))
        self._inFlight.discard(self)
        self._context.reporter.finished(self._exchange)
        if self._body is not None:
            tap = self._readTap()
            if tap is None:
                self._body.close()
            else:
                tap.settle(complete)

    def _outcome(self, status: int) -> tuple[str, int | None]:
        """
        How the relayed answer went, for the limiter: Z.AI's in-band errors
        at 200 count like its 429s.
        """
        if not self._answered or not 200 <= status < 300:
            return "none", None
        tap = self._readTap()
        error = tap.inbandError() if tap is not None else None
        if error is None:
            return "success", None
        limiter = self._context.limiter
        if error.cls == "quota" and limiter is not None and self._context.quotaHold:
            limiter.holdQuota(error)
        if error.cls in ("frequency", "unknown"):
            return "frequency", None
        if error.cls == "concurrency":
            return "concurrency", limiter.admission.inFlight if limiter is not None else None
        return "none", None

    def _bug(self, failure: Failure) -> None:
        """
        The last errback of every chain: a bug here must not hang the client.
        """
        self.log.failure("relay for {route} failed", failure=failure, route=self._route.label)
        if self._done:
            return
        self._unregister()
        request = self._request
        if not self._clientGone:
            if not request.startedWriting:
                self._exchange.responseBytes = respondWithError(
                    request, self._route.dialect, 500, "internal proxy error"
                )
            elif not request.finished:
                request.channel.forceAbortClient()
        self._finished(500)
