# -*- test-case-name: tests.test_pieces -*-
"""
Writes in order, where a piece may still be being counted.

The usage tap hands the relay pieces to write: bytes, or a Deferred of
bytes when usage must be added to a frame and is still being counted.
Such a piece holds back every piece after it (the client must see the
stream in order) until it fires; the relay pauses the upstream meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from zaiproxy.usage.tap import Piece

__all__ = ["PieceQueue"]


class PieceQueue:
    """
    Pieces written in order through C{write}. C{held} is called when a
    piece starts holding the rest back (before anything can release it),
    C{drained} when that piece and everything queued behind it are written
    (perhaps at once, if it was counted already), C{bug} if the writing
    itself fails. A piece that fails is logged and written empty:
    the stream goes on without the usage it would have added.
    """

    log = Logger()

    def __init__(
        self,
        write: Callable[[bytes], None],
        held: Callable[[], None],
        drained: Callable[[], None],
        bug: Callable[[Failure], None],
    ) -> None:
        self._write = write
        self._held = held
        self._drained = drained
        self._bug = bug
        self._waiting: Deferred[bytes] | None = None
        self._backlog: list[Piece] = []
        self._stopped = False

    @property
    def waiting(self) -> bool:
        """
        Whether a piece is still being counted.
        """
        return self._waiting is not None

    def emit(self, pieces: list[Piece]) -> bool:
        """
        Write C{pieces} in order, or queue them behind a held piece; say
        whether all were written without holding (if not, C{drained} says
        when they are).
        """
        if self._waiting is not None:
            self._backlog.extend(pieces)
            return False
        for index, piece in enumerate(pieces):
            if isinstance(piece, bytes):
                self._write(piece)
                continue
            self._waiting = piece
            self._backlog = list(pieces[index + 1 :])
            self._held()
            piece.addErrback(self._failed).addCallback(self._released).addErrback(self._bug)
            return False
        return True

    def stop(self) -> None:
        """
        The response is over: write nothing more.
        """
        self._stopped = True
        self._backlog = []

    def _failed(self, failure: Failure) -> bytes:
        self.log.failure("adding usage to a stream failed", failure=failure)
        return b""

    def _released(self, data: bytes) -> None:
        self._waiting = None
        if self._stopped:
            return
        self._write(data)
        backlog, self._backlog = self._backlog, []
        if self.emit(backlog):
            self._drained()
