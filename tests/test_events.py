"""
Tests for L{zaiproxy.relay.events}: a relayed stream cut on event
boundaries.
"""

from __future__ import annotations

from zaiproxy.dialects import Dialect
from zaiproxy.dialects.sse import MAX_PARTIAL_EVENT
from zaiproxy.relay.events import StreamEvents

START = b'event: message_start\ndata: {"type":"message_start"}\n\n'
DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def test_wholeEventsOnly() -> None:
    """
    A half event waits for the chunk that ends it; whole events pass at
    once, in order, byte for byte.
    """
    events = StreamEvents(Dialect.anthropic, watchEnd=True)
    assert events.whole(START + DELTA[:10]) == START
    assert events.whole(DELTA[10:20]) == b""
    assert events.whole(DELTA[20:] + STOP) == DELTA + STOP
    assert events.rest() == b""
    assert not events.cutShort()


def test_oversizedHalfEventPassesAsItCame() -> None:
    """
    A half event larger than MAX_PARTIAL_EVENT is not held: it passes as
    it came, so a stream without blank lines cannot grow the proxy.
    """
    events = StreamEvents(Dialect.anthropic, watchEnd=False)
    giant = b"data: " + b"x" * MAX_PARTIAL_EVENT
    assert events.whole(giant) == giant
    assert events.rest() == b""


def test_cutShort() -> None:
    """
    A model answer's stream that ended without its last event was cut
    short; its last event in a kept half event (without its blank line)
    counts; a stream not watched never is.
    """
    cut = StreamEvents(Dialect.anthropic, watchEnd=True)
    cut.whole(START + DELTA)
    assert cut.cutShort()
    tail = StreamEvents(Dialect.anthropic, watchEnd=True)
    assert tail.whole(START + STOP[:-1]) == START
    assert not tail.cutShort()
    assert tail.rest() == STOP[:-1]
    unwatched = StreamEvents(Dialect.anthropic, watchEnd=False)
    unwatched.whole(START)
    assert not unwatched.cutShort()


def test_openaiEnd() -> None:
    """
    An OpenAI stream ends with [DONE].
    """
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    events = StreamEvents(Dialect.openai, watchEnd=True)
    events.whole(chunk)
    assert events.cutShort()
    events.whole(b"data: [DONE]\n\n")
    assert not events.cutShort()


def test_drop() -> None:
    """
    Dropping the half event leaves nothing for the end.
    """
    events = StreamEvents(Dialect.anthropic, watchEnd=True)
    events.whole(START + DELTA[:5])
    events.drop()
    assert events.rest() == b""
