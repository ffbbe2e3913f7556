"""
Tests for L{zaiproxy.usage.tap}: which answers are read, which opening
chunks may be sent before they are read, the request body kept for
counting, and what the tap makes of a stream read late or at once.

(That the relay really sends the opening before it makes the tap is in
test_relay.)
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.internet import task
from twisted.logger import formatEvent

from zaiproxy.dialects import Dialect, anthropic, openai
from zaiproxy.dialects.sse import EventParser
from zaiproxy.fake import parseScenario, usageFor
from zaiproxy.fake.chat import chatStream
from zaiproxy.fake.content import contentFor, idsFor
from zaiproxy.fake.messages import messageStream
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.record import Billed, Exchange
from zaiproxy.usage.accounting import Accounting, ModelLabels, Pricing
from zaiproxy.usage.body import COUNTED_ROUTES, RequestBody
from zaiproxy.usage.tap import AnswerKind, UsageTap, answerKind, readsLater
from zaiproxy.usage.tokens import Counting, FallbackCounter

PROMPT = json.dumps(
    {"model": "glm-4.7", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()
#: The same, from a client that asks for OpenAI's usage chunk.
ASKING = json.dumps(
    {
        "model": "glm-4.7",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
).encode()


def frame(name: str, document: dict[str, Any]) -> bytes:
    return (
        b"event: "
        + name.encode()
        + b"\ndata: "
        + json.dumps(document, separators=(",", ":")).encode()
        + b"\n\n"
    )


ZERO = {"input_tokens": 0, "output_tokens": 0}


def messageStart(usage: dict[str, int] | None = ZERO) -> bytes:
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "glm-4.7",
        "content": [],
    }
    if usage is not None:
        message["usage"] = usage
    return frame("message_start", {"type": "message_start", "message": message})


#: What Z.AI sends at once, before the first paced delta.
BURST = [
    messageStart(),
    frame("ping", {"type": "ping"}),
    frame(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    frame(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Four."}},
    ),
]
END = [
    frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
    frame(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 17, "output_tokens": 3},
        },
    ),
    frame("message_stop", {"type": "message_stop"}),
]


class Tapped:
    """
    One exchange's tap on a stream, with the accounting it records to.
    """

    def __init__(self, dialect: Dialect = Dialect.anthropic, prompt: bytes = ASKING) -> None:
        self.clock = task.Clock()
        self.metrics = Metrics("test", "0")
        self.accounting = Accounting(
            self.clock,
            Counting(self.clock, FallbackCounter()),
            ModelLabels([], "glm-4"),
            Pricing({}),
        )
        route = "/v1/chat/completions" if dialect is Dialect.openai else "/v1/messages"
        assert route in self.accounting.countedRoutes
        self.exchange = Exchange(method="POST", route=route, startedAt=0.0, dialect=dialect, model="glm-4.7")
        self.tap = UsageTap(
            self.accounting, dialect, self.exchange, RequestBody(io.BytesIO(prompt)), AnswerKind.STREAM
        )
        self.exchange.firstByteAt = 0.0

    def settle(self, complete: bool) -> Billed | None:
        """
        Settle the tap; count what it bills, as the reporter would.
        """
        billed: list[Billed | None] = []
        self.tap.settle(complete, billed.append)
        [result] = billed
        if result is not None:
            self.metrics.billed(result)
        return result

    def tokens(self, direction: str) -> float:
        total = 0.0
        for tier in ("peak", "off_peak"):
            total += (
                self.metrics.registry.get_sample_value(
                    "zai_proxy_tokens_total",
                    {
                        "direction": direction,
                        "model": "glm-4.7",
                        "variant": "test",
                        "pricing_tier": tier,
                        "client": "-",
                    },
                )
                or 0.0
            )
        return total


def test_countedRoutes() -> None:
    """
    The model routes are read when counting is on, none when it is off.
    """
    clock = task.Clock()
    on = Accounting(clock, Counting(clock, FallbackCounter()), ModelLabels([], "glm-4"), Pricing({}))
    off = Accounting(clock, None, ModelLabels([], "glm-4"), Pricing({}))
    assert (
        on.countedRoutes
        == COUNTED_ROUTES
        == {"/v1/messages", "/v1/chat/completions", "/v1/messages/count_tokens"}
    )
    assert off.countedRoutes == frozenset()


@pytest.mark.parametrize(
    "route, code, contentType, kind",
    [
        ("/v1/messages", 200, b"text/event-stream; charset=utf-8", "stream"),
        ("/v1/messages", 200, b"Text/Event-Stream", "stream"),
        ("/v1/chat/completions", 200, b"application/json", "body"),
        ("/v1/messages", 201, b"application/json; charset=utf-8", "body"),
        ("/v1/messages", 200, b"text/plain", "none"),
        ("/v1/messages", 429, b"application/json", "none"),
        ("/v1/messages", 500, b"text/event-stream", "none"),
        ("/v1/messages/count_tokens", 404, b"application/json", "local"),
        ("/v1/messages/count_tokens", 405, b"text/html", "local"),
        ("/v1/messages/count_tokens", 200, b"application/json", "none"),
    ],
)
def test_answerKind(route: str, code: int, contentType: bytes, kind: str) -> None:
    """
    Streams and JSON answers of success are read; errors never; a
    count_tokens that Z.AI does not serve is answered locally.
    """
    assert answerKind(route, code, contentType) is AnswerKind(kind)


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
@pytest.mark.parametrize(
    "scenario", ["events=3", "events=3 usage=none", "events=2 thinking=true tool=true usage=none"]
)
def test_readsLater(dialect: str, scenario: str) -> None:
    """
    Whatever frame the reader asks usage to be added to, readsLater said
    it must be read first; of a stream with usage, only message_delta or
    [DONE] frames must be.
    """
    parsed = parseScenario(scenario)
    body = b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}]}'
    frames = (messageStream if dialect == "anthropic" else chatStream)(
        parsed, contentFor(parsed), usageFor(parsed, body), idsFor(1, 1767225600.0)
    )
    module = anthropic if dialect == "anthropic" else openai
    reader = module.StreamReader()
    asked, readFirst = 0, 0
    for f in frames:
        first = not readsLater(f.data)
        readFirst += first
        for event in EventParser().feed(f.data):
            if reader.event(event) is not None:
                asked += 1
                assert first, f.data
    assert asked == (0 if "usage=none" not in scenario else 2 if dialect == "anthropic" else 1)
    assert readFirst == (1 if "usage=none" not in scenario else asked)


def test_readsLaterNeedsWholeFrames() -> None:
    """
    A chunk that does not end a frame is read at once (the relay cuts on
    frames; anything else is not guessed at), and so is one that merely
    mentions a frame the tap may change.
    """
    assert readsLater(BURST[1])
    assert not readsLater(BURST[1][:-1])
    assert not readsLater(b"data: {}\n")
    assert readsLater(b"data: {}\r\n\r\n")
    # Text that mentions a frame the tap may change: read first, to be safe.
    mention = frame(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "a message_delta event"},
        },
    )
    assert not readsLater(mention)


def test_burstReadLate() -> None:
    """
    Z.AI's opening frames, read after they were sent: nothing is lost, and
    the usage recorded is message_delta's.
    """
    t = Tapped()
    assert all(readsLater(data) for data in BURST)
    t.tap.readRelayed(BURST)
    for data in END:
        assert t.tap.feed(data) is None
    assert t.tap.endStream() == []
    t.settle(True)
    assert (t.tokens("input"), t.tokens("output")) == (17, 3)


def test_messageStartWithoutUsageIsReadAtOnce() -> None:
    """
    A message_start without usage must be read before it passes, and gets
    Z.AI's zeros (the anthropic SDK fails without them).
    """
    t = Tapped()
    assert not readsLater(messageStart(usage=None))
    pieces = t.tap.feed(messageStart(usage=None))
    assert pieces is not None and len(pieces) == 1
    assert isinstance(pieces[0], bytes)
    assert b'"usage":{"input_tokens":0,"output_tokens":0' in pieces[0].replace(b" ", b"")


def test_inbandErrorReadLate() -> None:
    """
    An in-band error among the frames read late is still seen (the relay
    counts it as an upstream error); an error with no output bills nothing.
    """
    t = Tapped()
    error = frame(
        "error", {"type": "error", "error": {"code": "1302", "message": "High concurrency usage of this API"}}
    )
    assert readsLater(error)
    t.tap.readRelayed([BURST[0], error])
    found = t.tap.inbandError()
    assert found is not None and found.code == "1302"
    assert t.settle(False) is None


def test_inbandErrorInALongBurstReadLate() -> None:
    """
    Chunks after the first are read as one; an error among them is still
    seen.
    """
    t = Tapped()
    error = frame(
        "error", {"type": "error", "error": {"code": "1302", "message": "High concurrency usage of this API"}}
    )
    t.tap.readRelayed([*BURST, error, BURST[3]])
    found = t.tap.inbandError()
    assert found is not None and found.code == "1302"


@pytest.mark.parametrize("dialect", [Dialect.anthropic, Dialect.openai])
def test_aBurstReadLateCountsLikeOneFedAsItCame(dialect: Dialect) -> None:
    """
    A usage-less stream whose opening chunks were sent before the tap was
    made (all but the first read as one): the model, the estimate and the
    usage added at the end are what feeding each chunk as it came gives.
    """
    parsed = parseScenario("events=12 thinking=true usage=none")
    frames = [
        f.data
        for f in (messageStream if dialect is Dialect.anthropic else chatStream)(
            parsed, contentFor(parsed), usageFor(parsed, PROMPT), idsFor(1, 1767225600.0)
        )
    ]
    # The first (a message_start without usage) is read before it is sent.
    opening = frames[1:10]
    assert all(readsLater(data) for data in opening)
    late, fed = Tapped(dialect), Tapped(dialect)
    for t in (late, fed):
        t.tap.feed(frames[0])
    late.tap.readRelayed(opening)
    for data in opening:
        fed.tap.feed(data)
    added = []
    for t in (late, fed):
        added.append([t.tap.feed(data) for data in frames[10:]] + [t.tap.endStream()])
        t.settle(True)
    assert late.tokens("output") == fed.tokens("output") > 0
    assert late.tokens("input") == fed.tokens("input") > 0
    assert late.tap._reader.model == fed.tap._reader.model == "glm-4.7"

    def written(pieces: list[Any]) -> list[bytes]:
        out: list[bytes] = []
        for group in pieces:
            for piece in group or []:
                if isinstance(piece, bytes):
                    out.append(piece)
                else:
                    piece.addCallback(out.append)
        return out

    assert written(added[0]) == written(added[1]) != []


def test_endStreamAfterALateRead() -> None:
    """
    An OpenAI stream cut after its opening chunks, without usage: its usage
    chunk counts the text read late.
    """
    t = Tapped(Dialect.openai)
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "glm-4.7",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Four words are here"}}],
    }
    data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    assert readsLater(data)
    t.tap.readRelayed([data])
    pieces = t.tap.endStream()
    assert len(pieces) == 1
    usageChunk = pieces[0]
    assert not isinstance(usageChunk, bytes)
    written: list[bytes] = []
    usageChunk.addCallback(written.append)
    document = json.loads(written[0].split(b"data: ", 1)[1])
    # FallbackCounter: len("Four words are here") // 4.
    assert document["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    "prompt",
    [
        PROMPT,
        ASKING.replace(b"true}", b"false}"),
        ASKING.replace(b'"include_usage": true', b'"include_usage": "yes"'),
        b"not json",
    ],
)
def test_noUsageChunkUnasked(prompt: bytes) -> None:
    """
    A client that did not set C{stream_options.include_usage} to true gets
    no usage chunk (its empty choices break C{chunk.choices[0]}), at
    C{[DONE]} or at the end; the estimate is recorded all the same.
    """
    scenario = parseScenario("events=3 usage=none")
    data = b"".join(
        f.data for f in chatStream(scenario, contentFor(scenario), usageFor(scenario, PROMPT), idsFor(1, 1.0))
    )
    t = Tapped(Dialect.openai, prompt)
    pieces = t.tap.feed(data)
    assert pieces is None or b"".join(pieces) == data  # type: ignore[arg-type]
    assert t.tap.endStream() == []
    t.settle(True)
    assert (
        t.metrics.registry.get_sample_value(
            "zai_proxy_token_usage_source_total", {"source": "estimated", "variant": "test"}
        )
        == 1
    )
    # FallbackCounter: "hello hello hello " and the prompt "hi"; a prompt
    # that is not JSON cannot be counted (logged), and the estimate is 0.
    expected = (0, 0) if prompt == b"not json" else (1, 4)
    assert (t.tokens("input"), t.tokens("output")) == expected


def test_nestedUsageKeyIsNotTheMessagesUsage(logEvents: list[dict[str, Any]]) -> None:
    """
    The byte rule's known limit: a '"usage":{' anywhere in message_start
    lets it be sent unread; if the message itself had none, that is logged
    (the numbers still come from message_delta).
    """
    t = Tapped()
    odd = frame(
        "message_start",
        {
            "type": "message_start",
            "message": {"id": "m", "model": "glm-4.7", "content": [], "metadata": {"usage": {}}},
        },
    )
    assert readsLater(odd)
    t.tap.readRelayed([odd])
    warnings = [formatEvent(e) for e in logEvents if e.get("log_namespace") == "zaiproxy.tokens"]
    assert warnings == ["a relayed event lacked usage that could no longer be added"]


@pytest.mark.parametrize("dialect", [Dialect.anthropic, Dialect.openai])
def test_framesKeptRawCountLikeParsedOnes(dialect: Dialect) -> None:
    """
    Whole frames that cannot carry usage are kept unparsed; an estimate
    counts their text exactly as if every frame had been parsed (a stream
    cut at odd bytes is always parsed).
    """
    parsed = parseScenario("events=4 thinking=true tool=true usage=none")
    frames = [
        f.data
        for f in (messageStream if dialect is Dialect.anthropic else chatStream)(
            parsed, contentFor(parsed), usageFor(parsed, PROMPT), idsFor(1, 1767225600.0)
        )
    ]
    whole, cut = Tapped(dialect), Tapped(dialect)
    for data in frames:
        whole.tap.feed(data)
    stream = b"".join(frames)
    for at in range(0, len(stream), 7):
        cut.tap.feed(stream[at : at + 7])
    for t in (whole, cut):
        t.tap.endStream()
        t.settle(True)
    assert whole.tokens("output") == cut.tokens("output") > 0
    assert whole.tokens("input") == cut.tokens("input") > 0


@pytest.mark.parametrize("dialect", [Dialect.anthropic, Dialect.openai])
@pytest.mark.parametrize(
    "scenario",
    ["events=6", "events=6 usage=none", "events=5 thinking=true tool=true usage=none", "events=4 inband"],
)
def test_aWholeStreamInOneChunkReadsLikeItsFrames(dialect: Dialect, scenario: str) -> None:
    """
    A whole stream in one chunk (one upstream read, relayed as one write):
    the usage, the model, the in-band error, the estimate and every byte
    written (usage added included) are what feeding it a frame at a time
    gives; and the frames between those that must be read are kept raw,
    as runs, not parsed one by one.
    """
    parsed = parseScenario(scenario.replace(" inband", ""))
    frames = [
        f.data
        for f in (messageStream if dialect is Dialect.anthropic else chatStream)(
            parsed, contentFor(parsed), usageFor(parsed, PROMPT), idsFor(1, 1767225600.0)
        )
    ]
    if "inband" in scenario:
        # Z.AI's in-band error, mid-stream (zai-api.md section 4.2).
        error = {"error": {"code": "1302", "message": "High concurrency usage of this API"}}
        frames.insert(
            5,
            frame("error", {"type": "error", **error})
            if dialect is Dialect.anthropic
            else b"data: " + json.dumps(error).encode() + b"\n\n",
        )
    whole, each = Tapped(dialect), Tapped(dialect)
    added = [[whole.tap.feed(b"".join(frames))], [each.tap.feed(data) for data in frames]]
    for group, t in zip(added, (whole, each), strict=True):
        group.append(t.tap.endStream())
        t.settle(True)

    def written(group: list[Any], frames: list[bytes]) -> bytes:
        out: list[bytes] = []
        # The group's last entry is endStream's, written after the frames.
        for data, pieces in zip(frames, group[:-1], strict=True):
            if pieces is None:
                out.append(data)
                continue
            for piece in pieces:
                if isinstance(piece, bytes):
                    out.append(piece)
                else:
                    piece.addCallback(out.append)
        for piece in group[-1]:
            piece.addCallback(out.append)
        return b"".join(out)

    once = written(added[0], [b"".join(frames)])
    assert once == written(added[1], frames)
    assert whole.tokens("output") == each.tokens("output")
    assert whole.tokens("input") == each.tokens("input")
    assert whole.tap._reader.model == each.tap._reader.model == "glm-4.7"
    assert whole.tap.inbandError() == each.tap.inbandError()
    if "usage=none" in scenario:
        assert once != b"".join(frames)
    if "inband" in scenario:
        found = whole.tap.inbandError()
        assert found is not None and found.code == "1302"
    if "inband" not in scenario:
        assert whole.tokens("output") > 0
    if scenario == "events=6":
        # Never counted (Z.AI's usage holds), so still as kept.
        assert any(run.count(b"\n\n") > 1 for run in whole.tap._reader.output._raw)
