# -*- test-case-name: tests.test_events -*-
"""
A relayed SSE stream cut on event boundaries.

The relay writes whole events only, so that an error event it adds (a
stream cut short) always starts on a boundary, and the usage tap always
reads whole events. A half event waits for its end, up to
L{MAX_PARTIAL_EVENT}; past that it is passed on as it came.
"""

from __future__ import annotations

from zaiproxy.dialects import Dialect, streamEnded
from zaiproxy.dialects.sse import MAX_PARTIAL_EVENT, lastEventEnd

__all__ = ["StreamEvents"]


class StreamEvents:
    """
    Whole events of one stream, and whether its last event came.

    @param watchEnd: look for the dialect's last event (a model answer's
        stream): one that ends cleanly without it was cut short.
    """

    def __init__(self, dialect: Dialect, watchEnd: bool) -> None:
        self._dialect = dialect
        self._watchEnd = watchEnd
        self._endSeen = False
        self._partial = b""

    def whole(self, data: bytes) -> bytes:
        """
        The whole events of what has arrived, up to C{data}; a trailing
        half event is kept for the next call (or L{rest}).
        """
        if self._partial:
            data = self._partial + data
        end = lastEventEnd(data)
        if end != len(data):
            if len(data) - end <= MAX_PARTIAL_EVENT:
                self._partial = data[end:]
                data = data[:end]
                if not data:
                    return data
            else:
                self._partial = b""
        else:
            self._partial = b""
        if self._watchEnd and not self._endSeen:
            self._endSeen = streamEnded(self._dialect, data)
        return data

    def rest(self) -> bytes:
        """
        The half event still kept, handed over at the stream's end.
        """
        rest, self._partial = self._partial, b""
        return rest

    def drop(self) -> None:
        """
        Forget the half event: an error event follows on a boundary.
        """
        self._partial = b""

    def cutShort(self) -> bool:
        """
        Whether a model answer's stream, ended cleanly, lacked its last
        event (looked for in a kept half event too, which may lack only
        its blank line).
        """
        if not self._watchEnd or self._endSeen:
            return False
        return not (self._partial and streamEnded(self._dialect, self._partial))
