"""
Tests for L{zaiproxy.dialects.sse}: event boundaries, and the incremental parser
(proved with hypothesis: any cut of a stream gives the same events, and no
bytes make it raise).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zaiproxy.dialects.sse import Event, EventParser, framesMentioning, keptData, lastEventEnd, readJSON
from zaiproxy.fake import parseScenario, usageFor
from zaiproxy.fake.chat import chatStream
from zaiproxy.fake.content import contentFor, idsFor
from zaiproxy.fake.messages import messageStream


@pytest.mark.parametrize(
    "data, end",
    [
        (b"", 0),
        (b"data: x", 0),
        (b"data: x\n", 0),
        (b"data: x\n\n", 9),
        (b"data: x\n\ndata: y", 9),
        (b"data: x\r\n\r\n", 11),
        (b"data: x\r\n\r\ndata: y\n\n", 20),
        (b"data: x\n\ndata: y\r\n\r\npart", 20),
        (b"data: x\r\n\n", 10),
        (b"data: x\r\r", 0),
        (b"\n\n", 2),
    ],
)
def test_lastEventEnd(data: bytes, end: int) -> None:
    """
    The cut falls just after the last blank line, never inside an event.
    """
    assert lastEventEnd(data) == end


def recorded(spec: str, dialect: str) -> bytes:
    """
    A whole stream as the fake Z.AI sends it.
    """
    scenario = parseScenario(spec)
    body = b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}]}'
    frames = (messageStream if dialect == "anthropic" else chatStream)(
        scenario, contentFor(scenario), usageFor(scenario, body), idsFor(1, 1767225600.0)
    )
    return b"".join(frame.data for frame in frames)


STREAMS = [
    recorded("events=6 thinking=true tool=true deltaText=h%C3%A9llo%20%E6%BC%A2%20", "anthropic"),
    recorded("events=6 thinking=true tool=true", "openai"),
    recorded("events=3 usage=start", "openai"),
    b": comment\r\nevent: a\r\ndata: 1\r\ndata: 2\r\n\r\nid: 7\rretry: 5\rdata:no-space\r\r",
    b"\xef\xbb\xbfdata: bom\n\nevent: empty\n\ndata\n\n: only a comment\n\ndata: [DONE]\n\n",
]


def parseAll(chunks: list[bytes]) -> list[Event]:
    parser = EventParser()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def test_parse() -> None:
    """
    Fields, comments, multi-line data, CR/CRLF/LF, a BOM and data-less
    events are read as the specification says.
    """
    assert parseAll([STREAMS[3]]) == [Event(b"a", b"1\n2"), Event(None, b"no-space")]
    assert parseAll([STREAMS[4]]) == [Event(None, b"bom"), Event(None, b""), Event(None, b"[DONE]")]


def test_recordedStreams() -> None:
    """
    The fake's streams parse into their frames: every Anthropic event is
    named and its data is the JSON of that type.
    """
    events = parseAll([STREAMS[0]])
    assert [e.name for e in events][:2] == [b"message_start", b"ping"]
    assert events[-1].name == b"message_stop"
    for event in events:
        assert event.name is not None
        assert json.loads(event.data)["type"] == event.name.decode()
    chat = parseAll([STREAMS[1]])
    assert chat[-1] == Event(None, b"[DONE]")
    assert all(json.loads(e.data)["object"] == "chat.completion.chunk" for e in chat[:-1])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(STREAMS), st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40))
def test_anySplitSameEvents(stream: bytes, cuts: list[int]) -> None:
    """
    However the bytes are cut into chunks (inside a CRLF, a multi-byte
    character, a field name), the events are the same.
    """
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parseAll(chunks) == parseAll([stream])


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(STREAMS[:3]), st.sampled_from([b"\r\n", b"\r"]))
def test_lineEndingsAgree(stream: bytes, ending: bytes) -> None:
    """
    The same stream with CRLF or CR line ends gives the same events as LF.
    """
    assert parseAll([stream.replace(b"\n", ending)]) == parseAll([stream])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_garbageNeverRaises(chunks: list[bytes]) -> None:
    """
    Random bytes never make the parser raise.
    """
    parseAll(chunks)


def test_oversizedEventDropped() -> None:
    """
    An event larger than the limit (or a line that never ends) is dropped
    and counted; the parser carries on with the next one.
    """
    parser = EventParser(maxEventBytes=100)
    assert parser.feed(b"data: " + b"x" * 60 + b"\ndata: " + b"y" * 60 + b"\n\ndata: ok\n\n") == [
        Event(None, b"ok")
    ]
    assert parser.dropped == 1
    assert parser.feed(b"data: " + b"z" * 500) == []
    assert parser.feed(b"zzz\n\ndata: after\n\n") == [Event(None, b"after")]
    assert parser.dropped == 2


_LINES = st.sampled_from(
    [
        b"data: x",
        b'data: {"a": 1}',
        b"data:",
        b"data",
        b"data:nospace",
        b"event: e",
        b"event:",
        b"event",
        b": comment",
        b"id: 3",
        b"retry: 1",
        b"",
        b"",
        b"",
        b"junk",
        b"event: message_start",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINES, max_size=30), st.lists(st.integers(min_value=0, max_value=1 << 12), max_size=6))
def test_framesAgreeWithLines(lines: list[bytes], cuts: list[int]) -> None:
    """
    The LF-only shortcut (whole one- and two-line frames) gives the same
    events as reading line by line (which CRLF forces), for any mix of
    fields, blank lines and cuts.
    """
    stream = b"\n".join(lines) + b"\n"
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parseAll(chunks) == parseAll([stream.replace(b"\n", b"\r\n")])


def test_frameShortcutRespectsTheLimit() -> None:
    """
    A one-line frame at the size limit goes the long way and is dropped.
    """
    parser = EventParser(maxEventBytes=20)
    assert parser.feed(b"data: " + b"x" * 30 + b"\n\ndata: ok\n\n") == [Event(None, b"ok")]
    assert parser.dropped == 1


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINES, max_size=30))
def test_wholeFramesAgreeWithLines(lines: list[bytes]) -> None:
    """
    Fed a frame a chunk, as the relay hands them over (the one-frame
    shortcut of an idle parser), the events are those of the stream read
    line by line.
    """
    stream = b"\n".join(lines) + b"\n"
    frames = [frame + b"\n\n" for frame in stream.split(b"\n\n")]
    frames[-1] = frames[-1][:-2]
    assert parseAll(frames) == parseAll([stream.replace(b"\n", b"\r\n")])


@pytest.mark.parametrize(
    "chunks, events",
    [
        ([b"event: a\ndata: 1\n\n", b"data: 2\n\n"], [Event(b"a", b"1"), Event(None, b"2")]),
        # An unfinished event before it: the frame adds to that event.
        ([b"event: a\n", b"data: 1\n\n"], [Event(b"a", b"1")]),
        ([b"data: 0\n", b"data: 1\n\n"], [Event(None, b"0\n1")]),
        # A CR ending the previous chunk: its LF is not a blank line.
        ([b"data: 0\r", b"\ndata: 1\n\n"], [Event(None, b"0\n1")]),
        # Looks like one frame, is not.
        ([b"data: 0\n\n", b"data: 1\r\n\n"], [Event(None, b"0"), Event(None, b"1")]),
        ([b"data: 0\n\n", b"event: x\ndata: 1\ndata: 2\n\n"], [Event(None, b"0"), Event(b"x", b"1\n2")]),
        ([b"data: 0\n\n", b"event: x\nid: 1\n\n"], [Event(None, b"0")]),
        ([b"data: 0\n\n", b"event: \ndata: \n\n"], [Event(None, b"0"), Event(b"", b"")]),
    ],
)
def test_frameAfterState(chunks: list[bytes], events: list[Event]) -> None:
    """
    The one-frame shortcut is taken only with nothing pending.
    """
    assert parseAll(chunks) == events


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": [1, 2.5, "\\u00e9"]}',
        b' {"a": 1} ',
        b"[]",
        b'"x"',
        '{"t": "中文"}'.encode(),
        # JSON answers: a trailing newline, a BOM, UTF-16, a huge integer.
        b'{"a": 1}\r\n',
        b'\xef\xbb\xbf{"a": 1}',
        '{"a": "é"}'.encode("utf-16"),
        b"[123456789012345678901234567890]",
    ],
)
def test_readJSON(data: bytes) -> None:
    """
    JSON bytes read as C{json.loads} reads them.
    """
    assert readJSON(data) == json.loads(data)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    ),
    st.sampled_from(["", " ", "\n", "\r\n", "\t "]),
    st.sampled_from(["", " ", "\n"]),
    st.booleans(),
)
def test_readJSONAgrees(value: Any, after: str, before: str, ascii: bool) -> None:
    """
    Any JSON value, with any JSON whitespace around it, reads as
    C{json.loads} reads it.
    """
    data = (before + json.dumps(value, ensure_ascii=ascii) + after).encode()
    assert readJSON(data) == json.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b'{"a": 1} x',
        b'{"a": 1}{}',
        b"\xff",
        b"[DONE]",
        b"nan!",
        b'{"a": 1}\x0b',
        b'{"a": 1}\xc2\xa0',
    ],
)
def test_readJSONRefuses(data: bytes) -> None:
    """
    What C{json.loads} refuses is a L{ValueError} here too.
    """
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        readJSON(data)


def test_firstChunk() -> None:
    """
    A fresh parser takes a whole first frame in one step, yet still drops
    a leading BOM and survives an empty first chunk.
    """
    assert EventParser().feed(b"event: a\ndata: x\n\n") == [Event(b"a", b"x")]
    assert EventParser().feed(b"\xef\xbb\xbfevent: a\ndata: x\n\n") == [Event(b"a", b"x")]
    parser = EventParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"data: x\n\n") == [Event(None, b"x")]


def test_atBoundary() -> None:
    """
    At a boundary only between events: not inside a line, nor between
    the lines of one event.
    """
    parser = EventParser()
    assert parser.atBoundary
    for part, boundary in [
        (b"data: x", False),
        (b"\n", False),
        (b"\n", True),
        (b"event: a\r", False),
        (b"\n\n", True),
    ]:
        parser.feed(part)
        assert parser.atBoundary is boundary, part


def test_keptData() -> None:
    """
    One event's JSON data is itself; whole frames kept raw give each
    event's data, in order, comments and empty frames skipped.
    """
    assert keptData(b'{"a":1}') == [b'{"a":1}']
    frames = b'event: ping\ndata: {"type":"ping"}\n\n: comment\n\ndata: {"b":2}\r\n\r\n'
    assert keptData(frames) == [b'{"type":"ping"}', b'{"b":2}']
    assert keptData(b"") == []


_WORDS = (b"message_start", b"error")


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(_LINES, st.sampled_from([b"data: an error", b'data: {"error":1} error'])), max_size=30)
)
def test_framesMentioning(lines: list[bytes]) -> None:
    """
    Whole frames cut by what they mention: the pieces are the data, in
    order; each piece that mentions a word is one frame, no other piece
    mentions one; and the pieces, each read on its own, give the events
    of the whole (a reader may parse some and keep the rest for later).
    """
    data = b"\n".join(lines) + b"\n\n"
    pieces = framesMentioning(data, _WORDS)
    assert pieces is not None
    assert b"".join(piece for _, piece in pieces) == data
    for mentions, piece in pieces:
        said = any(word in piece for word in _WORDS)
        assert said is mentions
        if mentions:
            assert piece.endswith(b"\n\n") and b"\n\n" not in piece[:-2].lstrip(b"\n")
    assert [event for _, piece in pieces for event in EventParser().feed(piece)] == parseAll([data])


def test_framesMentioningCR() -> None:
    """
    CRLF frames are not cut (a blank LF LF does not end them): read whole.
    Frames that mention nothing are one run.
    """
    assert framesMentioning(b"data: error\r\n\r\n", _WORDS) is None
    # Nothing to cut: kept whole, CR or not.
    assert framesMentioning(b"data: x\r\n\r\n", _WORDS) == [(False, b"data: x\r\n\r\n")]
    assert framesMentioning(b"data: x\n\ndata: y\n\n", _WORDS) == [(False, b"data: x\n\ndata: y\n\n")]
    assert framesMentioning(b"data: x\n\ndata: error\n\ndata: y\n\n", _WORDS) == [
        (False, b"data: x\n\n"),
        (True, b"data: error\n\n"),
        (False, b"data: y\n\n"),
    ]
