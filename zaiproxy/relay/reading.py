# -*- test-case-name: tests.test_relay -*-
"""
How one relayed answer is read for usage: its kind, and its usage tap,
made only when first needed.

A stream's opening burst is sent before the tap is even made: Twisted
sends what is written when the reactor next polls, so any work done before
that poll would delay the client's first byte. The chunks sent unread are
kept, and read a moment later (or as soon as anything else needs the tap).
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from zaiproxy.dialects import Dialect
from zaiproxy.observe.record import Exchange
from zaiproxy.usage.accounting import Accounting
from zaiproxy.usage.body import RequestBody
from zaiproxy.usage.tap import AnswerKind, UsageTap, readsLater

__all__ = ["MAX_UNREAD", "MAX_UNREAD_BYTES", "READ_OPENING_AFTER", "UsageReading"]

#: Seconds after a stream's first chunk to read its opening burst, unless
#: something reads it sooner. Twisted sends that chunk at its next poll; a
#: call due at once would run before that poll, delaying the first byte.
READ_OPENING_AFTER = 0.001
#: At most this many chunks wait for that read (each is held until then),
#: none larger than MAX_UNREAD_BYTES: a burst larger than an opening (Z.AI's
#: is under 1 KiB) is read as it comes.
MAX_UNREAD = 16
MAX_UNREAD_BYTES = 4096


class UsageReading:
    """
    One answer's reading for usage.

    @ivar kind: what the answer is to the tap; a JSON answer too large to
        hold becomes L{AnswerKind.NONE}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        accounting: Accounting,
        dialect: Dialect,
        exchange: Exchange,
        body: RequestBody,
        kind: AnswerKind,
    ) -> None:
        self.kind = kind
        self._clock = clock
        self._accounting = accounting
        self._dialect = dialect
        self._exchange = exchange
        self._body = body
        self._tap: UsageTap | None = None
        self._unread: list[bytes] = []
        self._readCall: IDelayedCall | None = None

    @property
    def made(self) -> bool:
        """
        Whether the tap exists yet.
        """
        return self._tap is not None

    def tap(self) -> UsageTap:
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
        tap = self._tap = UsageTap(self._accounting, self._dialect, self._exchange, self._body, self.kind)
        if self._unread:
            unread, self._unread = self._unread, []
            tap.readRelayed(unread)
        return tap

    def readLater(self, data: bytes) -> bool:
        """
        Whether whole events of a stream's opening may be sent now and read
        a moment later (kept until then); L{False} once the tap is made, or
        for a chunk that could need usage added.
        """
        if self._tap is not None:
            return False
        if len(data) > MAX_UNREAD_BYTES or len(self._unread) >= MAX_UNREAD or not readsLater(data):
            return False
        self._unread.append(data)
        if self._readCall is None:
            self._readCall = self._clock.callLater(READ_OPENING_AFTER, self._readOpening)
        return True

    def _readOpening(self) -> None:
        self._readCall = None
        self.tap()

    def hold(self, data: bytes) -> bytes | None:
        """
        Keep a chunk of a JSON answer; once it is too large to account for,
        what was held, to pass on as it came (and nothing is held after).
        """
        tap = self.tap()
        if tap.hold(data):
            return None
        self.kind = AnswerKind.NONE
        return tap.takeHeld()

    def finished(self) -> UsageTap | None:
        """
        The tap, once everything relayed is read; L{None} if this answer was
        never read.
        """
        if self._tap is None and self.kind is not AnswerKind.STREAM:
            return None
        return self.tap()
