# -*- test-case-name: tests.test_relay -*-
"""
One request's journey: get an answer from Z.AI (L{Forwarder}: admission,
attempts, retries), write it to the client, relaying a body chunk by chunk
with backpressure, and stop the upstream as soon as the client leaves.

The relay is the only writer to the client once a request is routed, and
the only one to end it: when it is over, its L{Exchange} is frozen into a
L{Record} and handed to the reporter, once. Its phases and the moves
between them are in L{zaiproxy.relay.states}.

A L{Relay} is the body protocol of the upstream response and the push
producer registered with the client's request, so a client that reads
slowly pauses the upstream socket itself (no buffering in the proxy), and
every chunk goes from one socket to the other in a single method call, but
for a stream's opening: the chunks of its first upstream read go out as one
write, just before the poll that sends them.

When token counting is on, the answer is read for usage as it passes
(L{zaiproxy.relay.reading}); a piece still being counted holds back the
rest, with the upstream paused (L{zaiproxy.relay.pieces}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from zaiproxy.dialects import respondWithError, streamErrorEvent
from zaiproxy.limits.admission import Permit, clientBucket
from zaiproxy.observe.record import CLIENT_CLOSED, Billed, Exchange
from zaiproxy.relay.answers import writeCounted, writeHead, writePassOn
from zaiproxy.relay.context import InFlight, RelayContext
from zaiproxy.relay.events import StreamEvents
from zaiproxy.relay.forward import PACED_ROUTES, Answer, Forwarder, Gone, PassOn, Refusal, Stream
from zaiproxy.relay.pieces import PieceQueue
from zaiproxy.relay.reading import UsageReading
from zaiproxy.relay.routes import Forward
from zaiproxy.relay.states import CUTS, Cut, Phase, checkMove
from zaiproxy.relay.upstream import BodyProtocol, DiscardBody, DrainBody
from zaiproxy.usage.body import COUNT_TOKENS_ROUTE, RequestBody
from zaiproxy.usage.tap import NOT_SERVED, AnswerKind, Piece, UsageTap, answerKind

__all__ = ["Relay"]


@implementer(IPushProducer)
class Relay(BodyProtocol, TimeoutMixin):
    """
    Forwards one request and writes its answer.

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
        inFlight: InFlight,
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
        self._phase = Phase.FORWARDING
        self._cut: Cut | None = None
        self._forwarder: Forwarder | None = None
        self._permit: Permit | None = None
        self._relayed = False
        self._reading: UsageReading | None = None
        self._events: StreamEvents | None = None
        # A stream's opening: its chunks, and the call that sends them.
        self._opening: list[bytes] = []
        self._openingCall: IDelayedCall | None = None
        # The piece being counted (HELD, or ENDING), and what waits behind it.
        # Made when a stream's usage is read (most answers never need one).
        self._pieces: PieceQueue | None = None
        self._ended: Failure | None = None
        self._clientPaused = False
        self._registered = False
        # notifyFinish() made after the client left never fires: ask first.
        request.notifyFinish().addErrback(self._clientLost)

    def _moveTo(self, phase: Phase) -> None:
        checkMove(self._phase, phase)
        self._phase = phase

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def _kind(self) -> AnswerKind:
        return AnswerKind.NONE if self._reading is None else self._reading.kind

    def _isDone(self) -> bool:
        # A method: after a call that may end the relay, mypy would keep
        # an earlier narrowing of the attribute.
        return self._phase is Phase.DONE

    # -- forwarding ---------------------------------------------------------

    def start(self) -> None:
        """
        Get an answer upstream, then write it.
        """
        self._inFlight.add(self)
        exchange = self._exchange
        countsLocally = self._body is not None and self._route.label == COUNT_TOKENS_ROUTE
        self._forwarder = Forwarder(
            self._context,
            self._request,
            self._route,
            # Fairness by client key name, else by the Go zai-proxy's address buckets.
            exchange.keyName or clientBucket(exchange.client),
            # count_tokens: Z.AI's "not served" is answered by counting here.
            relayedErrors=NOT_SERVED if countsLocally else frozenset(),
        )
        self._forwarder.start().addCallback(self._gotAnswer).addErrback(self._bug)

    def _gotAnswer(self, answer: Answer) -> None:
        if self._isDone():
            # Ended already (by a bug): let go of what the answer holds.
            if isinstance(answer, Stream):
                answer.response.deliverBody(DiscardBody())
                if answer.permit is not None:
                    answer.permit.release()
            return
        assert self._forwarder is not None
        self._forwarder.trail.copyTo(self._exchange)
        if isinstance(answer, Stream):
            self._permit = answer.permit
            self._gotResponse(answer.response)
        elif isinstance(answer, PassOn):
            self._passOn(answer)
        elif isinstance(answer, Refusal):
            for name, value in answer.headers:
                self._request.setHeader(name, value)
            self._fail(answer.status, None, answer.message, answer.code)
        else:
            assert isinstance(answer, Gone)
            self._finished(CLIENT_CLOSED)

    def _fail(self, status: int, errorType: str | None, message: str, code: str | None = None) -> None:
        """
        End with an error of our own, in the client's dialect.
        """
        if errorType is not None:
            self._exchange.failed(errorType)
        self._unregister()
        self._exchange.responseBytes = respondWithError(
            self._request, self._route.dialect, status, message, code
        )
        self._finished(status)

    def _passOn(self, answer: PassOn) -> None:
        if self._cut is Cut.CLIENT_GONE:
            self._finished(CLIENT_CLOSED)
            return
        self._exchange.responseBytes = writePassOn(self._request, answer)
        self._finished(answer.response.code)

    # -- the response -------------------------------------------------------

    def _gotResponse(self, response: IResponse) -> None:
        self._relayed = True
        if self._cut is Cut.CLIENT_GONE:
            response.deliverBody(DiscardBody())
            self._finished(CLIENT_CLOSED)
            return
        contentType = response.headers.getRawHeaders(b"content-type", [b""])[0]
        context = self._context
        if self._body is not None and context.accounting is not None:
            kind = answerKind(self._route.label, response.code, contentType)
            self._reading = UsageReading(
                context.clock, context.accounting, self._route.dialect, self._exchange, self._body, kind
            )
        if self._kind is AnswerKind.LOCAL:
            self._moveTo(Phase.COUNTING)
            self._answerLocally(response)
            return
        if contentType.lower().startswith(b"text/event-stream"):
            watchEnd = 200 <= response.code < 300 and self._route.label in PACED_ROUTES
            self._events = StreamEvents(self._route.dialect, watchEnd)
            self._exchange.stream = True
            self._moveTo(Phase.OPENING)
        else:
            self._moveTo(Phase.RELAYING)
            if self._reading is not None and self._kind is AnswerKind.BODY:
                self._reading.tap()
        keepLength = (
            self._kind is not AnswerKind.BODY
            and self._events is None
            and response.length is not UNKNOWN_LENGTH
        )
        writeHead(self._request, response, keepLength)
        self._exchange.status = response.code
        if response.code >= 400:
            self._exchange.failed(str(response.code))
        response.deliverBody(self)

    def _answerLocally(self, response: IResponse) -> None:
        """
        Z.AI does not serve count_tokens: read and drop its answer (keeping
        the connection for reuse) and count the prompt here.
        """
        response.deliverBody(DrainBody())
        self._exchange.status = 200
        assert self._reading is not None
        self._reading.tap().localCount().addCallbacks(self._localCounted, self._localFailed).addErrback(
            self._bug
        )

    def _localCounted(self, body: bytes) -> None:
        if self._cut is Cut.CLIENT_GONE:
            self._finished(CLIENT_CLOSED)
            return
        self._exchange.responseBytes = writeCounted(self._request, body)
        self._finished(200, complete=True)

    def _localFailed(self, failure: Failure) -> None:
        self.log.failure("counting tokens for count_tokens failed", failure=failure)
        if self._cut is Cut.CLIENT_GONE:
            self._finished(CLIENT_CLOSED)
            return
        self._fail(500, None, "count_tokens is not served upstream and could not be estimated")

    # -- the body, from the upstream --------------------------------------------

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._registered = True
        self._watchIdle()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        exchange = self._exchange
        if exchange.firstByteAt is None:
            exchange.firstByteAt = self._context.clock.seconds()
        events = self._events
        if events is None:
            if self._kind is AnswerKind.BODY:
                self._holdBody(data)
            else:
                self._send(data)
            return
        # Whole events only, so an error event can always follow.
        data = events.whole(data)
        if not data:
            return
        if self._phase is Phase.OPENING:
            # The opening burst (every chunk of this reactor turn) goes out
            # as one piece, just before the poll that sends it.
            self._opening.append(data)
            if self._openingCall is None:
                self._openingCall = self._context.clock.callLater(0, self._openingDue)
            return
        self._relayEvents(data)

    def _holdBody(self, data: bytes) -> None:
        """
        Keep a JSON answer whole (usage may have to be added to it).
        """
        assert self._reading is not None
        held = self._reading.hold(data)
        if held is not None:
            # Too large to account for: pass it on as it came.
            self._send(held)

    def _relayEvents(self, data: bytes) -> None:
        """
        Relay whole events, read by the tap first when they must be.
        """
        reading = self._reading
        if reading is None or reading.kind is not AnswerKind.STREAM or reading.readLater(data):
            self._send(data)
            return
        pieces = reading.tap().feed(data)
        if pieces is None:
            if self._pieces is None or not self._pieces.waiting:
                self._send(data)
                return
            pieces = [data]
        self._emit(pieces)

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
        self._moveTo(Phase.RELAYING)
        opening, self._opening = self._opening, []
        if not opening:
            return
        data = b"".join(opening)
        if self._request.finished:
            # Answered already (an error of ours): read for usage only.
            if self._reading is not None and self._kind is AnswerKind.STREAM:
                self._reading.tap().feed(data)
            return
        self._relayEvents(data)

    def _send(self, data: bytes) -> None:
        self._exchange.responseBytes += len(data)
        self._request.write(data)

    # -- pieces that wait for a count ---------------------------------------

    def _emit(self, pieces: list[Piece]) -> bool:
        """
        Write C{pieces} in order; say whether all were written without
        holding (if not, L{_drained} follows).
        """
        if self._pieces is None:
            self._pieces = PieceQueue(self._send, self._held, self._drained, self._bug)
        return self._pieces.emit(pieces)

    def _held(self) -> None:
        """
        A piece is being counted: while it is, the relay is HELD, with the
        upstream paused.
        """
        if self._phase is Phase.RELAYING:
            self._moveTo(Phase.HELD)
            self.setTimeout(None)
            if self._ended is None and self.transport is not None:
                self.producer.pauseProducing()

    def _drained(self) -> None:
        """
        The held piece, and all behind it, are written.
        """
        if self._phase is Phase.HELD:
            self._moveTo(Phase.RELAYING)
            if self._ended is None and self.transport is not None and not self._clientPaused:
                self.producer.resumeProducing()
                self._watchIdle()
            self._maybeEnd()
        elif self._phase is Phase.ENDING:
            self._endCleanly()

    # -- the end of the response --------------------------------------------

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        if self._phase is Phase.OPENING:
            self._sendOpening()
        self._ended = reason
        self._maybeEnd()

    def _maybeEnd(self) -> None:
        """
        End the response once the upstream has ended and nothing waits.
        """
        reason = self._ended
        if reason is None or self._phase is not Phase.RELAYING:
            return
        if self._cut is Cut.CLIENT_GONE:
            self._finished(CLIENT_CLOSED)
            return
        if self._cut is None and not reason.check(ResponseDone, PotentialDataLoss):
            self._cut = Cut.BROKEN
        if self._cut is None and self._events is not None and self._events.cutShort():
            self._cut = Cut.TRUNCATED
        if self._cut is not None:
            self._streamBroke(self._cut)
            return
        self._moveTo(Phase.ENDING)
        reading = self._reading
        if reading is not None and reading.kind is AnswerKind.BODY:
            self._endBody(reading.tap().endBody())
            return
        pieces: list[Piece] = []
        if self._events is not None:
            rest = self._events.rest()
            if rest:
                pieces.append(rest)
        if reading is not None and reading.kind is AnswerKind.STREAM:
            pieces.extend(reading.tap().endStream())
        if not pieces or self._emit(pieces):
            self._endCleanly()

    def _endCleanly(self) -> None:
        if self._cut is Cut.CLIENT_GONE:
            self._finished(CLIENT_CLOSED)
            return
        self._unregister()
        self._request.finish()
        self._finished(self._exchange.status, complete=True)

    def _endBody(self, piece: Piece) -> None:
        """
        Write a held JSON answer whole, with its (possibly new) length.
        """
        if not isinstance(piece, bytes):
            piece.addErrback(self._bodyFailed).addCallback(self._bodyReady).addErrback(self._bug)
            return
        self._bodyReady(piece)

    def _bodyFailed(self, failure: Failure) -> bytes:
        self.log.failure("adding usage to an answer failed", failure=failure)
        return b""

    def _bodyReady(self, body: bytes) -> None:
        if self._phase is Phase.DONE:
            return
        if self._cut is Cut.CLIENT_GONE:
            self._finished(CLIENT_CLOSED)
            return
        request = self._request
        if request.method != b"HEAD":
            request.setHeader(b"content-length", b"%d" % (len(body),))
            self._send(body)
        self._endCleanly()

    def _streamBroke(self, cut: Cut) -> None:
        """
        End a response the upstream did not finish, so the client can tell.
        """
        answer = CUTS[cut]
        message = answer.message.format(idle=self._context.idleTimeout)
        request = self._request
        self._unregister()
        if not request.startedWriting:
            # Nothing sent yet: a plain error response is still possible.
            self._fail(answer.status, answer.errorType, message)
            return
        if answer.errorType is not None:
            self._exchange.failed(answer.errorType)
        if self._events is not None:
            # Drop the half event; the error event starts on a boundary.
            self._events.drop()
            self._send(streamErrorEvent(self._route.dialect, message))
            request.finish()
        else:
            # A JSON body cut short: make sure the client sees a truncated
            # response, never a falsely complete one.
            request.channel.forceAbortClient()
        self._finished(self._exchange.status)

    # -- IPushProducer, for the client's side --------------------------------

    def pauseProducing(self) -> None:
        # Silence while the client is the slow side is not upstream idleness.
        self._clientPaused = True
        self.setTimeout(None)
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._clientPaused = False
        if self._phase is Phase.OPENING or self._phase is Phase.RELAYING:
            self._watchIdle()
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()

    # -- the idle timeout (TimeoutMixin), while the upstream should send --------

    def _watchIdle(self) -> None:
        if self._ended is None and (self._phase is Phase.OPENING or self._phase is Phase.RELAYING):
            self.setTimeout(self._context.idleTimeout)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's timer, on the relay's clock rather than the global reactor.
        return self._context.clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self._cutShort(Cut.IDLE)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            if self._cut is not Cut.CLIENT_GONE:
                self._request.unregisterProducer()

    # -- endings ------------------------------------------------------------

    def _clientLost(self, failure: Failure) -> None:
        """
        The client went away: stop spending the user's quota at once.
        """
        self._registered = False
        self._cutShort(Cut.CLIENT_GONE)

    def shutdown(self) -> None:
        """
        Cut this relay short because the proxy is stopping.
        """
        self._cutShort(Cut.SHUTDOWN)

    def _cutShort(self, cut: Cut) -> None:
        """
        Stop whatever is under way upstream; the end follows from that.
        The client leaving overrides any other reason.
        """
        if self._phase is Phase.DONE:
            return
        if self._cut is None or cut is Cut.CLIENT_GONE:
            self._cut = cut
        if self._phase is Phase.FORWARDING:
            if self._forwarder is not None:
                self._forwarder.cancel("client" if cut is Cut.CLIENT_GONE else "shutdown")
        elif self.transport is not None and self._ended is None:
            self.producer.stopProducing()

    def _finished(self, status: int, complete: bool = False) -> None:
        """
        The response is over: tell the limiter, and report the request
        (once its usage is counted, if it still is).
        """
        if self._phase is Phase.DONE:
            return
        if self._phase is Phase.OPENING:
            # Still billed: read (and sent, if it still can be) first.
            self._sendOpening()
            if self._isDone():
                return
        self._moveTo(Phase.DONE)
        if self._pieces is not None:
            self._pieces.stop()
        self.setTimeout(None)
        exchange = self._exchange
        exchange.status = status
        tap = self._reading.finished() if self._reading is not None else None
        self._tellLimiter(status, tap)
        self._inFlight.discard(self)
        endedAt = self._context.clock.seconds()
        if tap is None:
            if self._body is not None:
                self._body.close()
            self._report(None, endedAt)
            return
        error = tap.inbandError()
        if error is not None:
            exchange.failed("inband_error")
            exchange.zaiErrors += ((error.cls, error.code),)
        tap.settle(complete, lambda billed: self._report(billed, endedAt))

    def _tellLimiter(self, status: int, tap: UsageTap | None) -> None:
        """
        Give back the admission slot, and tell the limiter how a relayed
        model answer went (Z.AI's in-band errors at 200 count like its 429s).
        """
        limiter = self._context.limiter
        if (
            limiter is not None
            and self._relayed
            and self._route.label in PACED_ROUTES
            and 200 <= status < 300
        ):
            # Before the slot is given back: a concurrency error is judged
            # against the calls in flight with this one.
            limiter.observe(tap.inbandError() if tap is not None else None)
        if self._permit is not None:
            self._permit.release()
            self._permit = None

    def _report(self, billed: Billed | None, endedAt: float) -> None:
        try:
            self._context.reporter.finished(self._exchange.freeze(endedAt, billed))
        except Exception:
            self.log.failure("reporting {route} failed", route=self._route.label)

    def _bug(self, failure: Failure) -> None:
        """
        The last errback of every chain: a bug here must not hang the client.
        """
        self.log.failure("relay for {route} failed", failure=failure, route=self._route.label)
        if self._phase is Phase.DONE:
            return
        self._unregister()
        request = self._request
        if self._cut is not Cut.CLIENT_GONE:
            if not request.startedWriting:
                self._exchange.responseBytes = respondWithError(
                    request, self._route.dialect, 500, "internal proxy error"
                )
            elif not request.finished:
                request.channel.forceAbortClient()
        forwarding = self._phase is Phase.FORWARDING
        self._finished(500)
        if forwarding and self._forwarder is not None:
            # Nothing waits for its answer now: stop spending upstream.
            self._forwarder.cancel("client")
