"""
Tests for L{zaiproxy.relay.states}: the relay's phases and the legal
moves between them.
"""

from __future__ import annotations

import itertools

import pytest

from zaiproxy.relay.states import CUTS, MOVES, Cut, IllegalMove, Phase, checkMove


@pytest.mark.parametrize("current, new", list(itertools.product(Phase, Phase)))
def test_onlyTheTableMoves(current: Phase, new: Phase) -> None:
    """
    A move in the table is allowed; any other raises, naming both phases.
    """
    if new in MOVES[current]:
        checkMove(current, new)
    else:
        with pytest.raises(IllegalMove, match=f"from {current.value} to {new.value}"):
            checkMove(current, new)


def test_doneFromEverywhereToNowhere() -> None:
    """
    Every phase can end (a client that leaves, a shutdown, a bug); nothing
    follows the end; no phase moves to itself.
    """
    assert all(Phase.DONE in MOVES[phase] for phase in Phase if phase is not Phase.DONE)
    assert MOVES[Phase.DONE] == frozenset()
    assert all(phase not in MOVES[phase] for phase in Phase)


def test_everyPhaseReachable() -> None:
    """
    Every phase can be reached from FORWARDING.
    """
    seen, frontier = {Phase.FORWARDING}, [Phase.FORWARDING]
    while frontier:
        for nxt in MOVES[frontier.pop()] - seen:
            seen.add(nxt)
            frontier.append(nxt)
    assert seen == set(Phase)


def test_cutAnswers() -> None:
    """
    Every cut but the client's own has an answer for the client; a shutdown
    is not an upstream error, the others are, with the Go zai-proxy's
    error types.
    """
    assert set(CUTS) == set(Cut) - {Cut.CLIENT_GONE}
    assert CUTS[Cut.SHUTDOWN].errorType is None
    assert {cut: CUTS[cut].errorType for cut in (Cut.IDLE, Cut.TRUNCATED, Cut.BROKEN)} == {
        Cut.IDLE: "idle_timeout",
        Cut.TRUNCATED: "truncated",
        Cut.BROKEN: "read_error",
    }
    assert CUTS[Cut.IDLE].message.format(idle=120.0) == "the upstream sent nothing for 120 s"
