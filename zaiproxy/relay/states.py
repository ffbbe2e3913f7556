# -*- test-case-name: tests.test_states -*-
"""
The states of one request's relay, and the legal moves between them, in
one place.

A relay is in exactly one L{Phase}. It moves only along L{MOVES}; any
other move is a bug and raises L{IllegalMove} (the relay's last errback
then answers the client and ends the request). Why a relay ended early,
if it did, is a L{Cut}, and each cut's answer to the client is in
L{CUTS}.

An Enum with a table rather than automat: a relay moves a handful of
times per request, but its inputs (upstream chunks, producer calls) come
per chunk on the hot path, where a state machine's dispatch would cost
more than the comparisons it replaces.

Timers belong to phases: the first-byte timer runs while L{FORWARDING}
(it is the forwarder's), the opening call while L{OPENING}, the idle
timer while L{OPENING} or L{RELAYING} (not while L{HELD}, and not while
the client is the slow side).
"""

from __future__ import annotations

import enum

import attrs

__all__ = ["CUTS", "MOVES", "Cut", "CutAnswer", "IllegalMove", "Phase"]


class Phase(enum.Enum):
    #: Waiting for an answer: admission, attempts, retries, headers.
    FORWARDING = "forwarding"
    #: count_tokens, which Z.AI does not serve: counting the prompt here.
    COUNTING = "counting"
    #: A stream's first upstream read: its chunks go out as one write, at
    #: the reactor's next poll.
    OPENING = "opening"
    #: The upstream body passing to the client, chunk by chunk.
    RELAYING = "relaying"
    #: A piece waits to be counted (usage added to it): everything after it
    #: waits too, with the upstream paused.
    HELD = "held"
    #: The upstream ended cleanly; the last pieces (or a held JSON body)
    #: are being written, perhaps after a count.
    ENDING = "ending"
    #: The response is over and the request reported.
    DONE = "done"


#: The legal moves. DONE is reachable from everywhere (a client that
#: leaves, a shutdown, a bug), and leads nowhere.
MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.FORWARDING: frozenset([Phase.COUNTING, Phase.OPENING, Phase.RELAYING, Phase.DONE]),
    Phase.COUNTING: frozenset([Phase.DONE]),
    Phase.OPENING: frozenset([Phase.RELAYING, Phase.DONE]),
    Phase.RELAYING: frozenset([Phase.HELD, Phase.ENDING, Phase.DONE]),
    Phase.HELD: frozenset([Phase.RELAYING, Phase.DONE]),
    Phase.ENDING: frozenset([Phase.DONE]),
    Phase.DONE: frozenset(),
}


class IllegalMove(Exception):
    """
    A relay tried a move L{MOVES} does not allow.
    """


class Cut(enum.Enum):
    """
    Why a relay ended before the upstream finished its answer.
    """

    #: The client went away: stop spending the user's quota at once.
    CLIENT_GONE = "client_gone"
    #: The proxy is stopping.
    SHUTDOWN = "shutdown"
    #: The upstream sent nothing for UPSTREAM_IDLE_TIMEOUT.
    IDLE = "idle_timeout"
    #: A model answer's stream ended cleanly without its last event.
    TRUNCATED = "truncated"
    #: The upstream connection broke mid-answer.
    BROKEN = "read_error"


@attrs.frozen
class CutAnswer:
    """
    What the client is told of a cut: C{status} if nothing was sent yet,
    else an error event (or an aborted connection, for JSON).

    @ivar errorType: the upstream error it counts as (L{None}: none).
    """

    status: int
    errorType: str | None
    message: str


#: Each cut's answer; the idle timeout's message is formatted with the
#: timeout (C{idle}).
CUTS: dict[Cut, CutAnswer] = {
    Cut.SHUTDOWN: CutAnswer(503, None, "the proxy is shutting down; the stream was cut"),
    Cut.IDLE: CutAnswer(504, "idle_timeout", "the upstream sent nothing for {idle:g} s"),
    Cut.TRUNCATED: CutAnswer(
        502, "truncated", "the upstream ended the stream before the answer was complete"
    ),
    Cut.BROKEN: CutAnswer(502, "read_error", "the upstream connection broke mid-response"),
}


def checkMove(current: Phase, new: Phase) -> None:
    """
    Raise L{IllegalMove} unless C{current} may move to C{new}.
    """
    if new not in MOVES[current]:
        raise IllegalMove(f"a relay cannot move from {current.value} to {new.value}")
