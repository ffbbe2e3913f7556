# -*- test-case-name: tests.test_fake -*-
"""
Turn an answer into a script of wire actions: send headers, write bytes,
wait, finish, abort or fall silent.

This is where a scenario's failure modes, pacing and frame splitting are
applied, independently of the dialect that built the frames and of the
responder that performs the actions. Scripts are lazy iterators so that a
100 MB stream never exists in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise

import attrs

from .scenario import MID_MODES, Scenario

__all__ = [
    "CLOSING",
    "DELTA",
    "STRUCTURE",
    "Abort",
    "Action",
    "Finish",
    "Frame",
    "Headers",
    "Stall",
    "Wait",
    "Write",
    "bodyScript",
    "silentScript",
    "splitFrame",
    "streamScript",
]

#: A frame that carries generated content: counted by C{after}, paced by C{interval}.
DELTA = "delta"
#: A frame around the content (message_start, ping, block start/stop).
STRUCTURE = "structure"
#: A frame that closes the stream cleanly (message_delta/message_stop, final chunk, [DONE]).
CLOSING = "closing"


@attrs.frozen
class Frame:
    """
    One SSE event as bytes, and what kind of event it is.
    """

    data: bytes
    kind: str = STRUCTURE


@attrs.frozen
class Headers:
    """
    Send the status line and these headers now.
    """

    status: int
    headers: Sequence[tuple[bytes, bytes]] = ()


@attrs.frozen
class Write:
    """
    Write these body bytes.
    """

    data: bytes


@attrs.frozen
class Wait:
    """
    Do nothing for this many seconds.
    """

    seconds: float


@attrs.frozen
class Finish:
    """
    End the response cleanly.
    """


@attrs.frozen
class Abort:
    """
    Abort the TCP connection.
    """


@attrs.frozen
class Stall:
    """
    Stop here forever, leaving the connection open.
    """


Action = Headers | Write | Wait | Finish | Abort | Stall


def _multibyteStarts(data: bytes) -> list[int]:
    """
    Offsets of the lead bytes of multi-byte UTF-8 characters in C{data}.
    """
    return [i for i, byte in enumerate(data) if byte >= 0xC0]


def splitFrame(data: bytes, number: int) -> list[bytes]:
    """
    Cut C{data} into two or more pieces at places that vary with C{number}:
    inside the blank-line terminator, after the first byte, in the middle,
    inside the C{data:} prefix, and always inside a multi-byte UTF-8
    character if the frame has one. A one-byte frame cannot be cut.
    """
    size = len(data)
    if size < 2:
        return [data]
    variant = number % 4
    cuts: set[int] = set()
    if variant == 0:
        cuts.add(size - 1)
    elif variant == 1:
        cuts.add(1)
    elif variant == 2:
        cuts.update({size // 3, (2 * size) // 3})
    else:
        dataAt = data.find(b"data:")
        cuts.add(dataAt + 3 if dataAt >= 0 else size // 2)
    starts = _multibyteStarts(data)
    if starts:
        cuts.add(starts[number % len(starts)] + 1)
    positions = sorted(c for c in cuts if 0 < c < size)
    if not positions:
        positions = [size // 2]
    bounds = [0, *positions, size]
    return [data[a:b] for a, b in pairwise(bounds)]


def _delay(seconds: float) -> Iterator[Action]:
    if seconds > 0:
        yield Wait(seconds)


class _Writer:
    """
    Emit writes, cut into pieces when the scenario says so.
    """

    def __init__(self, scenario: Scenario) -> None:
        self._scenario = scenario
        self._count = 0

    def write(self, data: bytes) -> Iterator[Action]:
        if not self._scenario.split:
            yield Write(data)
            return
        for i, piece in enumerate(splitFrame(data, self._count)):
            if i:
                yield from _delay(self._scenario.splitDelay)
            yield Write(piece)
        self._count += 1


def streamScript(
    scenario: Scenario,
    headers: Sequence[tuple[bytes, bytes]],
    frames: Iterable[Frame],
    errorFrame: bytes = b"",
) -> Iterator[Action]:
    """
    The script of an HTTP 200 event stream.

    Content deltas after the first wait C{interval}. The failure modes
    (C{reset-mid}, C{stall-mid}, C{truncate}, C{inband-error}) stop before
    the C{after}+1-th content delta, or before the closing frames if there
    are fewer deltas; an in-band error with C{after=0} comes before any other
    frame, as Z.AI sends it.
    """
    yield from _delay(scenario.firstByteDelay)
    yield Headers(200, headers)
    writer = _Writer(scenario)
    mode = scenario.mode
    failing = mode in MID_MODES or mode == "inband-error"
    after = scenario.effectiveAfter
    stopped = failing and mode == "inband-error" and after == 0
    if not stopped:
        deltas = 0
        for frame in frames:
            if failing and (frame.kind == CLOSING or (frame.kind == DELTA and deltas == after)):
                stopped = True
                break
            if frame.kind == DELTA:
                if deltas:
                    yield from _delay(scenario.interval)
                deltas += 1
            yield from writer.write(frame.data)
    if not stopped:
        yield Finish()
    elif mode == "inband-error":
        yield from writer.write(errorFrame)
        yield Finish()
    elif mode == "reset-mid":
        yield Abort()
    elif mode == "stall-mid":
        yield Stall()
    else:
        yield Finish()


def bodyScript(
    scenario: Scenario,
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> Iterator[Action]:
    """
    The script of a complete (non-streamed) body.

    C{Content-Length} is sent except for C{truncate}, which sends half the
    body chunked and ends cleanly; C{reset-mid} and C{stall-mid} promise the
    whole length, send half, then abort or fall silent.
    """
    yield from _delay(scenario.firstByteDelay)
    mode = scenario.mode
    if mode == "truncate":
        yield Headers(status, headers)
    else:
        yield Headers(status, [*headers, (b"Content-Length", b"%d" % (len(body),))])
    writer = _Writer(scenario)
    if mode in MID_MODES:
        yield from writer.write(body[: len(body) // 2])
        if mode == "reset-mid":
            yield Abort()
        elif mode == "stall-mid":
            yield Stall()
        else:
            yield Finish()
        return
    yield from writer.write(body)
    yield Finish()


def silentScript(scenario: Scenario) -> Iterator[Action]:
    """
    The script of C{hang} (nothing, ever) and C{reset} (abort after
    C{firstByteDelay}, before any header).
    """
    if scenario.mode == "reset":
        yield from _delay(scenario.firstByteDelay)
        yield Abort()
    else:
        yield Stall()
