# -*- test-case-name: tests.test_fake_bodies -*-
"""
What the fake model "says" for a scenario, the usage it reports for it, and
the ids it stamps on its answers.

Everything here is a pure function of the scenario, the request body, a
request counter and the clock, so tests can compute the exact numbers and
ids the fake will send.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import attrs

from .errors import BEIJING
from .scenario import Scenario

__all__ = [
    "THINKING_DELTAS",
    "TOOL_ARGUMENTS",
    "TOOL_NAME",
    "Content",
    "Ids",
    "Usage",
    "contentFor",
    "dumps",
    "idsFor",
    "inputTokensFor",
    "usageFor",
]

#: The thinking deltas emitted when C{thinking=true}.
THINKING_DELTAS: tuple[str, ...] = ("Let me think", " about this", " request.")

#: The tool the fake calls when C{tool=true}, and its arguments.
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS: dict[str, str] = {"city": "Paris"}

#: The argument JSON, cut into the fragments a streaming tool call sends.
TOOL_FRAGMENTS: tuple[str, ...] = ('{"city', '": "Pa', 'ris"}')


def dumps(value: object) -> bytes:
    """
    Compact UTF-8 JSON, as Z.AI writes it (non-ASCII text left as is).
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _deltaPiece(scenario: Scenario) -> str:
    if scenario.deltaSize <= 0:
        return scenario.deltaText
    seed = scenario.deltaText or "x"
    repeats = -(-scenario.deltaSize // len(seed))
    return (seed * repeats)[: scenario.deltaSize]


@attrs.frozen
class Content:
    """
    The deltas of one answer, in the order they are sent.

    @ivar thinking: thinking / C{reasoning_content} deltas (may be empty).
    @ivar textDelta: the text of every text delta.
    @ivar textEvents: how many text deltas.
    @ivar toolFragments: tool-call argument fragments (may be empty).
    """

    thinking: tuple[str, ...]
    textDelta: str
    textEvents: int
    toolFragments: tuple[str, ...]

    @property
    def deltaCount(self) -> int:
        """
        How many content deltas the stream carries; C{after} counts these.
        """
        return len(self.thinking) + self.textEvents + len(self.toolFragments)

    @property
    def text(self) -> str:
        """
        The whole answer text.
        """
        return self.textDelta * self.textEvents

    @property
    def thinkingText(self) -> str:
        return "".join(self.thinking)

    @property
    def toolArguments(self) -> str:
        return "".join(self.toolFragments)

    @property
    def generatedChars(self) -> int:
        """
        Characters generated in all deltas (thinking, text and tool JSON).
        """
        return len(self.thinkingText) + len(self.textDelta) * self.textEvents + len(self.toolArguments)


def contentFor(scenario: Scenario) -> Content:
    """
    The deltas C{scenario} produces.
    """
    return Content(
        thinking=THINKING_DELTAS if scenario.thinking else (),
        textDelta=_deltaPiece(scenario),
        textEvents=scenario.events,
        toolFragments=TOOL_FRAGMENTS if scenario.tool else (),
    )


@attrs.frozen
class Usage:
    """
    The token counts the fake reports.

    @ivar inputTokens: uncached input: Anthropic's C{input_tokens}.
    @ivar outputTokens: C{output_tokens} / C{completion_tokens}.
    @ivar cacheReadTokens: C{cache_read_input_tokens} / C{cached_tokens}.
    @ivar reasoningTokens: C{completion_tokens_details.reasoning_tokens}.
    """

    inputTokens: int
    outputTokens: int
    cacheReadTokens: int
    reasoningTokens: int

    @property
    def promptTokens(self) -> int:
        """
        OpenAI's C{prompt_tokens}, which includes the cached part.
        """
        return self.inputTokens + self.cacheReadTokens

    @property
    def totalTokens(self) -> int:
        return self.promptTokens + self.outputTokens


def inputTokensFor(requestBody: bytes) -> int:
    """
    The input token count the fake reports for a request body (also what
    C{count_tokens} answers): one token per four bytes, at least one.
    """
    return max(1, len(requestBody) // 4)


def usageFor(scenario: Scenario, requestBody: bytes) -> Usage:
    """
    The usage the fake reports for C{scenario} answering C{requestBody}.

    Output is one token per four generated characters (at least one);
    reasoning tokens likewise over the thinking text (0 without thinking).
    With C{cacheRead=C}, Anthropic's C{input_tokens} stays the body-derived
    number and OpenAI's C{prompt_tokens} adds C{C}, following each vendor's
    semantics (zai-api.md §2.2, §3.2).
    """
    content = contentFor(scenario)
    thinkingChars = len(content.thinkingText)
    return Usage(
        inputTokens=inputTokensFor(requestBody),
        outputTokens=max(1, content.generatedChars // 4),
        cacheReadTokens=scenario.cacheRead,
        reasoningTokens=max(1, thinkingChars // 4) if thinkingChars else 0,
    )


@attrs.frozen
class Ids:
    """
    The ids of one answer, derived from the request number and the clock.

    @ivar base: Z.AI's C{YYYYMMDDhhmmss} + 16 hex digits id.
    """

    base: str
    created: int

    @property
    def requestId(self) -> str:
        return self.base

    def messageId(self, prefixed: bool) -> str:
        return f"msg_{self.base}" if prefixed else self.base

    @property
    def toolUseId(self) -> str:
        return "toolu_" + self.base[-16:]

    @property
    def toolCallId(self) -> str:
        return "call_" + self.base[-16:]

    @property
    def signature(self) -> str:
        """
        A stand-in for a thinking block signature.
        """
        return "fakesig" + hashlib.sha256(self.base.encode("ascii")).hexdigest()[:24]


def idsFor(counter: int, now: float) -> Ids:
    """
    The ids of the C{counter}-th request answered at C{now}.
    """
    stamp = datetime.fromtimestamp(now, tz=BEIJING).strftime("%Y%m%d%H%M%S")
    digest = hashlib.sha256(b"zfake-%d" % (counter,)).hexdigest()[:16]
    return Ids(base=stamp + digest, created=int(now))
