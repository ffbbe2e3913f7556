# -*- test-case-name: tests.test_admission -*-
"""
Admission: the gate every model call passes before it goes to Z.AI.

A token bucket paces calls at the current rate (burst about 2x), a
concurrency limit caps calls in flight, and callers that cannot go at once
wait in a bounded queue instead of getting the Go zai-proxy's immediate 503. The
queue serves clients in turn (round robin by client), so one client's burst
cannot starve another; a waiter whose client leaves is dropped at once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "Admission",
    "Grant",
    "NotAdmitted",
    "Permit",
    "QueueFull",
    "QueueTimeout",
    "QuotaHeld",
    "RemoteGate",
    "clientBucket",
]

# A token is there when the bucket holds 1 within float error; otherwise a
# refill computed at the same instant would wake us again, forever.
_ONE = 1.0 - 1e-9


def clientBucket(host: str) -> str:
    """
    The Go zai-proxy's bounded client identity: C{source-00} to C{source-63}, from
    an FNV-1a hash of the peer address (never a header the client sets).
    """
    value = 0x811C9DC5
    for byte in (host or "unknown").encode("utf-8", "replace"):
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"source-{value % 64:02d}"


#: With shared limits and every slot taken, how often to look again for
#: one that another proxy freed.
SLOT_POLL = 0.02

#: Seconds of credit that time spent with callers waiting may still build:
#: enough for timers that run a tick late, far too little for a burst.
CATCH_UP = 0.1


class NotAdmitted(Exception):
    """
    The call was not admitted; C{retryAfter} is a fair guess of when to try
    again, in seconds.
    """

    def __init__(self, retryAfter: float) -> None:
        super().__init__(retryAfter)
        self.retryAfter = retryAfter


class QueueFull(NotAdmitted):
    """
    C{MAX_QUEUE} callers are already waiting.
    """


class QueueTimeout(NotAdmitted):
    """
    The caller waited C{QUEUE_TIMEOUT} (C{waited} seconds) without being
    admitted.
    """

    def __init__(self, retryAfter: float, waited: float) -> None:
        super().__init__(retryAfter)
        self.waited = waited


class QuotaHeld(NotAdmitted):
    """
    Another proxy sharing the key was told the quota is gone until
    C{until}, with C{error} (a L{zaiproxy.dialects.zai_errors.ZaiError}).
    """

    def __init__(self, until: float, error: Any) -> None:
        super().__init__(max(1.0, until))
        self.until = until
        self.error = error


@attrs.frozen
class Grant:
    """
    What the shared gate gave: a lease (concurrency slot, with its token)
    for each admitted call, and when to ask again for the rest (C{None}:
    when a slot frees here; the slots are all taken).
    """

    leases: tuple[str, ...]
    retryIn: float | None
    quota: tuple[float, Any] | None = None


class RemoteGate(Protocol):
    """
    The shared limits' side of admission (L{zaiproxy.limits.shared}).
    """

    @property
    def shared(self) -> bool:
        """Whether to ask it; when Redis is away, admission is local."""

    def acquire(self, wanted: int) -> Deferred[Grant]: ...

    def release(self, lease: str) -> None: ...


class Permit:
    """
    One admitted call; it holds a concurrency slot until released.

    @ivar waited: seconds spent waiting for admission.
    """

    def __init__(self, admission: Admission, client: str, waited: float, lease: str | None = None) -> None:
        self._admission = admission
        self.client = client
        self.waited = waited
        self.lease = lease
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._released(self.lease)


@attrs.define(eq=False)
class _Waiter:
    client: str
    deferred: Deferred[Permit]
    since: float
    timeout: IDelayedCall | None = None


class Admission:
    """
    The token bucket, the concurrency slots and the fair queue.

    @ivar rateWaits: admissions in this window that had to wait for the
        bucket (demand at or above the rate); read and reset by the limiter.
    @ivar slotWaits: admissions that had to wait for a free slot.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        concurrency: int,
        maxQueue: int,
        queueTimeout: float,
        onAdmitted: Callable[[str, float], None] = lambda client, waited: None,
        onRejected: Callable[[str], None] = lambda client: None,
    ) -> None:
        self._clock = clock
        self._maxQueue = maxQueue
        self._queueTimeout = queueTimeout
        self._onAdmitted = onAdmitted
        self._onRejected = onRejected
        self.rate = rate
        self.burst = max(1.0, 2.0 * rate)
        # Start with one token, not a full burst: a proxy that restarts into
        # waiting demand would otherwise fire 2x the rate at once, and Z.AI
        # counts per second. Burst credit builds while the proxy is idle.
        self._tokens = 1.0
        self._refilled = clock.seconds()
        self.limit = concurrency
        self.inFlight = 0
        self._queues: dict[str, deque[_Waiter]] = {}
        self._rotation: deque[str] = deque()
        self.queued = 0
        self._timer: IDelayedCall | None = None
        self.rateWaits = 0
        self.slotWaits = 0
        # The active span: from the first admission (or the last reading,
        # if calls were under way then) to when the last call ended.
        self._activeSince: float | None = None
        self._idleSince = 0.0
        #: Shared limits: while they are L{RemoteGate.shared}, each call's
        #: token and slot come from Redis, asked for one batch at a time.
        self.remote: RemoteGate | None = None
        self._asking = False

    # -- settings the limiter moves ---------------------------------------------

    def setRate(self, rate: float) -> None:
        self._refill()
        self.rate = rate
        self.burst = max(1.0, 2.0 * rate)
        self._tokens = min(self._tokens, self.burst)
        self._reschedule()

    def setLimit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._dispatch()

    # -- admission --------------------------------------------------------------

    def admit(self, client: str) -> Deferred[Permit]:
        """
        A permit for one call, now or once the bucket and a slot allow;
        fails with L{QueueFull} or L{QueueTimeout}. Cancelling the Deferred
        (the client left) takes the caller out of the queue.
        """
        if self._activeSince is None:
            self._activeSince = self._clock.seconds()
        sharing = self.remote is not None and self.remote.shared
        if not self.queued and self.inFlight < self.limit and not sharing:
            self._refill()
            if self._tokens >= _ONE:
                self._tokens -= 1.0
                self.inFlight += 1
                self._onAdmitted(client, 0.0)
                return succeed(Permit(self, client, 0.0))
        if self.queued >= self._maxQueue:
            self._onRejected(client)
            failed: Deferred[Permit] = Deferred()
            failed.errback(QueueFull(self._retryAfter()))
            return failed
        waiter = _Waiter(client, Deferred(lambda d: self._cancelled(waiter)), self._clock.seconds())
        waiter.timeout = self._clock.callLater(self._queueTimeout, self._timedOut, waiter)
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
            self._rotation.append(client)
        queue.append(waiter)
        self.queued += 1
        if self.inFlight >= self.limit:
            self.slotWaits += 1
        else:
            self.rateWaits += 1
        self._dispatch()
        return waiter.deferred

    def _released(self, lease: str | None = None) -> None:
        if lease is not None and self.remote is not None:
            self.remote.release(lease)
        self.inFlight -= 1
        self._dispatch()
        self._maybeIdle()

    def _maybeIdle(self) -> None:
        if not self.inFlight and not self.queued:
            self._idleSince = self._clock.seconds()

    def takeActiveSpan(self) -> float:
        """
        The seconds, since the last reading, from the first call admitted to
        the end of the last one (to now if calls are still under way): the
        time over which what Z.AI accepted measures it. Quiet stretches
        before and after are not measured (a proxy that just started, a
        burst after a quiet spell); gaps between calls are part of the rate
        they were offered at.
        """
        since = self._activeSince
        if since is None:
            return 0.0
        now = self._clock.seconds()
        if self.inFlight or self.queued:
            self._activeSince = now
            return now - since
        self._activeSince = None
        return max(0.0, self._idleSince - since)

    def _refill(self) -> None:
        now = self._clock.seconds()
        # Burst credit builds only while nobody waits. Time that callers
        # spent waiting (for a slot, or for a timer the reactor ran late) is
        # not idle: its credit would go out as one burst, and Z.AI counts
        # per second. A little catch-up is kept so a timer that fires late
        # by a few ticks costs no throughput.
        gained = self._tokens + (now - self._refilled) * self.rate
        if self._rotation:
            self._tokens = max(self._tokens, min(1.0 + CATCH_UP * self.rate, gained))
        else:
            self._tokens = min(self.burst, gained)
        self._refilled = now

    def _dispatch(self) -> None:
        """
        Admit waiters in turn while a token and a slot are free; otherwise
        wake up when the next token is due (a release wakes us for slots).
        """
        if self.remote is not None and self.remote.shared:
            self._askRemote(self.remote)
            return
        while self._rotation and self.inFlight < self.limit:
            self._refill()
            if self._tokens < _ONE:
                self._reschedule()
                return
            self._tokens -= 1.0
            self._admitNext(None)
        self._cancelTimer()

    def _askRemote(self, remote: RemoteGate) -> None:
        """
        Ask the shared gate for as many calls as wait and fit here; one
        question at a time, so a busy proxy asks once per round trip.
        """
        wanted = min(self.queued, self.limit - self.inFlight)
        if self._asking or wanted <= 0:
            return
        self._cancelTimer()
        self._asking = True
        asked = remote.acquire(wanted)
        asked.addCallbacks(self._granted, self._notGranted).addErrback(self._bug)

    def _granted(self, grant: Grant) -> None:
        self._asking = False
        if grant.quota is not None:
            self._refuseAll(QuotaHeld(*grant.quota))
            return
        leases = deque(grant.leases)
        if grant.retryIn is None:
            self.slotWaits += 1
        elif len(leases) < self.queued:
            self.rateWaits += 1
        while leases and self._rotation:
            self._admitNext(leases.popleft())
        for lease in leases:
            # Its caller left while we asked: give the slot back.
            if self.remote is not None:
                self.remote.release(lease)
        if self._rotation and grant.retryIn == 0:
            # Tokens are there; the grant was cut by what we asked for.
            self._dispatch()
        elif self._rotation and grant.retryIn is not None:
            self._timer = self._clock.callLater(grant.retryIn, self._wake)
        elif self._rotation:
            # Every slot is taken, by other proxies too: theirs free
            # without telling us, so look again soon.
            self._timer = self._clock.callLater(SLOT_POLL, self._wake)

    def _notGranted(self, failure: Failure) -> None:
        # The gate has gone local (Redis away): admit here, now.
        self._asking = False
        self._dispatch()

    def _bug(self, failure: Failure) -> None:
        self.log.failure("admitting through shared limits failed", failure)
        self._asking = False

    def _admitNext(self, lease: str | None) -> None:
        """
        Admit the next waiter in turn (clients take turns).
        """
        client = self._rotation[0]
        queue = self._queues[client]
        waiter = queue.popleft()
        if queue:
            self._rotation.rotate(-1)
        else:
            self._rotation.popleft()
            del self._queues[client]
        self.queued -= 1
        self.inFlight += 1
        if waiter.timeout is not None and waiter.timeout.active():
            waiter.timeout.cancel()
        waited = self._clock.seconds() - waiter.since
        self._onAdmitted(client, waited)
        waiter.deferred.callback(Permit(self, client, waited, lease))

    def _refuseAll(self, refusal: NotAdmitted) -> None:
        for queue in list(self._queues.values()):
            for waiter in list(queue):
                self._remove(waiter)
                self._onRejected(waiter.client)
                waiter.deferred.errback(refusal)

    def _reschedule(self) -> None:
        self._cancelTimer()
        if self._rotation and self.inFlight < self.limit:
            delay = max(1e-6, (1.0 - self._tokens) / self.rate)
            self._timer = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._dispatch()

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _remove(self, waiter: _Waiter) -> bool:
        queue = self._queues.get(waiter.client)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self.queued -= 1
        if not queue:
            del self._queues[waiter.client]
            self._rotation.remove(waiter.client)
        if waiter.timeout is not None and waiter.timeout.active():
            waiter.timeout.cancel()
        self._maybeIdle()
        return True

    def _cancelled(self, waiter: _Waiter) -> None:
        # The Deferred's canceller: it errbacks with CancelledError itself.
        self._remove(waiter)
        self._dispatch()

    def _timedOut(self, waiter: _Waiter) -> None:
        waiter.timeout = None
        if self._remove(waiter):
            self._onRejected(waiter.client)
            waited = self._clock.seconds() - waiter.since
            waiter.deferred.errback(QueueTimeout(self._retryAfter(), waited))

    def _retryAfter(self) -> float:
        """
        When the queue as it stands would have drained, at the current rate.
        """
        return max(1.0, math.ceil((self.queued + 1) / self.rate))

    def close(self) -> None:
        """
        Fail every waiter (the proxy is stopping) and cancel the timer.
        """
        self._cancelTimer()
        for queue in list(self._queues.values()):
            for waiter in list(queue):
                self._remove(waiter)
                waiter.deferred.errback(CancelledError("the proxy is stopping"))

    def snapshot(self) -> dict[str, Any]:
        return {
            "in_flight": self.inFlight,
            "concurrency_limit": self.limit,
            "queued": self.queued,
            "waiting_clients": len(self._rotation),
        }
