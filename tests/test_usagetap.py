"""
Tests for L{zaiproxy.usagetap}: the request body kept for counting, and a
stream's opening burst relayed before it is read (so reading it cannot
delay the first byte), read in order before anything else is decided.

The clock is a L{task.Clock}: C{advance(0)} runs what a reactor turn runs.
"""

from __future__ import annotations

import io
import json
import tempfile
from typing import Any

import pytest_twisted
from twisted.internet import task
from twisted.logger import formatEvent

from zaiproxy.accounting import Accounting, ModelLabels, Pricing
from zaiproxy.dialects import Dialect
from zaiproxy.exchange import Exchange
from zaiproxy.metrics import Metrics
from zaiproxy.tokens import Counting, FallbackCounter
from zaiproxy.usagetap import RequestBody, UsageTap

PROMPT = json.dumps({"model": "glm-4.7", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


def frame(name: str, document: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


ZERO = {"input_tokens": 0, "output_tokens": 0}


def messageStart(usage: dict[str, int] | None = ZERO) -> bytes:
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "glm-4.7", "content": []}
    if usage is not None:
        message["usage"] = usage
    return frame("message_start", {"type": "message_start", "message": message})


#: What Z.AI sends at once, before the first paced delta.
BURST = [
    messageStart(),
    frame("ping", {"type": "ping"}),
    frame("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    frame("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Four."}}),
]
END = [
    frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
    frame("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"input_tokens": 17, "output_tokens": 3}}),
    frame("message_stop", {"type": "message_stop"}),
]


class Tapped:
    """
    One exchange's tap on a clock, with the accounting it records to.
    """

    def __init__(self, dialect: Dialect = Dialect.anthropic, clock: Any = None) -> None:
        self.clock = task.Clock() if clock is None else clock
        self.metrics = Metrics("test", "0")
        self.accounting = Accounting(
            self.clock, self.metrics, Counting(self.clock, FallbackCounter()), ModelLabels([], "glm-4"), Pricing({})
        )
        route = "/v1/chat/completions" if dialect is Dialect.openai else "/v1/messages"
        self.exchange = Exchange(method="POST", route=route, startedAt=0.0, dialect=dialect, model="glm-4.7")
        tap = self.accounting.tapFor(route, dialect, self.exchange, io.BytesIO(PROMPT))
        assert isinstance(tap, UsageTap)
        self.tap = tap
        assert tap.start(200, b"text/event-stream; charset=utf-8") == "stream"
        self.exchange.firstByteAt = 0.0

    def pending(self) -> int:
        return len(self.clock.getDelayedCalls())

    def tokens(self, direction: str) -> float:
        total = 0.0
        for tier in ("peak", "off_peak"):
            total += self.metrics.registry.get_sample_value(
                "zai_proxy_tokens_total",
                {"direction": direction, "model": "glm-4.7", "variant": "test", "pricing_tier": tier},
            ) or 0.0
        return total


def test_requestBody() -> None:
    """
    The body stays readable after twisted.web closes its own copy (a
    temporary file is kept by a duplicate descriptor), until closed.
    """
    small = io.BytesIO(b'{"a":1}')
    body = RequestBody(small)
    small.close()
    assert body.read() == b'{"a":1}' and body.size == 7
    body.close()
    assert body.read() == b""
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 200_000)
        body = RequestBody(f)
    assert body.read() == b"x" * 200_000
    body.close()
    assert body.read() == b""
    body.close()


def test_openingBurstIsReadAfterTheNextPoll() -> None:
    """
    Z.AI's opening frames pass unchanged and unread, and are read later;
    the usage recorded is message_delta's, as without the deferral.
    """
    t = Tapped()
    for data in BURST:
        assert t.tap.feed(data) is None
    assert t.pending() == 1
    t.clock.advance(0)
    assert t.pending() == 0
    for data in END:
        assert t.tap.feed(data) is None
    # Read once opened: nothing more is deferred.
    assert t.pending() == 0
    assert t.tap.endStream() == []
    t.tap.settle(True)
    assert (t.tokens("input"), t.tokens("output")) == (17, 3)


@pytest_twisted.ensureDeferred
async def test_openingBurstIsReadAfterAPoll(reactor: Any) -> None:
    """
    On the real reactor the read runs a turn later than anything scheduled
    with it: after the reactor has polled, which is when Twisted writes
    what the relay wrote.
    """
    t = Tapped(clock=reactor)
    for data in BURST:
        assert t.tap.feed(data) is None
    unread = t.tap._unread
    assert len(unread) == len(BURST)
    # Scheduled after the tap's own call: runs in the same turn.
    await task.deferLater(reactor, 0, lambda: None)
    assert t.tap._unread == BURST
    await task.deferLater(reactor, 0, lambda: None)
    assert t.tap._unread == []
    t.tap.settle(False)


def test_laterChunkReadsTheBurstFirst() -> None:
    """
    A chunk that must be read at once (message_delta) reads the unread
    burst before it, in order, and the deferred read is cancelled.
    """
    t = Tapped()
    for data in BURST:
        t.tap.feed(data)
    assert t.pending() == 1
    for data in END:
        assert t.tap.feed(data) is None
    # message_stop came while the stream was still opening.
    assert t.pending() == 1
    assert t.tap.endStream() == []
    assert t.pending() == 0
    t.tap.settle(True)
    assert (t.tokens("input"), t.tokens("output")) == (17, 3)


def test_messageStartWithoutUsageIsReadAtOnce() -> None:
    """
    A message_start without usage is read before it passes, so Z.AI's
    zeros can be added (the anthropic SDK fails without them).
    """
    t = Tapped()
    pieces = t.tap.feed(messageStart(usage=None))
    assert pieces is not None and len(pieces) == 1
    assert isinstance(pieces[0], bytes)
    assert b'"usage":{"input_tokens":0,"output_tokens":0' in pieces[0].replace(b" ", b"")
    assert t.pending() == 0


def test_settleReadsWhatIsUnread() -> None:
    """
    A client that leaves before the read: settle reads the burst, cancels
    the call, and the in-band error in it is still seen.
    """
    t = Tapped()
    t.tap.feed(BURST[0])
    t.tap.feed(frame("error", {"type": "error", "error": {"code": "1302", "message": "High concurrency usage of this API"}}))
    assert t.pending() == 1
    error = t.tap.inbandError()
    assert error is not None and error.code == "1302"
    assert t.pending() == 0
    t.tap.settle(False)
    assert t.pending() == 0
    assert t.metrics.registry.get_sample_value("zai_proxy_upstream_errors_total", {"error_type": "inband_error", "variant": "test"}) == 1


def test_endStreamReadsWhatIsUnread() -> None:
    """
    An OpenAI stream cut after its opening chunks, without usage: the end
    reads them first, and the usage chunk counts their text.
    """
    t = Tapped(Dialect.openai)
    chunk = {
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "glm-4.7",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Four words are here"}}],
    }
    assert t.tap.feed(b"data: " + json.dumps(chunk).encode() + b"\n\n") is None
    assert t.pending() == 1
    pieces = t.tap.endStream()
    assert t.pending() == 0
    assert len(pieces) == 1
    usageChunk = pieces[0]
    assert not isinstance(usageChunk, bytes)
    written: list[bytes] = []
    usageChunk.addCallback(written.append)
    data = json.loads(written[0].split(b"data: ", 1)[1])
    # FallbackCounter: len("Four words are here") // 4.
    assert data["usage"]["completion_tokens"] == 4


def test_nestedUsageKeyIsNotTheMessagesUsage(logEvents: list[dict[str, Any]]) -> None:
    """
    The rule's known limit: a '"usage":{' anywhere in message_start lets it
    pass unread; if the message itself had none, that is logged (the
    numbers still come from message_delta).
    """
    t = Tapped()
    odd = frame(
        "message_start",
        {"type": "message_start", "message": {"id": "m", "model": "glm-4.7", "content": [], "metadata": {"usage": {}}}},
    )
    assert t.tap.feed(odd) is None
    t.clock.advance(0)
    t.clock.advance(0)
    warnings = [formatEvent(e) for e in logEvents if e.get("log_namespace") == "zaiproxy.tokens"]
    assert warnings == ["a relayed event lacked usage that could no longer be added"]
