"""
Tests for L{zaiproxy.limits.admission}, on a L{task.Clock}: no sleeping.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from zaiproxy.limits.admission import SLOT_POLL, Admission, Grant, Permit, QueueFull, QueueTimeout, QuotaHeld


def make(
    rate: float = 1.0, concurrency: int = 10, maxQueue: int = 100, queueTimeout: float = 60.0
) -> tuple[Clock, Admission, list[tuple[str, float]], list[str]]:
    clock = Clock()
    admitted: list[tuple[str, float]] = []
    rejected: list[str] = []
    admission = Admission(
        clock,
        rate,
        concurrency,
        maxQueue,
        queueTimeout,
        onAdmitted=lambda c, w: admitted.append((c, w)),
        onRejected=rejected.append,
    )
    return clock, admission, admitted, rejected


def result(d):  # type: ignore[no-untyped-def]
    out: list[Any] = []
    d.addBoth(out.append)
    return out[0] if out else None


def test_burstThenPaced() -> None:
    """
    The bucket starts with one token (a restart into waiting demand must not
    burst), fills up to twice the rate while idle, then admits one call per
    1/rate seconds.
    """
    clock, admission, admitted, _ = make(rate=2.0)
    assert isinstance(result(admission.admit("a")), Permit)
    assert not admission.admit("a").called
    clock.advance(0.5)
    admission.close()
    clock, admission, admitted, _ = make(rate=2.0)
    clock.advance(10)
    first = [admission.admit("a") for _ in range(4)]
    assert all(isinstance(result(d), Permit) for d in first)
    waiting = [admission.admit("a") for _ in range(3)]
    assert [d.called for d in waiting] == [False, False, False]
    clock.advance(0.5)
    assert [d.called for d in waiting] == [True, False, False]
    clock.advance(0.5)
    assert [d.called for d in waiting] == [True, True, False]
    clock.advance(0.5)
    assert all(d.called for d in waiting)
    assert [w for _, w in admitted] == [0, 0, 0, 0, 0.5, 1.0, 1.5]
    assert admission.rateWaits == 3 and admission.slotWaits == 0
    assert clock.getDelayedCalls() == []


def test_concurrencyLimit() -> None:
    """
    No more than the limit in flight; a release admits the next waiter.
    """
    clock, admission, _, _ = make(rate=100.0, concurrency=2)
    clock.advance(1)
    p1, _ = result(admission.admit("a")), result(admission.admit("a"))
    third = admission.admit("a")
    assert not third.called and admission.inFlight == 2
    assert admission.slotWaits == 1
    p1.release()
    p1.release()  # twice is once
    assert isinstance(result(third), Permit)
    assert admission.inFlight == 2
    admission.setLimit(3)
    assert isinstance(result(admission.admit("b")), Permit)
    assert clock.getDelayedCalls() == []


def test_fairTurns() -> None:
    """
    Waiting clients are served in turn: a burst from one client cannot
    starve another who arrived later.
    """
    clock, admission, _, _ = make(rate=1.0)
    result(admission.admit("warm"))  # the bucket is empty now
    order: list[str] = []
    for client in ["a"] * 5 + ["b", "c"]:
        admission.admit(client).addCallback(lambda p: order.append(p.client))
    clock.pump([1.0] * 7)
    assert order == ["a", "b", "c", "a", "a", "a", "a"]


def test_queueFull() -> None:
    """
    Beyond MAX_QUEUE waiters the call fails at once, with a Retry-After
    guess, and is counted.
    """
    clock, admission, _, rejected = make(rate=1.0, maxQueue=2)
    result(admission.admit("a"))
    waiting = [admission.admit("a"), admission.admit("b")]
    failure = result(admission.admit("c"))
    assert failure.check(QueueFull)
    assert failure.value.retryAfter == 3
    assert rejected == ["c"]
    admission.close()
    assert [result(d).check(CancelledError) for d in waiting] == [CancelledError] * 2
    assert clock.getDelayedCalls() == []


def test_queueTimeout() -> None:
    """
    A waiter not admitted within QUEUE_TIMEOUT gets QueueTimeout and leaves
    the queue.
    """
    clock, admission, _, rejected = make(rate=100.0, concurrency=1, queueTimeout=5.0)
    held = result(admission.admit("a"))
    waiting = admission.admit("b")
    clock.advance(5.0)
    failure = result(waiting)
    assert failure.check(QueueTimeout)
    assert admission.queued == 0 and rejected == ["b"]
    held.release()
    assert admission.inFlight == 0
    assert clock.getDelayedCalls() == []


def test_cancelLeavesAtOnce() -> None:
    """
    A waiter whose client leaves is dropped at once: its turn goes to the
    next one and no timer is left behind.
    """
    clock, admission, _, _ = make(rate=100.0, concurrency=1)
    clock.advance(1)
    held = result(admission.admit("a"))
    gone = admission.admit("b")
    next_ = admission.admit("c")
    gone.cancel()
    assert result(gone).check(CancelledError)
    assert admission.queued == 1
    held.release()
    assert isinstance(result(next_), Permit)
    assert clock.getDelayedCalls() == []


def test_setRate() -> None:
    """
    A new rate applies to waiters already queued.
    """
    clock, admission, _, _ = make(rate=1.0)
    result(admission.admit("a"))
    waiting = admission.admit("a")
    admission.setRate(10.0)
    clock.advance(0.1)
    assert waiting.called
    assert admission.burst == 20.0


def test_closeFailsWaiters() -> None:
    """
    Stopping fails every waiter and leaves no timer.
    """
    clock, admission, _, _ = make(rate=1.0)
    result(admission.admit("a"))
    waiting = admission.admit("a")
    admission.close()
    assert result(waiting).check(CancelledError)
    assert clock.getDelayedCalls() == []
    assert admission.snapshot() == {
        "in_flight": 1,
        "concurrency_limit": 10,
        "queued": 0,
        "waiting_clients": 0,
    }


@pytest.mark.parametrize("rate", [0.5, 3.0, 25.0])
def test_longRunRate(rate: float) -> None:
    """
    Under sustained demand the admitted rate is the bucket's rate.
    """
    clock, admission, admitted, _ = make(rate=rate, maxQueue=100000, queueTimeout=1e9)
    clock.advance(10)
    for _ in range(int(rate * 25) + 10):
        admission.admit("a").addCallback(lambda p: p.release())
    clock.pump([0.05] * 400)
    # The burst (2x the rate) at once, then the rate for 20 s.
    assert abs(len(admitted) - (2 * rate + rate * 20)) <= 2


def test_noBurstCreditWhileWaiting() -> None:
    """
    Time spent with callers waiting (for a slot, or for a timer the reactor
    ran late) is not idle: afterwards calls go out at the rate, with at most
    a tenth of a second of catch-up, not as a burst of the credit that time
    would have built (Z.AI counts per second).
    """
    clock, admission, _, _ = make(rate=10.0, concurrency=3)
    held = [result(admission.admit("a"))]  # the one starting token
    clock.advance(0.1)
    held.append(result(admission.admit("a")))
    clock.advance(0.1)
    held.append(result(admission.admit("a")))
    waiting = [admission.admit("a") for _ in range(5)]
    assert admission.slotWaits == 5
    clock.advance(3.0)  # 30 tokens' worth of time, all of it waiting
    for permit in held:
        permit.release()
    # 1 + 0.1 s x 10/s of credit: two calls now, the next a tenth later.
    assert [d.called for d in waiting] == [True, True, False, False, False]
    clock.advance(0.1)
    assert [d.called for d in waiting] == [True, True, True, False, False]
    for d in waiting[:3]:
        result(d).release()
    for d in waiting[3:]:
        d.cancel()
        d.addErrback(lambda f: None)
    assert clock.getDelayedCalls() == []


def test_lateTimerReleasesNoBurst() -> None:
    """
    When the reactor runs the bucket's timer 1.5 s late (a stall), the
    waiting calls do not go out as 15 at once: at most a tenth of a second
    of catch-up, then the rate.
    """
    clock, admission, admitted, _ = make(rate=10.0, concurrency=100)
    first = result(admission.admit("a"))
    waiting = [admission.admit("a") for _ in range(30)]
    assert len(admitted) == 1
    clock.rightNow += 1.5  # the timer was due in 0.1 s
    clock.advance(0)
    assert len(admitted) == 1 + 2
    clock.pump([0.1] * 10)
    assert len(admitted) == 1 + 2 + 10
    first.release()
    for d in waiting:
        d.cancel()
        d.addErrback(lambda f: None)
    assert clock.getDelayedCalls() == []


def test_activeSpan() -> None:
    """
    The active span runs from the first admission to the end of the last
    call (or to the reading, if calls are under way, and then on from
    it); gaps between calls count, quiet stretches at either end do not.
    A waiter that is cancelled or times out ends it too.
    """
    clock, admission, _, _ = make(rate=100.0, concurrency=1)
    clock.advance(10)
    assert admission.takeActiveSpan() == 0.0
    for _ in range(2):
        held = result(admission.admit("a"))
        clock.advance(1)
        held.release()
        clock.advance(2)  # a gap, then (after the second) a quiet stretch
    assert admission.takeActiveSpan() == 4.0
    assert admission.takeActiveSpan() == 0.0

    held = result(admission.admit("a"))
    waiting = admission.admit("b")  # waits for the slot
    clock.advance(1)
    held.release()  # "b" now holds the slot: still under way
    clock.advance(1)
    assert admission.takeActiveSpan() == 2.0
    clock.advance(1)
    result(waiting).release()
    clock.advance(5)
    assert admission.takeActiveSpan() == 1.0

    held = result(admission.admit("a"))
    gone = admission.admit("c")
    clock.advance(0.5)
    gone.cancel()  # "a" still in flight
    assert result(gone).check(CancelledError)
    clock.advance(0.5)
    held.release()
    clock.advance(5)
    assert admission.takeActiveSpan() == 1.0

    clock, admission, _, _ = make(rate=0.01, queueTimeout=5.0)
    result(admission.admit("a")).release()  # the one token
    timedOut = admission.admit("d")  # waits for the rate
    clock.advance(5)
    assert result(timedOut).check(QueueTimeout)
    clock.advance(5)
    assert admission.takeActiveSpan() == 5.0
    admission.close()
    assert clock.getDelayedCalls() == []


class GateDouble:
    """
    A L{RemoteGate} whose answers the test gives: each C{acquire} waits in
    C{asked} until the test fires it.
    """

    def __init__(self) -> None:
        self.shared = True
        self.asked: list[tuple[int, Deferred[Grant]]] = []
        self.released: list[str] = []

    def acquire(self, wanted: int) -> Deferred[Grant]:
        d: Deferred[Grant] = Deferred()
        self.asked.append((wanted, d))
        return d

    def release(self, lease: str) -> None:
        self.released.append(lease)


def shared(concurrency: int = 10) -> tuple[Clock, Admission, GateDouble]:
    clock, admission, _, _ = make(rate=1000.0, concurrency=concurrency)
    gate = GateDouble()
    admission.remote = gate
    return clock, admission, gate


def test_sharedAsksOnceForEveryoneWaiting() -> None:
    """
    With a shared gate no call goes on the local bucket: callers queue,
    one question asks for as many as wait (and fit under the limit), and
    the leases granted admit them in turn, each permit holding its lease
    and giving it back when released.
    """
    _, admission, gate = shared(concurrency=3)
    waiting = [admission.admit(client) for client in ("a", "a", "b", "b")]
    assert not any(d.called for d in waiting)
    assert [wanted for wanted, _ in gate.asked] == [1]
    gate.asked[0][1].callback(Grant(("L1",), 0.0))
    # The first was admitted; the other three are asked for in one go, but
    # only two fit under the limit of three.
    assert [wanted for wanted, _ in gate.asked] == [1, 2]
    gate.asked[1][1].callback(Grant(("L2", "L3"), 0.0))
    permits = [result(d) for d in waiting[:3]]
    # Clients take turns: a, then b, then a again.
    assert [(p.client, p.lease) for p in permits] == [("a", "L1"), ("a", "L3"), ("b", "L2")]
    assert not waiting[3].called and admission.inFlight == 3
    permits[0].release()
    assert gate.released == ["L1"]
    assert [wanted for wanted, _ in gate.asked] == [1, 2, 1]


def test_sharedWaitsForTheNextTokenOrSlot() -> None:
    """
    A partial grant asks again when Redis says the next token is due; no
    grant because every slot everywhere is taken asks again after
    L{SLOT_POLL}. Both count as waits for the limiter's saturation signals.
    """
    clock, admission, gate = shared()
    waiting = [admission.admit("a") for _ in range(3)]
    gate.asked[0][1].callback(Grant(("L1",), 0.25))
    assert result(waiting[0]).lease == "L1"
    clock.advance(0.2)
    assert len(gate.asked) == 1
    clock.advance(0.05)
    assert [wanted for wanted, _ in gate.asked] == [1, 2]
    gate.asked[1][1].callback(Grant((), None))
    assert admission.slotWaits == 1
    clock.advance(SLOT_POLL)
    assert [wanted for wanted, _ in gate.asked] == [1, 2, 2]
    gate.asked[2][1].callback(Grant(("L2", "L3"), 0.0))
    assert [result(d).lease for d in waiting[1:]] == ["L2", "L3"]
    assert not clock.getDelayedCalls() or all(not c.active() for c in clock.getDelayedCalls())


def test_sharedQuotaHoldRefusesEveryWaiter() -> None:
    """
    Redis says another proxy was told the quota is gone: every waiter is
    refused with L{QuotaHeld}, carrying Z.AI's reset and error.
    """
    _, admission, gate = shared()
    waiting = [admission.admit(c) for c in ("a", "b")]
    gate.asked[0][1].callback(Grant((), 0.0, (5000.0, "the error")))
    refusals = [result(d).value for d in waiting]
    assert all(isinstance(r, QuotaHeld) for r in refusals)
    assert [(r.until, r.error) for r in refusals] == [(5000.0, "the error")] * 2
    assert admission.queued == 0


def test_sharedGateAwayAdmitsLocally() -> None:
    """
    The gate's question fails (Redis away; the gate has gone local by
    then): the waiters are admitted by the local bucket at once, without
    leases.
    """
    clock, admission, gate = shared()
    waiting = [admission.admit("a") for _ in range(2)]
    gate.shared = False
    gate.asked[0][1].errback(RuntimeError("Redis away"))
    assert result(waiting[0]).lease is None
    # The local bucket's pace (1000 a second) for the next.
    clock.advance(0.001)
    assert result(waiting[1]).lease is None
    assert len(gate.asked) == 1


def test_leaseOfACallerWhoLeftIsGivenBack() -> None:
    """
    A caller that left while the gate was asked: its lease is released at
    once instead of holding a slot until it expires.
    """
    _, admission, gate = shared()
    waiting = [admission.admit("a") for _ in range(2)]
    gate.asked[0][1].callback(Grant(("L1",), 0.0))
    waiting[1].cancel()
    assert isinstance(result(waiting[1]).value, CancelledError)
    gate.asked[1][1].callback(Grant(("L2",), 0.0))
    assert gate.released == ["L2"]
    assert admission.inFlight == 1
