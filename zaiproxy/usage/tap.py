# -*- test-case-name: tests.test_usagetap -*-
"""
The usage tap: one exchange's answer read for usage as it passes, and
usage added where Z.AI left it out.

Nothing read here may delay a byte the client is waiting for: a stream's
opening burst is sent before the tap even exists (the relay keeps it, see
L{readsLater}, and makes the tap once it is sent), a JSON body is held (it
is short, and usage may have to be added to it), and every error is logged
while the answer goes on.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from typing import Any, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from zaiproxy.dialects import Dialect, addUsage, anthropic, dialectModule
from zaiproxy.dialects.sse import Event, EventParser, readJSON
from zaiproxy.dialects.usage import OutputText, Usage, upstreamId
from zaiproxy.dialects.zai_errors import ZaiError
from zaiproxy.observe.logs import LineLogger
from zaiproxy.observe.record import Billed, Exchange
from zaiproxy.usage.accounting import Accounting
from zaiproxy.usage.body import COUNT_TOKENS_ROUTE, RequestBody

__all__ = ["MAX_BODY_BYTES", "NOT_SERVED", "AnswerKind", "Piece", "UsageTap", "answerKind", "readsLater"]

#: A JSON answer larger than this is relayed without accounting.
MAX_BODY_BYTES = 8 << 20

_log = LineLogger(namespace="zaiproxy.tokens")

#: What the tap gives the relay to write: bytes now, or bytes once counted.
Piece = Union[bytes, "Deferred[bytes]"]

_FRAME_ENDS = (b"\n\n", b"\r\n\r\n")


class AnswerKind(enum.Enum):
    """
    What an answer is to the tap.
    """

    #: An SSE stream, read as it passes.
    STREAM = "stream"
    #: A JSON answer, held to its end (usage may have to be added).
    BODY = "body"
    #: count_tokens, which Z.AI does not serve: answered here.
    LOCAL = "local"
    #: Not read: errors, other types, or a JSON answer too large to hold.
    NONE = "none"


#: count_tokens answers Z.AI gives when it does not serve the route: the
#: proxy counts the prompt itself instead.
NOT_SERVED = frozenset([404, 405])


def answerKind(route: str, code: int, contentType: bytes) -> AnswerKind:
    """
    What the answer of C{route} with this status and type is to the tap.
    """
    if route == COUNT_TOKENS_ROUTE:
        return AnswerKind.LOCAL if code in NOT_SERVED else AnswerKind.NONE
    if not 200 <= code < 300:
        return AnswerKind.NONE
    contentType = contentType.lower()
    if contentType.startswith(b"text/event-stream"):
        return AnswerKind.STREAM
    return AnswerKind.BODY if b"json" in contentType else AnswerKind.NONE


def readsLater(chunk: bytes) -> bool:
    """
    Whether a chunk of a stream's opening (whole events, as the relay cuts
    them) may be sent before it is read: no event in it could need usage
    added (see L{UsageTap.feed}). It runs before the first byte, so it is
    a few byte searches, for either dialect: a chunk that merely mentions
    a frame the tap may change is read first (slower, never wrong).
    """
    if not chunk.endswith(_FRAME_ENDS) or b"message_delta" in chunk or b"[DONE]" in chunk:
        return False
    # A message_start whose bytes hold a usage object needs none added: an
    # unescaped '"usage":{' can only be a key (Z.AI's is 0/0 there).
    return b"message_start" not in chunk or b'"usage":{' in chunk or b'"usage": {' in chunk


def _deltaWithUsage(usage: Usage, event: Event) -> bytes:
    return anthropic.frameWithUsage(event, "delta", usage)


class UsageTap:
    """
    Watches one exchange's answer for usage, and adds usage where it is
    missing.

    The relay makes one for an answer of a kind from L{answerKind} (a
    stream once its opening burst is sent), hands it the bytes, and calls
    L{settle} once the exchange is over.
    """

    def __init__(
        self,
        accounting: Accounting,
        dialect: Dialect,
        exchange: Exchange,
        body: RequestBody,
        kind: AnswerKind,
    ) -> None:
        self._accounting = accounting
        self._dialect = dialect
        self._exchange = exchange
        self._body = body
        self._module = dialectModule(dialect)
        self._reader = self._module.StreamReader()
        self._parser = EventParser()
        self._kind = kind
        self._output = self._reader.output
        self._estimate: Deferred[Usage] | None = None
        self._held: list[bytes] = []
        self._heldSize = 0
        self._injected = False
        self._reported: Usage | None = None
        self._responseModel: str | None = None

    def inbandError(self) -> ZaiError | None:
        """
        An error Z.AI reported inside the answer's stream, if any.
        """
        error: ZaiError | None = self._reader.error
        return error

    # -- streams ------------------------------------------------------------

    def readRelayed(self, chunks: list[bytes]) -> None:
        """
        Read the opening chunks the relay sent before this tap was made, in
        order (each passed L{readsLater}), as one: the parser gives the same
        events however the bytes are cut, and L{feed} parses only the frames
        that may carry usage, the model or an error.
        """
        if self.feed(b"".join(chunks)) is not None:
            # Only if the byte test was fooled (a '"usage":{' elsewhere
            # than the message's own, nested in message_start or in
            # another frame of the chunk): too late to add it now.
            _log.warn("a relayed event lacked usage that could no longer be added")

    def feed(self, data: bytes) -> list[Piece] | None:
        """
        Read whole events; return what to write in their place, or L{None}
        when that is C{data} unchanged (all but always: only a stream
        without usage changes).

        Whole frames that cannot matter but for their text (deltas, pings:
        most of a stream) are kept unparsed; of a burst of frames, only
        those that may matter are parsed (see the readers' C{cut}).
        """
        try:
            if self._parser.atBoundary and data.endswith(_FRAME_ENDS):
                cut = self._reader.cut(data)
                if cut is not None:
                    if len(cut) == 1 and not cut[0][0]:
                        # Most of a stream: nothing to parse.
                        self._reader.output.addLater(data)
                        return None
                    return self._feedCut(cut)
            return self._feedWhole(data)
        except Exception:
            _log.failure("reading a stream for usage failed", failure=Failure())
            return None

    def _feedCut(self, cut: list[tuple[bool, bytes]]) -> list[Piece] | None:
        pieces: list[Piece] = []
        changed = False
        for mentions, frames in cut:
            if not mentions:
                # Decoded (by the reader's output) only if ever counted.
                self._reader.output.addLater(frames)
                pieces.append(frames)
                continue
            replaced = self._feedWhole(frames)
            if replaced is None:
                pieces.append(frames)
            else:
                pieces.extend(replaced)
                changed = True
        return pieces if changed else None

    def _feedWhole(self, data: bytes) -> list[Piece] | None:
        events = self._parser.feed(data)
        read = self._reader.event
        if len(events) == 1:
            # The relay hands over one event a chunk as Z.AI sends them.
            where = read(events[0])
            if where is None:
                return None
            return self._inject(data, [(events[0], where)])
        wheres = [read(event) for event in events]
        if not any(wheres):
            return None
        return self._inject(data, list(zip(events, wheres, strict=True)))

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
                    replacement = self._estimated().addCallback(_deltaWithUsage, event)
                elif self._askedForUsage():
                    replacement = self._estimated().addCallback(self._withUsageChunk, frame)
                else:
                    # Counted at the end all the same (see settle).
                    continue
                self._injected = True
            pieces.append(replacement)
        return pieces

    def _withUsageChunk(self, usage: Usage, frame: bytes) -> bytes:
        chunk: bytes = self._reader.usageChunk(usage)
        return chunk + frame

    def endStream(self) -> list[Piece]:
        """
        At a clean end: an OpenAI stream that ended without C{[DONE]} and
        without usage still gets its usage chunk, if the client asked for one.
        """
        if (
            self._dialect is Dialect.openai
            and self._reader.usage is None
            and not self._injected
            and self._askedForUsage()
        ):
            self._injected = True
            return [self._estimated().addCallback(self._reader.usageChunk)]
        return []

    def _askedForUsage(self) -> bool:
        """
        Whether the request set C{stream_options.include_usage}: only then
        does an OpenAI client expect the usage chunk, whose empty
        C{choices} breaks the usual C{chunk.choices[0]} loop. Read only
        when usage is missing (rare), so no request pays for it.
        """
        try:
            request = readJSON(self._body.read())
        except (ValueError, RecursionError):
            return False
        options = request.get("stream_options") if isinstance(request, dict) else None
        return isinstance(options, dict) and options.get("include_usage") is True

    # -- JSON bodies --------------------------------------------------------

    def hold(self, data: bytes) -> bool:
        """
        Keep a chunk of a JSON answer; C{False} once it is too large to
        account for (the relay then passes it on as it is).
        """
        self._held.append(data)
        self._heldSize += len(data)
        if self._heldSize > MAX_BODY_BYTES:
            self._kind = AnswerKind.NONE
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
            document = readJSON(body)
        except ValueError:
            self._kind = AnswerKind.NONE
            return body
        if not isinstance(document, dict) or "error" in document:
            self._kind = AnswerKind.NONE
            return body
        if isinstance(document.get("model"), str):
            self._responseModel = document["model"]
        self._exchange.zaiRequestId = upstreamId(document)
        self._reported = self._module.usageFrom(document.get("usage"))
        if self._reported is not None:
            return body
        self._output = OutputText()
        for text in self._module.responseTexts(document):
            self._output.add("body", text)
        usageJSON = self._module.usageJSON
        return self._estimated().addCallback(lambda usage: addUsage(body, usageJSON(usage)) or body)

    # -- count_tokens -------------------------------------------------------

    def localCount(self) -> Deferred[bytes]:
        """
        C{{"input_tokens": N}} for a count_tokens call Z.AI does not serve.
        """
        return self._accounting.countInput(self._dialect, self._body).addCallback(
            lambda n: json.dumps({"input_tokens": n}).encode()
        )

    # -- estimates ----------------------------------------------------------

    def _estimated(self) -> Deferred[Usage]:
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

    def settle(self, complete: bool, then: Callable[[Billed | None], object]) -> None:
        """
        Hand C{then} this answer's usage, billed: as reported, else
        estimated (C{partial} when it was cut short after it began); then
        let go of the body. C{then} is called at once unless the estimate is
        still being counted; if billing fails, the error is logged and
        C{then} gets L{None}.

        Nothing is billed for errors, count_tokens calls, or answers that
        never began (whether Z.AI bills a cancelled call is not known).
        """
        try:
            billed = self._bill(complete)
        except Exception:
            self._billFailed(Failure())
            billed = None
        if isinstance(billed, Deferred):
            billed.addErrback(self._billFailed).addCallback(then)
        if self._estimate is None:
            self._body.close()
        else:
            self._estimate.addBoth(_closeAfter(self._body))
        if not isinstance(billed, Deferred):
            then(billed)

    def _bill(self, complete: bool) -> Billed | Deferred[Billed] | None:
        accounting = self._accounting
        exchange = self._exchange
        reader = self._reader
        reported = self._reported or (reader.usage if reader.final else None)
        model = self._responseModel or reader.model
        if reader.upstreamId is not None:
            exchange.zaiRequestId = reader.upstreamId
        began = exchange.firstByteAt is not None and self._kind in (AnswerKind.STREAM, AnswerKind.BODY)
        if reported is not None:
            return accounting.bill(exchange, reported, "reported", model)
        if not began or (reader.error is not None and not self._output):
            return None
        source = "estimated" if complete else "partial"
        # A real prompt count from an unfinished message_start still holds.
        start = reader.usage or Usage()
        return self._estimated().addCallback(
            lambda usage: accounting.bill(
                exchange,
                Usage(start.input or usage.input, usage.output, start.cacheRead, start.cacheWrite),
                source,
                model,
            )
        )

    def _billFailed(self, failure: Failure) -> None:
        _log.failure("recording usage failed", failure=failure)


def _fanOut(target: Deferred[Any]) -> Any:
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
