# -*- test-case-name: tests.test_sse -*-
"""
Server-sent events: where events end in a byte stream.

The relay writes whole events to the client, so that when the upstream
breaks mid-stream it can still append an error event the client's SDK will
parse, instead of gluing it to half a frame.
"""

from __future__ import annotations

__all__ = ["lastEventEnd", "MAX_PARTIAL_EVENT"]

#: A partial event longer than this is passed on anyway: holding back more
#: would make a stream without blank lines wait for its end.
MAX_PARTIAL_EVENT = 1 << 16


def lastEventEnd(data: bytes) -> int:
    """
    The index just past the last blank line (event terminator) in C{data},
    or 0 if there is none.

    Only C{LF LF} and C{CRLF CRLF} count (C{CRLF LF} ends in C{LF LF}); a
    lone trailing C{CR} may be half of a C{CRLF}, so C{CR CR} is not trusted.
    """
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    end = lf + 2 if lf >= 0 else 0
    if crlf >= 0 and crlf + 4 > end:
        end = crlf + 4
    return end
