# -*- test-case-name: tests.test_sse -*-
"""
Server-sent events: an incremental parser for both dialects, and where
events end in a byte stream.

The relay writes whole events to the client, so that when the upstream
breaks mid-stream it can still append an error event the client's SDK will
parse, instead of gluing it to half a frame. The parser reads the same bytes
for accounting; it must give the same events however the bytes are cut
into chunks, and nothing an upstream sends may make it raise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_PARTIAL_EVENT",
    "Event",
    "EventParser",
    "framesMentioning",
    "keptData",
    "lastEventEnd",
    "readJSON",
]

#: A partial event longer than this is passed on anyway: holding back more
#: would make a stream without blank lines wait for its end.
MAX_PARTIAL_EVENT = 1 << 16

#: An event whose data grows past this is dropped (and counted), so a stream
#: that never sends a blank line cannot grow the parser without bound.
MAX_EVENT_BYTES = 16 << 20

_BOM = b"\xef\xbb\xbf"

_decoder = json.JSONDecoder()
_decode = _decoder.raw_decode
#: Only JSON's own whitespace (not str.isspace's) to the end, as json.loads
#: allows after a document.
_TRAILING_WHITESPACE = re.compile(r"[ \t\n\r]*\Z").match


def readJSON(data: bytes) -> Any:
    """
    JSON bytes (an event's data, a JSON answer) read as C{json.loads} would
    read them, raising L{ValueError} where it would, at half its cost on
    the short objects of a stream: C{json.loads} spends as long guessing
    the encoding of bytes and stripping whitespace as it spends parsing.
    Anything but UTF-8 JSON with nothing before it (a BOM, UTF-16, leading
    space) goes to C{json.loads} itself.
    """
    try:
        text = data.decode("utf-8")
        document, end = _decode(text)
    except ValueError:
        return json.loads(data)
    if end != len(text) and _TRAILING_WHITESPACE(text, end) is None:
        return json.loads(data)
    return document


def keptData(kept: bytes) -> list[bytes]:
    """
    The event data in what a stream reader kept undecoded: one event's JSON
    data, or every event of whole frames kept raw.
    """
    if kept[:1] == b"{":
        return [kept]
    return [event.data for event in EventParser().feed(kept)]


def framesMentioning(data: bytes, words: tuple[bytes, ...]) -> list[tuple[bool, bytes]] | None:
    """
    Whole frames cut into the frames that mention one of C{words}, each
    alone (C{True}), and the runs of frames between them (C{False}), in
    order: C{[(False, data)]} when none is mentioned; L{None} when some
    is and C{data} has a CR (whose frames a blank LF LF does not end).

    A stream reader parses only the frames that may carry what it looks
    for: a burst of many frames is then a few byte searches and one parse
    a frame found, not a parse a frame.
    """
    found = [(at, word) for word in words if (at := data.find(word)) >= 0]
    if not found:
        return [(False, data)]
    if b"\r" in data:
        return None
    spans = []
    for at, word in found:
        while at >= 0:
            start = data.rfind(b"\n\n", 0, at)
            start = 0 if start < 0 else start + 2
            end = data.find(b"\n\n", at)
            end = len(data) if end < 0 else end + 2
            spans.append((start, end))
            at = data.find(word, end)
    spans.sort()
    pieces: list[tuple[bool, bytes]] = []
    at = 0
    for start, end in spans:
        if start < at:
            # A frame that mentions two of the words.
            continue
        if start > at:
            pieces.append((False, data[at:start]))
        pieces.append((True, data[start:end]))
        at = end
    if at < len(data):
        pieces.append((False, data[at:]))
    return pieces


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


class Event(NamedTuple):
    """
    One dispatched event: its C{event:} name (L{None} if it had none) and
    its C{data:} lines joined with LF, as bytes (JSON parsers take bytes).

    A named tuple rather than a frozen attrs class: one is made for every
    event of every stream, and a tuple is made several times faster.
    """

    name: bytes | None
    data: bytes


def _usualFrame(frame: bytes) -> Event | None:
    """
    The event of a frame (LF line ends, its blank line cut off) in one of
    the two usual shapes, C{data: DATA} or C{event: NAME} then C{data: DATA};
    L{None} for any other frame, which is read line by line.
    """
    if frame[:6] == b"data: ":
        if b"\n" not in frame:
            return Event(None, frame[6:])
    elif frame[:7] == b"event: ":
        nl = frame.find(b"\n")
        if frame[nl + 1 : nl + 7] == b"data: " and frame.find(b"\n", nl + 1) < 0:
            return Event(frame[7:nl], frame[nl + 7 :])
    return None


class EventParser:
    """
    Turns chunks of an event stream into L{Event}s, as the WHATWG
    specification reads them: lines end in CRLF, LF or CR (a CR at the end
    of one chunk and an LF at the start of the next are one line end);
    C{data:} lines accumulate; C{:comment} lines, C{id:}, C{retry:} and
    unknown fields are ignored; a blank line dispatches; an event with no
    data is not dispatched.

    @ivar dropped: events discarded for exceeding L{MAX_EVENT_BYTES}.
    """

    def __init__(self, maxEventBytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._skipLF = False
        self._name: bytes | None = None
        self._data: list[bytes] = []
        self._size = 0
        self._maxEventBytes = maxEventBytes
        self._oversized = False
        self._started = False
        # Nothing buffered, no event half read: a chunk that is one whole
        # frame can be taken in one step.
        self._idle = False
        self.dropped = 0

    def feed(self, chunk: bytes) -> list[Event]:
        """
        Parse C{chunk}; return the events it completed.
        """
        if not self._started and not self._buffer and chunk and chunk[:1] != _BOM[:1]:
            # A fresh parser and a stream without a BOM: as idle as it gets.
            self._started = self._idle = True
        if self._idle and chunk[-2:] == b"\n\n" and len(chunk) < self._maxEventBytes and b"\r" not in chunk:
            # One whole frame, the way Z.AI sends them and the relay hands
            # them over.
            event = _usualFrame(chunk[:-2])
            if event is not None:
                return [event]
        events = self._feed(chunk)
        self._idle = (
            self._started
            and not self._buffer
            and not self._skipLF
            and self._name is None
            and not self._data
            and not self._oversized
        )
        return events

    @property
    def atBoundary(self) -> bool:
        """
        Whether no event is half read, so the next chunk starts a frame.
        """
        return (
            not self._buffer
            and not self._skipLF
            and self._name is None
            and not self._data
            and not self._oversized
        )

    def _feed(self, chunk: bytes) -> list[Event]:
        if self._skipLF and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skipLF = False
        if not chunk:
            return []
        data = self._buffer + chunk if self._buffer else chunk
        if not self._started:
            # A BOM may only start the stream, and may arrive split.
            if len(data) < 3 and _BOM.startswith(data):
                self._buffer = data
                return []
            self._started = True
            if data.startswith(_BOM):
                data = data[3:]
        if b"\r" in data:
            events: list[Event] = []
            for line in self._lines(data):
                event = self._line(line)
                if event is not None:
                    events.append(event)
            return events
        return self._frames(data)

    def _frames(self, data: bytes) -> list[Event]:
        """
        The common case, LF line ends only: cut at blank lines and take the
        usual one- or two-line frames (C{data:}, or C{event:} then C{data:})
        whole; any other frame goes line by line. Reading every line through
        L{_line} cost accounting most of its time on a stream.
        """
        frames = data.split(b"\n\n")
        tail = frames.pop()
        events: list[Event] = []
        limit = self._maxEventBytes
        for frame in frames:
            if len(frame) < limit and self._name is None and not self._data and not self._oversized:
                event = _usualFrame(frame)
                if event is not None:
                    events.append(event)
                    continue
            for line in frame.split(b"\n"):
                event = self._line(line)
                if event is not None:
                    events.append(event)
            event = self._dispatch()
            if event is not None:
                events.append(event)
        if tail:
            for line in self._lines(tail):
                event = self._line(line)
                if event is not None:
                    events.append(event)
        else:
            self._buffer = b""
        return events

    def _lines(self, data: bytes) -> Iterator[bytes]:
        """
        Complete lines of C{data}; the unterminated tail stays buffered.
        """
        start = 0
        size = len(data)
        while start < size:
            lf = data.find(b"\n", start)
            cr = data.find(b"\r", start, lf if lf >= 0 else size)
            if cr >= 0:
                end, nextStart = cr, cr + 1
                if nextStart < size:
                    if data[nextStart] == 0x0A:
                        nextStart += 1
                else:
                    # CR as the last byte: the LF may come in the next chunk.
                    self._skipLF = True
            elif lf >= 0:
                end, nextStart = lf, lf + 1
            else:
                break
            yield data[start:end]
            start = nextStart
        tail = data[start:]
        if len(tail) > self._maxEventBytes:
            # A line without end that keeps growing: drop it.
            self._oversized = True
            tail = b""
        self._buffer = tail

    def _line(self, line: bytes) -> Event | None:
        if not line:
            return self._dispatch()
        if line[:1] == b":":
            return None
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._size += len(value) + 1
            if self._size > self._maxEventBytes:
                self._oversized = True
                self._data = []
            elif not self._oversized:
                self._data.append(value)
        elif field == b"event":
            self._name = value
        return None

    def _dispatch(self) -> Event | None:
        name, data, oversized = self._name, self._data, self._oversized
        self._name = None
        self._data = []
        self._size = 0
        self._oversized = False
        if oversized:
            self.dropped += 1
            return None
        if not data:
            return None
        return Event(name, b"\n".join(data))
