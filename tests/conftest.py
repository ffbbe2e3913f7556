"""
Shared fixtures: the global reactor, and a guard that fails any test leaving
delayed calls or open sockets behind (pytest-twisted does not police this;
trial would).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import task

#: How long a test may take, after it returns, to finish closing its sockets.
_SETTLE_SECONDS = 3.0


@pytest.fixture
def reactor() -> Any:
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor as globalReactor

    return globalReactor


def _selectables(reactor: Any) -> set[Any]:
    return set(reactor.getReaders()) | set(reactor.getWriters())


def _describe(things: Any) -> str:
    return "\n  ".join(sorted(repr(t) for t in things))


@pytest_twisted.async_yield_fixture(autouse=True)
async def cleanReactor(reactor: Any) -> AsyncIterator[None]:
    """
    Fail a test that leaves a delayed call or an open connection or port.

    Closing a socket takes a reactor turn or two, so the check waits a little
    for sockets to go; a delayed call still pending afterwards is a leak.
    """
    before = _selectables(reactor)
    callsBefore = {id(c) for c in reactor.getDelayedCalls()}
    yield
    waited = 0.0
    while waited < _SETTLE_SECONDS:
        leftSockets = _selectables(reactor) - before
        leftCalls = [
            c
            for c in reactor.getDelayedCalls()
            if c.active() and id(c) not in callsBefore
        ]
        if not leftSockets and not leftCalls:
            return
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02
    leftSockets = _selectables(reactor) - before
    leftCalls = [
        c for c in reactor.getDelayedCalls() if c.active() and id(c) not in callsBefore
    ]
    for c in leftCalls:
        c.cancel()
    for s in leftSockets:
        abort = getattr(s, "abortConnection", None) or getattr(s, "loseConnection", None)
        if abort is not None:
            abort()
        else:
            stop = getattr(s, "stopListening", None)
            if stop is not None:
                stop()
    pytest.fail(
        "test left the reactor dirty:\n  "
        + _describe(leftSockets)
        + ("\n  " if leftSockets and leftCalls else "")
        + _describe(leftCalls)
    )
