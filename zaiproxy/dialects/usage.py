# -*- test-case-name: tests.test_tokens -*-
"""
What an answer reports of its cost: its L{Usage} in tokens, and its
L{OutputText}, kept in case the tokens must be counted here.

Values of the wire, shared by the dialects that read them, the accounting
that bills them and the record that carries them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

__all__ = ["OutputText", "Usage", "upstreamId"]

#: Longest upstream id kept (they are about 30 characters).
_MAX_UPSTREAM_ID = 100


def upstreamId(document: dict[str, Any]) -> str | None:
    """
    Z.AI's id of an answer: its C{request_id} when it sends one, else the
    answer's C{id}; bounded, so a ledger row never holds a huge string.
    """
    for key in ("request_id", "id"):
        value = document.get(key)
        if isinstance(value, str) and value:
            return value[:_MAX_UPSTREAM_ID]
    return None


@attrs.frozen
class Usage:
    """
    Tokens of one exchange, in the Go zai-proxy's four directions. C{input} never
    includes cached tokens (Anthropic's meaning; OpenAI's C{prompt_tokens}
    does, so its cached part is moved to C{cacheRead}).
    """

    input: int = 0
    output: int = 0
    cacheRead: int = 0
    cacheWrite: int = 0

    def largest(self, other: Usage) -> Usage:
        """
        Field by field, the larger of two reports of the same answer (Z.AI
        sends 0/0 in message_start and the real numbers in message_delta).
        """
        if (
            other.input >= self.input
            and other.output >= self.output
            and other.cacheRead >= self.cacheRead
            and other.cacheWrite >= self.cacheWrite
        ):
            # The usual case (message_delta's numbers over message_start's).
            return other
        return Usage(
            max(self.input, other.input),
            max(self.output, other.output),
            max(self.cacheRead, other.cacheRead),
            max(self.cacheWrite, other.cacheWrite),
        )

    def directions(self) -> dict[str, int]:
        return {
            "input": self.input,
            "output": self.output,
            "cache_read": self.cacheRead,
            "cache_write": self.cacheWrite,
        }


class OutputText:
    """
    The text of an answer, kept for counting in case Z.AI reports no usage.

    Only the first C{limit} characters are kept: memory per stream stays
    bounded however long it runs. Past that, only characters are counted,
    and the estimate extrapolates them at the tokens-per-character ratio of
    the kept text.

    Stream deltas can be kept raw (L{addLater}) and decoded only if the text
    is ever needed: Z.AI almost always reports usage, so decoding every
    delta's JSON as it passes would be spent for nothing. Raw deltas are
    decoded in batches once they pass C{limit} bytes, so memory stays
    bounded either way.
    """

    def __init__(
        self, limit: int = 1 << 20, decode: Callable[[bytes], Iterable[tuple[str, str]]] | None = None
    ) -> None:
        self._limit = limit
        self._kept = 0
        self._extraChars = 0
        self._parts: dict[str, list[str]] = {}
        self._decode = decode
        self._raw: list[bytes] = []
        self._rawBytes = 0

    def add(self, kind: str, text: str) -> None:
        if not text:
            return
        if self._kept >= self._limit:
            self._extraChars += len(text)
            return
        self._parts.setdefault(kind, []).append(text)
        self._kept += len(text)

    def addLater(self, raw: bytes) -> None:
        """
        Keep an undecoded delta (requires C{decode}); decode the batch when
        it grows past the limit.
        """
        self._raw.append(raw)
        self._rawBytes += len(raw)
        if self._rawBytes > self._limit:
            self._decodeRaw()

    def _decodeRaw(self) -> None:
        raw, self._raw, self._rawBytes = self._raw, [], 0
        decode = self._decode
        assert decode is not None
        for data in raw:
            for kind, text in decode(data):
                self.add(kind, text)

    def texts(self) -> list[str]:
        """
        The kept text of each kind (text, thinking, tool input...), to be
        counted once each rather than delta by delta.
        """
        if self._raw:
            self._decodeRaw()
        return ["".join(parts) for parts in self._parts.values()]

    @property
    def keptChars(self) -> int:
        if self._raw:
            self._decodeRaw()
        return self._kept

    @property
    def extraChars(self) -> int:
        if self._raw:
            self._decodeRaw()
        return self._extraChars

    def __bool__(self) -> bool:
        if self._raw:
            self._decodeRaw()
        return self._kept > 0

    def extrapolate(self, keptTokens: int) -> int:
        """
        Tokens of the whole text, given the count of the kept part.
        """
        if self._raw:
            self._decodeRaw()
        if not self._extraChars or not self._kept:
            return keptTokens
        return keptTokens + round(self._extraChars * keptTokens / self._kept)
