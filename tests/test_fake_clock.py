"""
Deterministic tests of the fake's timing and flow control: a real
twisted.web channel over an in-memory transport, with a L{task.Clock} as
the fake's clock, so pacing, delays, batching, pausing and disconnects can
be stepped through exactly.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from zaiproxy.fake import FakeZai, ReceivedRequest, Scenario
from zaiproxy.fake.responder import Responder
from zaiproxy.fake.testing import dechunk, delayedCalls

NOW = 1767225600.0
MESSAGES = b"/api/anthropic/v1/messages"
CHAT = b"/api/paas/v4/chat/completions"


class Exchange:
    """
    One request to a fake over an in-memory connection.
    """

    def __init__(
        self,
        fake: FakeZai,
        clock: Clock,
        path: bytes = MESSAGES,
        body: bytes = b'{"stream":true}',
        headers: tuple[tuple[bytes, bytes], ...] = (),
        method: bytes = b"POST",
    ) -> None:
        self.clock = clock
        site = Site(fake, reactor=clock)
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: fake"]
        lines += [name + b": " + value for name, value in headers]
        lines.append(b"Content-Length: %d" % (len(body),))
        self.protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.record: ReceivedRequest = fake.received[-1]
        self._results: list[str] = []

        def keep(result: str) -> str:
            self._results.append(result)
            return result

        self.record.done.addCallback(keep)

    @property
    def raw(self) -> bytes:
        data: bytes = self.transport.value()
        return data

    def disconnected(self) -> bool:
        return self.transport.disconnected

    @property
    def started(self) -> bool:
        return b"\r\n\r\n" in self.raw

    @property
    def body(self) -> bytes:
        head, _, rest = self.raw.partition(b"\r\n\r\n")
        if b"Transfer-Encoding: chunked" in head:
            return dechunk(rest)[0]
        return rest

    # complete() and disconnected() are calls, not properties: mypy would keep
    # a narrowed "not ex.complete" across the clock moving on.
    def complete(self) -> bool:
        _, _, rest = self.raw.partition(b"\r\n\r\n")
        return dechunk(rest)[1]

    def status(self) -> int:
        return int(self.raw.split(b" ", 2)[1])

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionLost()))

    def result(self) -> str | None:
        return self._results[0] if self._results else None

    def pause(self) -> None:
        """
        Do what a TCP transport does when its buffer fills: pause the
        producer registered with it (the HTTP channel).
        """
        assert self.transport.producer is not None
        self.transport.producer.pauseProducing()

    def resume(self) -> None:
        assert self.transport.producer is not None
        self.transport.producer.resumeProducing()


def fakeCalls(clock: Clock) -> list[DelayedCall]:
    """
    The clock's delayed calls that belong to the fake (not twisted.web's
    idle timeout).
    """
    return [c for c in delayedCalls(clock) if isinstance(getattr(c.func, "__self__", None), Responder)]


def runNextTurn(clock: Clock) -> None:
    """
    Run only the fake's next zero-delay call, as one reactor turn would
    (C{Clock.advance(0)} would also run the calls that one schedules).
    """
    [call] = fakeCalls(clock)
    assert call.getTime() == clock.seconds()
    func, args, kw = call.func, call.args, call.kw
    call.cancel()
    func(*args, **kw)


def makeFake(**kwargs: Any) -> tuple[FakeZai, Clock]:
    clock = Clock()
    clock.advance(NOW)
    return FakeZai(clock, **kwargs), clock


def test_intervalPacing() -> None:
    """
    The first delta leaves with the opening frames; each later one waits
    C{interval}; the closing frames follow the last delta at once.
    """
    fake, clock = makeFake(defaults=Scenario(events=3, interval=1.0))
    ex = Exchange(fake, clock)
    assert ex.body.count(b"text_delta") == 1
    assert b"message_start" in ex.body
    clock.advance(0.999)
    assert ex.body.count(b"text_delta") == 1
    clock.advance(0.001)
    assert ex.body.count(b"text_delta") == 2
    assert not ex.complete()
    clock.advance(1.0)
    assert ex.body.count(b"text_delta") == 3
    assert ex.body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert ex.complete()
    assert ex.result() == "completed"
    assert fakeCalls(clock) == []
    assert fake.inFlight == 0
    assert ex.record.bytesSent == len(ex.body)


def test_openaiIntervalPacing() -> None:
    """
    OpenAI chunks are paced the same way; [DONE] follows the final chunk.
    """
    fake, clock = makeFake(defaults=Scenario(events=2, interval=0.5))
    ex = Exchange(fake, clock, CHAT)
    assert ex.body.count(b'"content":"hello "') == 1
    clock.advance(0.5)
    assert ex.body.endswith(b"data: [DONE]\n\n")
    assert ex.complete()


def test_firstByteDelay() -> None:
    """
    Nothing, not even the status line, is sent before C{firstByteDelay}.
    """
    fake, clock = makeFake(defaults=Scenario(firstByteDelay=2.0))
    ex = Exchange(fake, clock, body=b'{"stream":false}')
    assert ex.raw == b""
    clock.advance(1.999)
    assert ex.raw == b""
    clock.advance(0.001)
    assert ex.status() == 200
    assert json.loads(ex.body)["type"] == "message"


def test_firstByteDelayThenReset() -> None:
    """
    C{reset} aborts the connection after C{firstByteDelay}, before any byte.
    """
    fake, clock = makeFake(defaults=Scenario(mode="reset", firstByteDelay=1.0))
    ex = Exchange(fake, clock)
    assert not ex.disconnected()
    clock.advance(1.0)
    assert ex.disconnected()
    assert ex.raw == b""
    assert ex.record.abortedByFake
    ex.disconnect()
    assert ex.result() == "disconnected"


def test_splitDelay() -> None:
    """
    Split frames leave in pieces, C{splitDelay} apart.
    """
    fake, clock = makeFake(defaults=Scenario(events=1, split=True, splitDelay=0.01))
    ex = Exchange(fake, clock, CHAT)
    assert ex.started
    steps = 1
    while not ex.complete():
        # between two steps the client always holds part of a frame
        assert not ex.body.endswith(b"\n\n")
        before = len(ex.raw)
        clock.advance(0.009)
        assert len(ex.raw) == before
        clock.advance(0.001)
        assert len(ex.raw) > before
        steps += 1
    # three frames (delta, final chunk, [DONE]), each in at least two pieces
    assert steps >= 4
    assert ex.body.endswith(b"data: [DONE]\n\n")


def test_batchesPerTurn() -> None:
    """
    Without an interval the responder writes about 64 KiB per reactor turn,
    not the whole stream at once.
    """
    fake, clock = makeFake(defaults=Scenario(events=1000, deltaSize=1000))
    ex = Exchange(fake, clock)
    sizes = [ex.record.bytesSent]
    while ex.result() is None:
        runNextTurn(clock)
        sizes.append(ex.record.bytesSent)
    assert Responder.batchSize <= sizes[0] < Responder.batchSize + 2000
    assert len(sizes) > 15
    steps = [b - a for a, b in pairwise(sizes)]
    assert max(steps) < Responder.batchSize + 2000
    assert ex.body.count(b"text_delta") == 1000
    assert ex.result() == "completed"


def test_pauseAndResume() -> None:
    """
    While the transport is paused nothing is written, however much time
    passes; resuming carries on where it stopped.
    """
    fake, clock = makeFake(defaults=Scenario(events=1000, deltaSize=1000))
    ex = Exchange(fake, clock)
    ex.pause()
    sent = ex.record.bytesSent
    for _ in range(10):
        clock.advance(1)
    assert ex.record.bytesSent == sent
    ex.resume()
    assert ex.record.bytesSent == sent
    while ex.result() is None:
        clock.advance(0)
    assert ex.body.count(b"text_delta") == 1000


def test_pauseDuringInterval() -> None:
    """
    A delta whose time comes while paused waits for the resume.
    """
    fake, clock = makeFake(defaults=Scenario(events=2, interval=1.0))
    ex = Exchange(fake, clock, CHAT)
    ex.pause()
    clock.advance(5)
    assert ex.body.count(b'"content":"hello "') == 1
    ex.resume()
    clock.advance(0)
    assert ex.complete()


def test_disconnectCancelsTimers() -> None:
    """
    A client leaving mid-stream stops the fake at once: the pending delta is
    cancelled, C{disconnectedAt} is the clock's time, C{done} says so.
    """
    fake, clock = makeFake(defaults=Scenario(events=10, interval=1.0))
    ex = Exchange(fake, clock)
    clock.advance(2.5)
    assert len(fakeCalls(clock)) == 1
    ex.disconnect()
    assert fakeCalls(clock) == []
    assert ex.result() == "disconnected"
    assert ex.record.disconnectedAt == NOW + 2.5
    assert fake.inFlight == 0
    sent = ex.record.bytesSent
    clock.advance(100)
    assert ex.record.bytesSent == sent


def test_disconnectDuringFirstByteDelay() -> None:
    """
    Leaving before the headers cancels the first-byte timer too.
    """
    fake, clock = makeFake(defaults=Scenario(firstByteDelay=30))
    ex = Exchange(fake, clock)
    ex.disconnect()
    assert fakeCalls(clock) == []
    assert ex.result() == "disconnected"


def test_hang() -> None:
    """
    C{hang} sends nothing and schedules nothing; only the client's leaving
    ends it.
    """
    fake, clock = makeFake(defaults=Scenario(mode="hang", firstByteDelay=1))
    ex = Exchange(fake, clock)
    assert fakeCalls(clock) == []
    clock.advance(1000)
    assert ex.raw == b""
    assert fake.inFlight == 1
    ex.disconnect()
    assert ex.result() == "disconnected"
    assert fake.inFlight == 0


def test_stallMid() -> None:
    """
    C{stall-mid} sends the opening and C{after} deltas, then nothing more
    and no timers.
    """
    fake, clock = makeFake(defaults=Scenario(mode="stall-mid", after=2, interval=0.1))
    ex = Exchange(fake, clock)
    clock.advance(0.1)
    assert ex.body.count(b"text_delta") == 2
    assert fakeCalls(clock) == []
    clock.advance(1000)
    assert ex.body.count(b"text_delta") == 2
    assert not ex.complete()
    ex.disconnect()
    assert ex.result() == "disconnected"


def test_resetMid() -> None:
    """
    C{reset-mid} aborts the connection after C{after} deltas.
    """
    fake, clock = makeFake(defaults=Scenario(mode="reset-mid", after=1))
    ex = Exchange(fake, clock, CHAT)
    # The abort waits two reactor turns for the writes to leave.
    assert not ex.disconnected()
    runNextTurn(clock)
    assert not ex.disconnected()
    runNextTurn(clock)
    assert ex.disconnected()
    assert ex.body.count(b'"content":"hello "') == 1
    assert not ex.complete()
    assert ex.record.abortedByFake


def test_errorStampFollowsClock() -> None:
    """
    Reset stamps come from the fake's clock, so they are deterministic.
    """
    fake, clock = makeFake(defaults=Scenario(mode="error", code="1308", resetIn=7200))
    ex = Exchange(fake, clock, body=b"{}")
    assert ex.status() == 429
    error = json.loads(ex.body)["error"]
    assert error == {
        "type": "1308",
        "message": "Usage limit reached for 5 hour. Your limit will reset at 2026-01-01 10:00:00",
    }
    assert ex.record.receivedAt == NOW
