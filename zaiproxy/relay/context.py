# -*- test-case-name: tests.test_relay -*-
"""
What every relay shares: the clock, the upstream, the limiter, accounting,
where finished requests go, and the timeouts.

Its own module so that the relay and the forwarder, which both read it,
need not import each other.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IReactorTime

from zaiproxy.limits.limiter import RateLimiter
from zaiproxy.observe.reporter import Reporter
from zaiproxy.relay.upstream import Upstream
from zaiproxy.usage.accounting import Accounting

__all__ = ["InFlight", "RelayContext"]


@attrs.frozen
class RelayContext:
    """
    The pieces and settings every request's relay shares.

    @ivar accounting: L{None} when nothing is accounted for.
    @ivar limiter: L{None} to forward without pacing (tests of the relay).
    @ivar maxRetries: attempts after the first one (MAX_RETRIES).
    @ivar jitter: draws a retry's wait between two bounds.
    """

    clock: IReactorTime
    upstream: Upstream
    reporter: Reporter
    apiKey: bytes = attrs.field(repr=False)
    firstByteTimeout: float
    idleTimeout: float
    accounting: Accounting | None = None
    limiter: RateLimiter | None = None
    maxRetries: int = 0
    jitter: Callable[[float, float], float] = random.uniform


class InFlight(Protocol):
    """
    Where relays in progress are kept, for the drain.
    """

    def add(self, item: Any) -> None: ...

    def discard(self, item: Any) -> None: ...
