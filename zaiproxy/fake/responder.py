# -*- test-case-name: tests.test_fake_clock -*-
"""
Perform one request's script on a twisted.web request, as a push producer.

The responder is why the fake is useful for testing a streaming proxy: it
writes at most C{batchSize} bytes per reactor turn and stops as soon as the
transport asks it to pause, so a slow reader really stalls the fake (and a
100 MB stream never sits in a buffer); and it cancels its timer the moment
the client goes away, so no delayed call outlives its request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from .content import dumps
from .scenario import Scenario
from .script import Abort, Action, Finish, Headers, Stall, Wait, Write

__all__ = ["ReceivedRequest", "Responder"]

log = Logger()

_RUNNING = "running"
_STALLED = "stalled"
_FINISHED = "finished"
_DRAINING = "draining"
_ABORTED = "aborted"
_GONE = "gone"


_EXTRA_PHRASES = {429: b"Too Many Requests", 529: b"Overloaded"}


def _phrase(status: int) -> bytes:
    """
    The reason phrase; twisted.web does not know some statuses Z.AI uses.
    """
    return RESPONSES.get(status) or _EXTRA_PHRASES.get(status, b"Status %d" % (status,))


@attrs.define(eq=False)
class ReceivedRequest:
    """
    One request as the fake received it, and what became of the answer.

    @ivar number: 1 for the first request the fake received, and so on.
    @ivar uri: the raw request target, query included.
    @ivar path: the raw path, without the query.
    @ivar query: the raw query string, or L{None} if there was no C{?}.
    @ivar headers: every header pair, repeated headers kept, in arrival
        order (names as twisted.web canonicalises them).
    @ivar body: the exact body bytes.
    @ivar receivedAt: C{clock.seconds()} on arrival.
    @ivar route: C{messages}, C{count_tokens}, C{models}, C{chat}, or
        L{None} for an unknown path.
    @ivar dialect: C{anthropic} or C{openai}: whose envelope errors use.
    @ivar scenario: the scenario applied, once chosen.
    @ivar stream: whether the body asked for a stream.
    @ivar statusCode: the status sent, once sent.
    @ivar bytesSent: response body bytes written so far (updated live).
    @ivar disconnectedAt: when the connection went away before the
        response finished (the client left or the fake aborted).
    @ivar abortedByFake: the fake itself aborted the connection.
    @ivar done: fires with C{"completed"} or C{"disconnected"}.
    """

    number: int
    method: bytes
    uri: bytes
    path: bytes
    query: bytes | None
    headers: list[tuple[bytes, bytes]]
    body: bytes
    receivedAt: float
    route: str | None = None
    dialect: str = "openai"
    scenario: Scenario | None = None
    stream: bool = False
    statusCode: int | None = None
    bytesSent: int = 0
    disconnectedAt: float | None = None
    abortedByFake: bool = False
    done: Deferred[str] = attrs.field(factory=Deferred)

    def header(self, name: bytes) -> list[bytes]:
        """
        Every value of header C{name} (case-insensitive), in order.
        """
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def json(self) -> Any:
        """
        The body parsed as JSON.
        """
        return json.loads(self.body)


@implementer(IPushProducer)
class Responder:
    """
    Drive one response from a script of L{Action}s.

    @cvar batchSize: bytes written per reactor turn before yielding.
    """

    batchSize = 64 * 1024

    def __init__(
        self,
        clock: IReactorTime,
        request: Any,
        record: ReceivedRequest,
        finished: Deferred[None],
        onDone: Callable[[Responder], None] = lambda responder: None,
    ) -> None:
        """
        @param finished: C{request.notifyFinish()}, which the caller must
            call first thing in C{render}: one made after the request ended
            never fires.
        """
        self._clock = clock
        self._request = request
        self._record = record
        self._onDone = onDone
        self._actions: Iterator[Action] = iter(())
        self._call: IDelayedCall | None = None
        self._paused = False
        self._blocked = False
        self._producing = False
        self._state = _RUNNING
        finished.addCallbacks(self._completed, self._gone).addErrback(self._logFailure)

    @property
    def state(self) -> str:
        """
        C{running}, C{stalled}, C{draining} (about to abort), C{finished},
        C{aborted} or C{gone}.
        """
        return self._state

    def run(self, actions: Iterable[Action], streaming: bool = False) -> None:
        """
        Start performing C{actions}; as a registered push producer if
        C{streaming}, so that the transport's back-pressure reaches us.
        """
        self._actions = iter(actions)
        if streaming and self._state == _RUNNING:
            self._request.registerProducer(self, True)
            self._producing = True
        self._step()

    def abort(self) -> None:
        """
        Abort the connection now, whatever the script says.
        """
        if self._state in (_RUNNING, _STALLED, _DRAINING):
            self._cancelCall()
            self._abort()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._blocked and self._call is None and self._state == _RUNNING:
            self._blocked = False
            self._call = self._clock.callLater(0, self._step)

    def stopProducing(self) -> None:
        """
        The connection is going away: stop at once (L{_gone} records it).
        """
        self._cancelCall()
        if self._state in (_RUNNING, _STALLED, _DRAINING):
            self._state = _GONE

    # the script

    def _step(self) -> None:
        self._call = None
        try:
            self._advance()
        except Exception:
            log.failure("fake Z.AI: responder failed", failure=Failure())
            self._failed()

    def _advance(self) -> None:
        budget = self.batchSize
        while self._state == _RUNNING:
            if self._paused:
                self._blocked = True
                return
            action = next(self._actions, Finish())
            if isinstance(action, Write):
                self._request.write(action.data)
                self._record.bytesSent += len(action.data)
                budget -= len(action.data)
                if budget <= 0:
                    self._call = self._clock.callLater(0, self._step)
                    return
            elif isinstance(action, Wait):
                self._call = self._clock.callLater(action.seconds, self._step)
                return
            elif isinstance(action, Headers):
                self._sendHeaders(action)
            elif isinstance(action, Finish):
                self._finish()
            elif isinstance(action, Abort):
                self._abortAfterFlush()
            elif isinstance(action, Stall):
                self._state = _STALLED
            else:
                raise TypeError(f"unknown action {action!r}")

    def _sendHeaders(self, action: Headers) -> None:
        self._request.setResponseCode(action.status, _phrase(action.status))
        for name, value in action.headers:
            self._request.responseHeaders.addRawHeader(name, value)
        self._record.statusCode = action.status
        # An empty write sends the status line and headers now.
        self._request.write(b"")

    def _finish(self) -> None:
        self._state = _FINISHED
        self._unregister()
        self._request.finish()

    def _abortAfterFlush(self, turns: int = 2) -> None:
        """
        Abort once what was written has had time to leave: C{abortConnection}
        throws away the transport's buffer, and a write made while handling
        a read is only sent on the next reactor turn's poll.
        """
        if turns == 0 or not getattr(self._request, "startedWriting", False):
            self._abort()
            return
        self._state = _DRAINING
        self._call = self._clock.callLater(0, self._drained, turns - 1)

    def _drained(self, turns: int) -> None:
        self._call = None
        if self._state != _DRAINING:
            return
        try:
            self._abortAfterFlush(turns)
        except Exception:
            log.failure("fake Z.AI: cannot abort", failure=Failure())

    def _abort(self) -> None:
        self._state = _ABORTED
        self._record.abortedByFake = True
        self._unregister()
        self._request.transport.abortConnection()

    def _unregister(self) -> None:
        if self._producing:
            self._producing = False
            self._request.unregisterProducer()

    def _failed(self) -> None:
        """
        A bug in the fake: answer 500 if we still can, else cut the
        connection so the client does not wait forever.
        """
        if self._state not in (_RUNNING, _STALLED):
            return
        self._cancelCall()
        if not getattr(self._request, "startedWriting", False):
            body = dumps({"error": {"code": "500", "message": "fake Z.AI failed"}})
            self._state = _FINISHED
            self._unregister()
            self._request.setResponseCode(500)
            self._request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json; charset=UTF-8"])
            self._request.write(body)
            self._request.finish()
        else:
            self._abort()

    def _cancelCall(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    # the end

    def _completed(self, _: object) -> None:
        self._state = _FINISHED
        self._cancelCall()
        # Tidy up before firing: a waiter on done runs synchronously.
        self._onDone(self)
        self._record.done.callback("completed")

    def _gone(self, reason: Failure) -> None:
        self._cancelCall()
        if self._state != _ABORTED:
            self._state = _GONE
        self._producing = False
        self._record.disconnectedAt = self._clock.seconds()
        self._onDone(self)
        self._record.done.callback("disconnected")

    def _logFailure(self, failure: Failure) -> None:
        log.failure("fake Z.AI: error ending a response", failure=failure)
