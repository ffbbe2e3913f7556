"""
Tests for L{zaiproxy.relay.pieces}: writes in order behind a piece that is
still being counted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from zaiproxy.relay.pieces import PieceQueue
from zaiproxy.usage.tap import Piece


class Written:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.events: list[str] = []
        self.queue = PieceQueue(self.data.append, self.held, self.drained, self.bug)

    def held(self) -> None:
        self.events.append("held")

    def drained(self) -> None:
        self.events.append("drained")

    def bug(self, failure: Failure) -> None:
        raise AssertionError(failure)


def test_bytesPassAtOnce() -> None:
    w = Written()
    assert w.queue.emit([b"a", b"b"])
    assert (w.data, w.events, w.queue.waiting) == ([b"a", b"b"], [], False)


def test_heldPieceHoldsBackTheRest() -> None:
    """
    A piece being counted holds back the pieces after it, and those emitted
    meanwhile; when it fires, all go out in order, then C{drained}.
    """
    w = Written()
    counting: Deferred[bytes] = Deferred()
    assert not w.queue.emit([b"a", counting, b"c"])
    assert (w.data, w.events, w.queue.waiting) == ([b"a"], ["held"], True)
    assert not w.queue.emit([b"d"])
    counting.callback(b"B")
    assert w.data == [b"a", b"B", b"c", b"d"]
    assert w.events == ["held", "drained"]
    assert not w.queue.waiting


def test_countedAlready() -> None:
    """
    A piece counted before it is emitted is held and drained at once: the
    caller hears both, in that order, before emit returns.
    """
    w = Written()
    pieces: list[Piece] = [succeed(b"B"), b"c"]
    assert not w.queue.emit(pieces)
    assert (w.data, w.events) == ([b"B", b"c"], ["held", "drained"])


def test_twoHeldPieces() -> None:
    """
    A second piece being counted, met while draining, holds again.
    """
    w = Written()
    first: Deferred[bytes] = Deferred()
    second: Deferred[bytes] = Deferred()
    w.queue.emit([first, b"x", second, b"y"])
    first.callback(b"1")
    assert (w.data, w.events) == ([b"1", b"x"], ["held", "held"])
    second.callback(b"2")
    assert (w.data, w.events) == ([b"1", b"x", b"2", b"y"], ["held", "held", "drained"])


def test_failedPieceIsWrittenEmpty(logEvents: list[dict[str, Any]]) -> None:
    """
    A piece whose count failed is logged and written empty; the stream goes
    on.
    """
    w = Written()
    counting: Deferred[bytes] = Deferred()
    w.queue.emit([counting, b"c"])
    counting.errback(ValueError("count failed"))
    assert w.data == [b"", b"c"]
    assert w.events == ["held", "drained"]
    [failure] = [e["log_failure"] for e in logEvents if "log_failure" in e]
    assert failure.check(ValueError)


def test_stopped() -> None:
    """
    After the response is over, a piece that fires writes nothing.
    """
    w = Written()
    counting: Deferred[bytes] = Deferred()
    w.queue.emit([counting, b"c"])
    w.queue.stop()
    counting.callback(b"B")
    assert (w.data, w.events) == ([], ["held"])
