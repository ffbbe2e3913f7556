# -*- test-case-name: tests.test_accounting -*-
"""
Token accounting: what Z.AI bills for each answer, in metrics and a log line.

Z.AI's reported usage is the truth; the local tiktoken estimate is used only
where usage is missing, and only then is the prompt counted (counting every
prompt would double the proxy's CPU for a number Z.AI already gives). When
an answer lacks usage, estimated usage is added in the dialect's own shape,
because the anthropic SDK fails on a stream without it. Nothing here may
delay or fail a response: every error is logged and the answer goes on.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from datetime import datetime, timedelta, timezone
from typing import IO, Any, Iterable, Union

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from zaiproxy.dialects import Dialect, addUsage, anthropic, openai
from zaiproxy.exchange import Exchange
from zaiproxy.logs import LINE, LineLogger
from zaiproxy.metrics import Metrics
from zaiproxy.sse import Event, EventParser
from zaiproxy.tokens import Counting, OutputText, Usage
from zaiproxy.zai_errors import ZaiError

__all__ = [
    "Accounting",
    "UsageTap",
    "ModelLabels",
    "Pricing",
    "Price",
    "RequestBody",
    "KNOWN_MODELS",
    "Piece",
]

#: Model ids Z.AI has served (zai-api.md section 6.1): always their own label.
KNOWN_MODELS = frozenset(
    [
        "glm-4-plus", "glm-4-air", "glm-4-airx", "glm-4-flash", "glm-4-flashx", "glm-4-long",
        "glm-4-32b-0414-128k", "glm-4",
        "glm-4.5", "glm-4.5-air", "glm-4.5-x", "glm-4.5-airx", "glm-4.5-flash", "glm-4.5v",
        "glm-4.6", "glm-4.6v",
        "glm-4.7", "glm-4.7-flash", "glm-4.7-flashx",
        "glm-5", "glm-5-turbo", "glm-5.1", "glm-5.2", "glm-5.3", "glm-5.3-flash",
    ]
)

#: How many distinct Claude model names may become labels before the rest
#: share "other".
MAX_CLAUDE_LABELS = 24
#: A JSON answer larger than this is relayed without accounting.
MAX_BODY_BYTES = 8 << 20
#: Request bodies up to this size are parsed and counted inline.
INLINE_BODY_BYTES = 16 << 10

_CLAUDE = re.compile(r"(claude-[a-z0-9.-]{1,60}|opus|sonnet|haiku)\Z")
_SUFFIX = re.compile(r"\[[^\]]*\]\Z")

_log = LineLogger(namespace="zaiproxy.tokens")

#: What the tap gives the relay to write: bytes now, or bytes once counted.
Piece = Union[bytes, "Deferred[bytes]"]


class ModelLabels:
    """
    The request's model as a bounded metric label.

    Known GLM ids and configured names are their own label; Claude names
    (which Z.AI maps to a GLM model) stay as requested, up to a cap; a
    request without a model gets C{TOKENIZER_MODEL}; anything else is
    C{other}.
    """

    def __init__(self, extra: Iterable[str], default: str) -> None:
        self._allowed = KNOWN_MODELS | {self._normalise(name) for name in extra}
        self._default = self._normalise(default) or "glm-4"
        self._claude: set[str] = set()

    @staticmethod
    def _normalise(name: str) -> str:
        # Claude Code marks 1M-context models with a "[1m]" suffix.
        return _SUFFIX.sub("", name.strip().lower())

    def label(self, requested: str | None) -> str:
        if not requested:
            return self._default
        name = self._normalise(requested)
        if name in self._allowed:
            return name
        if _CLAUDE.match(name):
            if name in self._claude or len(self._claude) < MAX_CLAUDE_LABELS:
                self._claude.add(name)
                return name
        return "other"


@attrs.frozen
class Price:
    """
    USD per million tokens, by direction.
    """

    input: float
    output: float
    cacheRead: float
    cacheWrite: float

    def of(self, direction: str) -> float:
        return {
            "input": self.input,
            "output": self.output,
            "cache_read": self.cacheRead,
            "cache_write": self.cacheWrite,
        }[direction]


@attrs.frozen
class Pricing:
    """
    The price table and the peak window (the seed's: GLM-4.7 prices, 2x from
    02:00 to 06:00 at UTC-5).
    """

    prices: dict[str, Price]
    peakStart: float = 2.0
    peakEnd: float = 6.0
    utcOffset: float = -5.0
    peakMultiplier: float = 2.0
    _minute: list[Any] = attrs.field(factory=lambda: [None, ""], eq=False, repr=False)

    def tier(self, now: float) -> str:
        minute = int(now // 60)
        if self._minute[0] != minute:
            self._minute[:] = [minute, self._tierAt(minute * 60.0)]
        return self._minute[1]  # type: ignore[no-any-return]

    def _tierAt(self, now: float) -> str:
        local = datetime.fromtimestamp(now, timezone(timedelta(hours=self.utcOffset)))
        hour = local.hour + local.minute / 60.0
        if self.peakStart <= self.peakEnd:
            peak = self.peakStart <= hour < self.peakEnd
        else:
            peak = hour >= self.peakStart or hour < self.peakEnd
        return "peak" if peak else "off_peak"

    def cost(self, model: str, direction: str, tokens: int, tier: str) -> float:
        price = self.prices.get(model) or self.prices.get("*")
        if price is None:
            return 0.0
        factor = self.peakMultiplier if tier == "peak" else 1.0
        return tokens * price.of(direction) * factor / 1e6


class RequestBody:
    """
    The request body, still readable after twisted.web closes the request's
    own copy (a client that leaves is still billed for its prompt).

    A temporary-file body is kept as a duplicate file descriptor and read
    only if its tokens are needed; it is closed when the last reader (a
    counting thread, perhaps) is done, never under it.
    """

    def __init__(self, content: IO[bytes]) -> None:
        self._bytes: bytes | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._readers = 0
        self._closing = False
        if isinstance(content, io.BytesIO):
            self._bytes = content.getvalue()
            self.size = len(self._bytes)
        else:
            content.seek(0, 2)
            self.size = content.tell()
            content.seek(0)
            self._fd = os.dup(content.fileno())

    def read(self) -> bytes:
        if self._bytes is not None:
            return self._bytes
        with self._lock:
            if self._fd is None or self._closing:
                return b""
            self._readers += 1
            fd = self._fd
        try:
            return os.pread(fd, self.size, 0)
        finally:
            with self._lock:
                self._readers -= 1
                self._closeIfIdle()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._bytes = None if self._bytes is None else b""
            self._closeIfIdle()

    def _closeIfIdle(self) -> None:
        if self._closing and self._readers == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _module(dialect: Dialect) -> Any:
    return openai if dialect is Dialect.openai else anthropic


class Accounting:
    """
    What every exchange's accounting shares: the counter, metrics, labels
    and prices.

    @ivar counting: L{None} when C{TOKEN_COUNTING_ENABLED=false}: then the
        proxy relays bodies without reading them, as the seed did.
    """

    def __init__(
        self,
        reactor: Any,
        metrics: Metrics,
        counting: Counting | None,
        labels: ModelLabels,
        pricing: Pricing,
    ) -> None:
        self._reactor = reactor
        self.metrics = metrics
        self.counting = counting
        self.labels = labels
        self.pricing = pricing
        variant = metrics.variant
        if counting is None:
            metrics.tokenCounter.labels("disabled", "none", variant).set(1)
        else:
            metrics.tokenCounter.labels(counting.counter.name, counting.counter.encoding, variant).set(1)

    def health(self) -> dict[str, Any]:
        if self.counting is None:
            return {"enabled": False}
        counter = self.counting.counter
        return {"enabled": True, "counter": counter.name, "encoding": counter.encoding}

    def tapFor(self, label: str, dialect: Dialect, exchange: Exchange, content: IO[bytes]) -> "UsageTap | None":
        """
        A tap for an exchange on a model route, or L{None} (no counting, or
        a route that answers no model call).
        """
        if self.counting is None or label not in ("/v1/messages", "/v1/chat/completions", "/v1/messages/count_tokens"):
            return None
        return UsageTap(self, dialect, exchange, RequestBody(content), label == "/v1/messages/count_tokens")

    # -- counting -----------------------------------------------------------

    def countInput(self, dialect: Dialect, body: RequestBody) -> "Deferred[int]":
        """
        Tokens of everything the request makes the model read; small
        bodies on the reactor thread, large ones (parsing included) in a
        thread.
        """
        assert self.counting is not None
        counting = self.counting

        def count() -> int:
            return counting.countNow(_module(dialect).requestTexts(json.loads(body.read())))

        if body.size <= INLINE_BODY_BYTES:
            return maybeDeferred(count)
        return counting.inThread(count)

    def countTexts(self, texts: list[str]) -> "Deferred[int]":
        assert self.counting is not None
        return self.counting.count(texts)

    # -- recording ----------------------------------------------------------

    def record(self, exchange: Exchange, usage: Usage, source: str, responseModel: str | None) -> None:
        """
        Count one answer's tokens and cost, and log the seed's usage line.
        """
        metrics = self.metrics
        model = self.labels.label(exchange.model)
        now = self._reactor.seconds()
        tier = self.pricing.tier(now)
        for direction, tokens in usage.directions().items():
            if tokens > 0:
                metrics.tokensUsed(direction, model, tier, tokens, self.pricing.cost(model, direction, tokens, tier))
        outputRate = None
        if usage.output > 0 and exchange.firstByteAt is not None:
            generating = now - exchange.firstByteAt
            if generating > 0:
                outputRate = usage.output / generating
        metrics.usageRecorded(source, model, outputRate)
        _log.info(
            LINE,
            line=(
                f"Token usage: input={usage.input}, output={usage.output}, "
                f"cache_read={usage.cacheRead}, cache_write={usage.cacheWrite}, "
                f"source={source}, model={model}"
            ),
            input=usage.input,
            output=usage.output,
            cacheRead=usage.cacheRead,
            cacheWrite=usage.cacheWrite,
            source=source,
            model=model,
            requestedModel=exchange.model,
            responseModel=responseModel,
            route=exchange.route,
        )

    def inbandError(self, exchange: Exchange, error: ZaiError) -> None:
        """
        An error Z.AI reported inside a 200 stream: an upstream error too.
        """
        exchange.errorType = "inband_error"
        self.metrics.upstreamError("inband_error")
        self.metrics.zaiError(error.cls, error.code)


class UsageTap:
    """
    Watches one exchange's answer for usage, and adds usage where it is
    missing.

    The relay asks L{start} what the answer is (a stream to read as it
    passes, a JSON body to hold until its end, a count_tokens call to answer
    locally, or nothing to read), hands it the bytes, and calls L{settle}
    once the exchange is over.
    """

    def __init__(
        self,
        accounting: Accounting,
        dialect: Dialect,
        exchange: Exchange,
        body: RequestBody,
        countTokens: bool,
    ) -> None:
        self._accounting = accounting
        self._dialect = dialect
        self._exchange = exchange
        self._body = body
        self._countTokens = countTokens
        self._module = _module(dialect)
        self._reader = self._module.StreamReader()
        self._parser = EventParser()
        self._mode = "none"
        self._output = self._reader.output
        self._estimate: Deferred[Usage] | None = None
        self._held: list[bytes] = []
        self._heldSize = 0
        self._injected = False
        self._reported: Usage | None = None
        self._responseModel: str | None = None
        self._settled = False

    # -- what kind of answer ---------------------------------------------------

    def answersLocally(self, code: int) -> bool:
        """
        Whether an answer of C{code} is to be replaced by a local count
        (count_tokens that Z.AI does not serve).
        """
        return self._countTokens and code in (404, 405)

    def inbandError(self) -> ZaiError | None:
        """
        An error Z.AI reported inside the answer's stream, if any.
        """
        return self._reader.error

    def start(self, code: int, contentType: bytes) -> str:
        """
        C{"stream"}, C{"body"}, C{"local"} or C{"none"}.
        """
        contentType = contentType.lower()
        if self._countTokens:
            mode = "local" if self.answersLocally(code) else "none"
        elif not 200 <= code < 300:
            mode = "none"
        elif contentType.startswith(b"text/event-stream"):
            mode = "stream"
        elif b"json" in contentType:
            mode = "body"
        else:
            mode = "none"
        self._mode = mode
        return mode

    # -- streams ------------------------------------------------------------

    def feed(self, data: bytes) -> list[Piece] | None:
        """
        Read whole events; return what to write in their place, or L{None}
        when that is C{data} unchanged (all but always: only a stream
        without usage changes).
        """
        try:
            events = self._parser.feed(data)
            read = self._reader.event
            if len(events) == 1:
                # The relay hands over one event a chunk as Z.AI sends them.
                where = read(events[0])
                if where is None:
                    return None
                return self._inject(data, [(events[0], where)])
            wheres = [read(event) for event in events]
        except Exception:
            _log.failure("reading a stream for usage failed", failure=Failure())
            return None
        if not any(wheres):
            return None
        return self._inject(data, list(zip(events, wheres)))

    def _inject(self, data: bytes, injections: list[tuple[Event, str | None]]) -> list[Piece]:
        """
        Rewrite the frames that lack usage (rare: only when Z.AI sends none).
        """
        frames = _splitFrames(data)
        counts = [len(_frameEvents(frame)) for frame in frames]
        if max(counts, default=0) > 1 or sum(counts) != len(injections):
            # The chunk was not cut on event boundaries (a giant event forced
            # a partial write): pass it on untouched rather than guess.
            return [data]
        pending = iter(injections)
        pieces: list[Piece] = []
        for frame in frames:
            replacement: Piece = frame
            for _ in _frameEvents(frame):
                event, where = next(pending, (None, None))
                if event is None or where is None:
                    continue
                if where == "start":
                    # Z.AI's own shape: zeros now, the numbers in message_delta.
                    replacement = anthropic.frameWithUsage(event, "start", Usage())
                elif where == "delta":
                    replacement = self._estimated().addCallback(
                        lambda usage, event=event: anthropic.frameWithUsage(event, "delta", usage)
                    )
                else:
                    replacement = self._estimated().addCallback(
                        lambda usage, frame=frame: self._reader.usageChunk(usage) + frame
                    )
                self._injected = True
            pieces.append(replacement)
        return pieces

    def endStream(self) -> list[Piece]:
        """
        At a clean end: an OpenAI stream that ended without C{[DONE]} and
        without usage still gets its usage chunk.
        """
        if self._dialect is Dialect.openai and self._reader.usage is None and not self._injected:
            self._injected = True
            return [self._estimated().addCallback(self._reader.usageChunk)]
        return []

    # -- JSON bodies --------------------------------------------------------

    def hold(self, data: bytes) -> bool:
        """
        Keep a chunk of a JSON answer; C{False} once it is too large to
        account for (the relay then passes it on as it is).
        """
        self._held.append(data)
        self._heldSize += len(data)
        if self._heldSize > MAX_BODY_BYTES:
            self._mode = "none"
            return False
        return True

    def takeHeld(self) -> bytes:
        held = b"".join(self._held)
        self._held = []
        return held

    def endBody(self) -> Piece:
        """
        The whole JSON answer to write: as received, or with estimated usage
        added when it has none (never to an error body).
        """
        body = self.takeHeld()
        try:
            document = json.loads(body)
        except ValueError:
            self._mode = "none"
            return body
        if not isinstance(document, dict) or "error" in document:
            self._mode = "none"
            return body
        if isinstance(document.get("model"), str):
            self._responseModel = document["model"]
        self._reported = self._module.usageFrom(document.get("usage"))
        if self._reported is not None:
            return body
        self._output = OutputText()
        for text in self._module.responseTexts(document):
            self._output.add("body", text)
        usageJSON = self._module.usageJSON
        return self._estimated().addCallback(lambda usage: addUsage(body, usageJSON(usage)) or body)

    # -- count_tokens -------------------------------------------------------

    def localCount(self) -> "Deferred[bytes]":
        """
        C{{"input_tokens": N}} for a count_tokens call Z.AI does not serve.
        """
        return self._accounting.countInput(self._dialect, self._body).addCallback(
            lambda n: json.dumps({"input_tokens": n}).encode()
        )

    # -- estimates ----------------------------------------------------------

    def _estimated(self) -> "Deferred[Usage]":
        """
        The estimated usage of this answer, counted once (the prompt, and the
        output accumulated so far); each caller gets its own Deferred.
        """
        if self._estimate is None:
            accounting = self._accounting
            output = self._output
            self._estimate = (
                accounting.countInput(self._dialect, self._body)
                .addCallback(
                    lambda inputTokens: accounting.countTexts(output.texts()).addCallback(
                        lambda kept: Usage(input=inputTokens, output=output.extrapolate(kept))
                    )
                )
                .addErrback(self._countFailed)
            )
        mine: Deferred[Usage] = Deferred()
        self._estimate.addCallback(_fanOut(mine))
        return mine

    def _countFailed(self, failure: Failure) -> Usage:
        _log.failure("counting tokens failed; reporting zero", failure=failure)
        return Usage()

    # -- the end ------------------------------------------------------------

    def settle(self, complete: bool) -> None:
        """
        Record this answer's usage: as reported, else estimated (C{partial}
        when it was cut short after it began), then let go of the body.

        Nothing is recorded for errors, count_tokens calls, or answers that
        never began (whether Z.AI bills a cancelled call is not known).
        """
        if self._settled:
            return
        self._settled = True
        accounting = self._accounting
        exchange = self._exchange
        reader = self._reader
        if reader.error is not None:
            accounting.inbandError(exchange, reader.error)
        reported = self._reported or (reader.usage if reader.final else None)
        model = self._responseModel or reader.model
        began = exchange.firstByteAt is not None and self._mode in ("stream", "body")
        if reported is not None:
            accounting.record(exchange, reported, "reported", model)
        elif began and not (reader.error is not None and not self._output):
            source = "estimated" if complete else "partial"
            # A real prompt count from an unfinished message_start still holds.
            start = reader.usage or Usage()
            self._estimated().addCallback(
                lambda usage: accounting.record(
                    exchange,
                    Usage(start.input or usage.input, usage.output, start.cacheRead, start.cacheWrite),
                    source,
                    model,
                )
            ).addErrback(lambda f: _log.failure("recording usage failed", failure=f))
        if self._estimate is None:
            self._body.close()
        else:
            self._estimate.addBoth(_closeAfter(self._body))


def _fanOut(target: "Deferred[Any]") -> Any:
    """
    Pass a shared Deferred's result on to C{target}, keeping it for others.
    """

    def passOn(result: Any) -> Any:
        target.callback(result)
        return result

    return passOn


def _closeAfter(body: RequestBody) -> Any:
    def close(result: Any) -> Any:
        body.close()
        return result

    return close


_TERMINATOR = re.compile(rb"\r\n\r\n|\n\n")


def _splitFrames(data: bytes) -> list[bytes]:
    """
    Whole frames (each with its terminator) of a chunk the relay aligned.
    """
    frames, start = [], 0
    for match in _TERMINATOR.finditer(data):
        frames.append(data[start : match.end()])
        start = match.end()
    if start < len(data):
        frames.append(data[start:])
    return frames


def _frameEvents(frame: bytes) -> list[Event]:
    """
    The events one frame dispatches (none for a comment or an empty frame).
    """
    return EventParser().feed(frame + b"\n\n")
