"""
Doubles for tests that run in memory: the relay's upstream over an
in-memory agent, a heap-ordered clock for long simulations, and
twisted.web's request double with its attributes declared.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import IO, Any, cast

from treq.testing import RequestTraversalAgent
from twisted.internet import task
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

__all__ = ["HeapClock", "MemoryUpstream", "PushRequest", "RequestDouble"]


class MemoryUpstream:
    """
    The relay's view of Z.AI (L{zaiproxy.relay.upstream.Upstream}) over an
    in-memory agent; it can also refuse connections.
    """

    def __init__(self, agent: RequestTraversalAgent) -> None:
        self.agent = agent
        self.cooperator = task.Cooperator(started=False)
        self.refuse = 0
        self.calls = 0

    def request(self, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[Any]:
        self.calls += 1
        if self.refuse:
            self.refuse -= 1
            failed: Deferred[Any] = Deferred()
            failed.errback(ConnectionRefusedError())
            return failed
        response: Deferred[Any] = self.agent.request(method, url, headers, body)
        return response


@implementer(IReactorTime)
class HeapClock:
    """
    L{task.Clock} with its pending calls in a heap, for simulations with
    many timers (an admission queue's timeouts): L{task.Clock} sorts the
    whole list on every C{callLater} and after every call it runs, which
    then costs most of the run. Calls due at the same time run in the order
    they were scheduled, as with L{task.Clock}.
    """

    def __init__(self, now: float = 0.0) -> None:
        self.rightNow = now
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def seconds(self) -> float:
        return self.rightNow

    def _push(self, call: DelayedCall) -> None:
        heapq.heappush(self._heap, (call.getTime(), next(self._order), call))

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall:
        # Cancelled calls stay in the heap until they come up, and are
        # dropped then; a call reset to an earlier time is pushed again.
        call = DelayedCall(
            self.rightNow + delay, callable, args, kwargs, lambda c: None, self._push, self.seconds
        )
        self._push(call)
        return call

    def _first(self) -> DelayedCall | None:
        """
        The next call to run, dropping what is stale on the way.
        """
        heap = self._heap
        while heap:
            when, _, call = heap[0]
            if call.cancelled or call.called or when > call.getTime():
                heapq.heappop(heap)
            elif when < call.getTime():
                # Delayed (reset to a later time): it goes back in line.
                heapq.heappop(heap)
                self._push(call)
            else:
                return call
        return None

    def nextCall(self) -> float | None:
        """
        When the next pending call is due, if there is one.
        """
        call = self._first()
        return None if call is None else call.getTime()

    def getDelayedCalls(self) -> list[DelayedCall]:
        # A call reset to an earlier time has two entries until one is due.
        return list({id(call): call for _, _, call in sorted(self._heap) if call.active()}.values())

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        while True:
            call = self._first()
            if call is None or call.getTime() > self.rightNow:
                return
            heapq.heappop(self._heap)
            call.called = 1
            call.func(*call.args, **call.kw)


class RequestDouble(DummyRequest):
    """
    twisted.web's L{DummyRequest}, with the attributes the proxy's code sets
    or reads declared.
    """

    content: IO[bytes]
    # DummyRequest's untyped __init__ makes mypy infer None; setResponseCode sets an int.
    responseCode: int | None  # type: ignore[assignment]

    def asRequest(self) -> Request:
        """
        This double where the code under test expects twisted.web's
        L{Request} (it has the parts that code uses).
        """
        return cast(Request, self)


class PushRequest(RequestDouble):
    """
    A L{DummyRequest} that takes a push producer (the relay) as
    twisted.web does, rather than pulling from it in a loop.
    """

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def startedWriting(self) -> bool:
        # twisted.web's flag, which DummyRequest lacks.
        return bool(self.written)
