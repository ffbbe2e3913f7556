"""
Tests for L{zaiproxy.limits.limiter}: every adaptation rule on a L{task.Clock},
persistence, the quota hold, and a convergence simulation against a model
upstream of hidden capacity.
"""

from __future__ import annotations

import json
from collections import deque
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from support.doubles import HeapClock
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from zaiproxy.dialects.zai_errors import ZaiError
from zaiproxy.limits.admission import NotAdmitted, Permit
from zaiproxy.limits.learned import WindowTotals
from zaiproxy.limits.limiter import LimiterSettings, RateLimiter

WINDOW = 30.0


def settings(**changes: Any) -> LimiterSettings:
    base: dict[str, Any] = dict(
        initial=10.0,
        minimum=1.0,
        maximum=50.0,
        window=WINDOW,
        alpha=0.3,
        margin=0.02,
        probeInterval=10,
        maxWorkers=10,
        maxQueue=1000,
        queueTimeout=1e9,
        stateFile=None,
        stateMaxAge=6 * 3600.0,
    )
    base.update(changes)
    return LimiterSettings(**base)


def limiter(clock: Any = None, **changes: Any) -> tuple[Clock, RateLimiter, list[str]]:
    clock = clock or Clock()
    adjustments: list[str] = []
    return clock, RateLimiter(clock, settings(**changes), onAdjust=adjustments.append), adjustments


def window(
    clock: Clock,
    rl: RateLimiter,
    successes: int,
    frequency: int = 0,
    saturated: bool = True,
    concurrency: int = 0,
    inFlight: int | None = None,
) -> None:
    for _ in range(successes):
        rl.record("success")
    for _ in range(frequency):
        rl.record("frequency")
    for _ in range(concurrency):
        rl.record("concurrency", inFlight)
    if saturated:
        rl.admission.rateWaits += 1
    clock.advance(WINDOW)
    rl.judge()


def test_decreaseToWhatWasAccepted() -> None:
    """
    A window with frequency 429s over 5%: the ceiling falls to what Z.AI
    accepted (never staying above it) and the rate holds just below.
    """
    clock, rl, adjustments = limiter()
    window(clock, rl, successes=90, frequency=200)  # 3 req/s accepted
    assert rl.ceiling == pytest.approx(3.0)
    assert rl.rate == pytest.approx(3.0 * 0.98)
    assert adjustments == ["decrease"]
    assert rl.admission.rate == rl.rate


def test_decreaseNeverAboveTheRefusedRate() -> None:
    """
    Refusals prove the capacity is below the rate that was refused, even if
    more calls seemed to pass (a burst at the window's edge).
    """
    clock, rl, _ = limiter(initial=2.0)
    window(clock, rl, successes=150, frequency=20)
    assert rl.ceiling == 2.0
    assert rl.rate == pytest.approx(1.96)


def test_cleanEvidenceRaisesTheCeiling() -> None:
    """
    A clean window with callers waiting raises the ceiling to the rate Z.AI
    took: hard evidence.
    """
    clock, rl, _ = limiter(initial=9.0)
    rl.ceiling = 5.0
    window(clock, rl, successes=270)  # 9 req/s, all accepted
    assert rl.ceiling == pytest.approx(9.0)


def test_fewRefusalsStepBelow() -> None:
    """
    Between 1% and 5% of 429s the seed held still (a steady trickle of
    429s); here the ceiling drops to the refused rate and the rate holds a
    margin below it.
    """
    clock, rl, adjustments = limiter()
    window(clock, rl, successes=297, frequency=3)
    assert rl.ceiling == pytest.approx(9.9)
    assert rl.rate == pytest.approx(9.9 * 0.98)
    assert adjustments == ["decrease"]
    window(clock, rl, successes=298, frequency=1)
    assert adjustments == ["decrease"]


def test_idleWindowLearnsNothing() -> None:
    """
    A window without calls changes nothing (the seed only judged when a
    request came; we judge on time, and an idle window is no evidence).
    """
    clock, rl, adjustments = limiter()
    window(clock, rl, successes=0, saturated=False)
    assert (rl.rate, rl.ceiling, adjustments) == (10.0, 50.0, [])


def test_quietStretchesAreNotMeasured() -> None:
    """
    What Z.AI accepted is measured from a window's first call to the end of
    its last. A window that began quiet (the proxy just started) and saw a
    burst refused in its last fifth shows what Z.AI took in that fifth, not
    a fifth of it (which held the rate at a fraction of the capacity until
    the probes began); so does a burst followed by quiet.
    """
    for start in (0.8, 0.1):
        clock, rl, _ = limiter(initial=40.0)
        clock.advance(start * WINDOW)
        permit = rl.admission.admit("client").result
        assert isinstance(permit, Permit)
        for outcome in ["success"] * 150 + ["frequency"] * 50:
            rl.record(outcome)
        clock.advance(0.2 * WINDOW)
        permit.release()
        clock.advance(WINDOW - clock.seconds())
        rl.judge()
        assert rl.ceiling == pytest.approx(150 / (0.2 * WINDOW))


def test_callsUnderWayKeepTheNextWindowBusy() -> None:
    """
    A call in flight when a window ends keeps the next one busy from its
    start.
    """
    clock, rl, _ = limiter(initial=40.0)
    held = rl.admission.admit("client").result
    assert isinstance(held, Permit)
    clock.advance(WINDOW)
    rl.judge()
    clock.advance(0.5 * WINDOW)
    held.release()
    for outcome in ["success"] * 150 + ["frequency"] * 50:
        rl.record(outcome)
    clock.advance(0.5 * WINDOW)
    rl.judge()
    assert rl.ceiling == pytest.approx(150 / (0.5 * WINDOW))


def test_lateWindowIsNotEvidence(logEvents: list[dict[str, Any]]) -> None:
    """
    A window judged over half a window late measured a stalled process
    (its calls sat in buffers while the clock ran): it changes nothing, and
    the next window is judged as usual.
    """
    clock, rl, adjustments = limiter(initial=40.0)
    for outcome in ["success"] * 30 + ["frequency"] * 30:
        rl.record(outcome)
    clock.advance(1.6 * WINDOW)
    rl.judge()
    assert (rl.rate, rl.ceiling, adjustments) == (40.0, 50.0, [])
    assert next(e for e in logEvents if "late" in e["log_format"])["late"] == pytest.approx(0.6 * WINDOW)
    window(clock, rl, successes=600, frequency=600)
    assert rl.ceiling == pytest.approx(20.0)


def test_convergeUpToTheCeiling() -> None:
    """
    Clean windows raise the rate halfway to the target (at least 0.25).
    """
    clock, rl, adjustments = limiter(initial=10.0)
    rl.ceiling = 20.0
    window(clock, rl, successes=300)
    assert rl.rate == pytest.approx(10 + 0.5 * (19.6 - 10))
    window(clock, rl, successes=300)
    assert rl.rate == pytest.approx(14.8 + 0.5 * (19.6 - 14.8))
    assert adjustments == ["increase", "increase"]


def test_probeAfterCleanWindowsAndRaiseTheCeiling() -> None:
    """
    At the ceiling, after PROBE_INTERVAL clean windows with demand waiting,
    the limiter probes above; each clean probe raises the ceiling and the
    next one is three times bolder (2%, 6%, 18%, 50%).
    """
    clock, rl, adjustments = limiter(initial=9.8, probeInterval=3)
    rl.ceiling = 10.0
    for _ in range(3):
        window(clock, rl, successes=int(rl.rate * WINDOW))
    assert adjustments == ["probe"]
    assert rl.rate == pytest.approx(10.2)
    rates = [rl.rate]
    for _ in range(3):
        window(clock, rl, successes=int(rl.rate * WINDOW))
        rates.append(rl.rate)
    assert rl.ceiling == pytest.approx(rates[-2], rel=0.01)
    steps = [b / a - 1 for a, b in pairwise(rates)]
    assert steps == pytest.approx([0.06, 0.18, 0.5], rel=0.05)
    assert adjustments == ["probe"] * 4


def test_noProbeWithoutDemand() -> None:
    """
    Clean windows without anyone waiting for the rate teach nothing: no
    probe.
    """
    clock, rl, adjustments = limiter(initial=49.0, probeInterval=2)
    for _ in range(5):
        window(clock, rl, successes=30, saturated=False)
    assert adjustments == [] and rl.rate == 49.0


def test_noisyRefusalsMoveTheCeilingByAlpha() -> None:
    """
    Once the capacity is known, a window with a few refusals (timing jitter
    near the capacity) moves the ceiling toward what was accepted by alpha;
    a heavy overload (over 25%) is taken as measured.
    """
    clock, rl, _ = limiter(initial=10.0)
    window(clock, rl, successes=240, frequency=66)  # first evidence: 8 req/s
    assert rl.ceiling == pytest.approx(8.0)
    rl._setRate(8.0)
    window(clock, rl, successes=180, frequency=30)  # 6 req/s, 14% refused
    assert rl.ceiling == pytest.approx(min(8.0, 0.3 * 6 + 0.7 * 8))
    rl._setRate(7.0)
    window(clock, rl, successes=90, frequency=120)  # 3 req/s, 57% refused
    assert rl.ceiling == pytest.approx(3.0)


def test_failedProbeGoesBack() -> None:
    """
    A probe that meets even 1% of 429s ends: back below the capacity.
    """
    clock, rl, adjustments = limiter(initial=9.8, probeInterval=1)
    rl.ceiling = 10.0
    window(clock, rl, successes=294)
    assert adjustments == ["probe"]
    window(clock, rl, successes=300, frequency=5)
    assert adjustments[-1] == "decrease"
    assert rl.rate == pytest.approx(10.0 * 0.98)


def test_failedProbeKeepsWhatCleanWindowsProved() -> None:
    """
    A probe window that meets heavy refusals and accepted little (Z.AI
    refusing in a burst after the overshoot) goes back to the ceiling it
    set out from, not below it; the window after only nudges (the probe's
    tail), and refusals that persist are taken as measured.
    """
    clock, rl, adjustments = limiter(initial=9.8, probeInterval=1)
    rl.ceiling = 10.0
    rl._learned = True
    window(clock, rl, successes=294)
    assert adjustments == ["probe"] and rl.rate == pytest.approx(10.2)
    window(clock, rl, successes=150, frequency=150)  # 5 req/s, 50% refused
    assert rl.ceiling == pytest.approx(10.0)
    assert rl.rate == pytest.approx(9.8)
    window(clock, rl, successes=150, frequency=150)  # again: the probe's tail
    assert rl.ceiling == pytest.approx(0.3 * 5 + 0.7 * 10)
    window(clock, rl, successes=150, frequency=150)  # and again: measured
    assert rl.ceiling == pytest.approx(5.0)
    assert rl.rate == pytest.approx(4.9)


def test_concurrencyLimitFrom1302() -> None:
    """
    1302 lowers the concurrency limit below the calls in flight, not the
    rate; clean, busy windows probe it back up (+1, +2, +4...).
    """
    clock, rl, adjustments = limiter(probeInterval=2)
    window(clock, rl, successes=30, concurrency=10, inFlight=4, saturated=False)
    assert rl.limit == 3 and rl.admission.limit == 3
    assert "decrease" not in adjustments
    assert adjustments[-1] == "concurrency_decrease"
    limits = []
    for _ in range(5):
        rl.admission.slotWaits += 1
        window(clock, rl, successes=30, saturated=False)
        limits.append(rl.limit)
    assert limits == [3, 4, 6, 10, 10]


def test_quotaHold() -> None:
    """
    A quota error with a reset time holds until then; without one, no hold.
    """
    clock, rl, _ = limiter()
    clock.advance(1000)
    rl.holdQuota(ZaiError("1310", "quota"))
    assert rl.quotaHeld() is None
    rl.holdQuota(ZaiError("1308", "quota", resetAt=1000 + 3600))
    held = rl.quotaHeld()
    assert held is not None
    until, error = held
    assert (until, error.code) == (4600, "1308")
    clock.advance(3600)
    assert rl.quotaHeld() is None


def test_loopingCall() -> None:
    """
    The judge runs every window by itself, and stopping leaves no call.
    """
    clock, rl, adjustments = limiter()
    rl.start()
    for _ in range(90):
        rl.record("success")
    for _ in range(200):
        rl.record("frequency")
    clock.advance(WINDOW)
    assert adjustments == ["decrease"]
    rl.stop()
    assert clock.getDelayedCalls() == []


def test_judgeNeverStopsTheLoop(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A bug in one judgement is logged; the loop keeps running.
    """
    clock, rl, _ = limiter()
    rl.start()
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("bug")

    monkeypatch.setattr(rl, "judge", broken)
    clock.advance(WINDOW)
    clock.advance(WINDOW)
    assert len(calls) == 2
    rl.stop()


def test_persistAndRestore(tmp_path: Path) -> None:
    """
    The learned ceiling is written atomically after it moves, and a new
    limiter resumes there (the seed re-learned from RATE_LIMIT_MAX, with a
    burst of 429s).
    """
    path = tmp_path / "ceiling.json"
    clock = Clock()
    clock.advance(1_767_225_600)
    _, rl, _ = limiter(clock, stateFile=str(path))
    window(clock, rl, successes=90, frequency=200)
    state = json.loads(path.read_text())
    assert state["ceiling"] == pytest.approx(3.0) and state["hold"] == pytest.approx(2.94)
    rl.judge()  # a later window with no calls changes nothing
    assert json.loads(path.read_text()) == state
    assert state["ts"].endswith("Z")
    assert [p.name for p in tmp_path.iterdir()] == ["ceiling.json"]
    clock2 = Clock()
    clock2.advance(clock.seconds() + 60)
    _, again, _ = limiter(clock2, stateFile=str(path))
    assert again.restoredFromState
    assert (again.ceiling, again.rate) == pytest.approx((3.0, 2.94))
    assert again.admission.rate == pytest.approx(2.94)
    assert again.snapshot()["restored_from_state"] is True


@pytest.mark.parametrize(
    "content, reason",
    [
        ("not json", "Expecting value"),
        ('{"ceiling": -1, "hold": 2, "ts": "2026-01-01T00:00:00Z"}', "must be positive"),
        ('{"hold": 2}', "ceiling"),
        ('{"ceiling": 5, "hold": 2, "ts": "2025-01-01T00:00:00Z"}', "older than RATE_LIMIT_STATE_MAX_AGE"),
    ],
)
def test_badStateIgnored(tmp_path: Path, content: str, reason: str, logEvents: list[dict[str, Any]]) -> None:
    """
    Corrupt or stale state files are ignored with a log line saying why.
    """
    from twisted.logger import formatEvent

    path = tmp_path / "ceiling.json"
    path.write_text(content)
    clock = Clock()
    clock.advance(1_767_225_600)
    _, rl, _ = limiter(clock, stateFile=str(path))
    assert not rl.restoredFromState and rl.rate == 10.0
    messages = [formatEvent(e) for e in logEvents if "ignoring persisted ceiling" in formatEvent(e)]
    assert len(messages) == 1 and reason in messages[0]


def test_unwritableStateIsLogged(tmp_path: Path, logEvents: list[dict[str, Any]]) -> None:
    """
    A state file that cannot be written is logged, and nothing else fails.
    """
    from twisted.logger import formatEvent

    (tmp_path / "a-file").write_text("")  # a file where the folder should be
    clock, rl, _ = limiter(stateFile=str(tmp_path / "a-file" / "ceiling.json"))
    window(clock, rl, successes=90, frequency=200)
    assert any("failed to persist ceiling state" in formatEvent(e) for e in logEvents)


def test_stateFolderMadeOnDemand(tmp_path: Path) -> None:
    """
    The state file's folder is made when the ceiling is first persisted,
    readable only by the proxy's user.
    """
    path = tmp_path / "state" / "zaiproxy" / "ceiling.json"
    clock, rl, _ = limiter(stateFile=str(path))
    window(clock, rl, successes=90, frequency=200)
    assert json.loads(path.read_text())["ceiling"] == pytest.approx(3.0)
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_reset(tmp_path: Path) -> None:
    """
    Reset forgets everything learned, and the state file.
    """
    path = tmp_path / "ceiling.json"
    clock, rl, _ = limiter(stateFile=str(path))
    window(clock, rl, successes=90, frequency=200, concurrency=50, inFlight=3)
    assert path.exists()
    rl.reset()
    assert (rl.rate, rl.ceiling, rl.limit) == (10.0, 50.0, 10)
    assert not path.exists()


def test_resetStartsAFreshWindow() -> None:
    """
    A reset starts a fresh window: the 429s of the window in progress do not
    undo it when that window is judged, and the next judgement comes a
    whole window after the reset.
    """
    clock, rl, adjustments = limiter()
    rl.start()
    clock.advance(WINDOW / 2)
    for _ in range(200):
        rl.record("frequency")
    rl.admission.rateWaits += 1
    rl.reset()
    clock.advance(WINDOW / 2)  # when the old window would have been judged
    assert (rl.rate, rl.ceiling, adjustments) == (10.0, 50.0, [])
    for _ in range(240):
        rl.record("success")
    clock.advance(WINDOW / 2)  # a whole window after the reset
    assert rl.ceiling == 50.0 and rl.rate > 10.0
    assert adjustments == ["increase"]
    rl.stop()


def test_resetSaysWhatItCleared() -> None:
    """
    The reset's report names the quota hold it cleared, if one was held.
    """
    clock, rl, _ = limiter()
    clock.advance(100)
    assert rl.reset() == {"quota_hold_cleared": False}
    rl.holdQuota(ZaiError("1308", "quota", resetAt=200.0))
    assert rl.quotaHeld() is not None
    assert rl.reset() == {"quota_hold_cleared": True}
    assert rl.quotaHeld() is None


# -- simulation ---------------------------------------------------------------------


class ModelUpstream:
    """
    Z.AI as the convergence test sees it: answers 1303 above C calls a
    second, counted strictly (never more than C in any one second).
    """

    def __init__(self, clock: Any, capacity: float) -> None:
        self.clock = clock
        self.capacity = capacity
        self.accepted: deque[float] = deque()

    def call(self) -> bool:
        now = self.clock.seconds()
        while self.accepted and self.accepted[0] <= now - 1.0:
            self.accepted.popleft()
        if len(self.accepted) >= self.capacity:
            return False
        self.accepted.append(now)
        return True


def simulate(
    capacity: float, windows: int, rl: RateLimiter, clock: Any, upstream: ModelUpstream, load: float
) -> list[tuple[float, float, bool]]:
    """
    Offer C{load} calls a second for C{windows} windows; return each
    window's (rate at its end, fraction of 429s, whether it is probing).
    """
    history = []
    step = 0.01
    due = 0.0
    for _ in range(windows):
        ok = refused = 0

        def attempt(permit: Any) -> None:
            nonlocal ok, refused
            if upstream.call():
                ok += 1
                rl.record("success")
            else:
                refused += 1
                rl.record("frequency")
            permit.release()

        for _ in range(int(WINDOW / step)):
            due += load * step
            while due >= 1.0:
                due -= 1.0
                rl.admission.admit("load").addCallbacks(
                    attempt, lambda failure: failure.trap(NotAdmitted, CancelledError)
                )
            clock.advance(step)
        rl.judge()
        history.append((rl.rate, refused / max(1, ok + refused), rl._probing))
    return history


@pytest.mark.parametrize("capacity", [3.0, 8.0, 25.0])
def test_convergence(capacity: float) -> None:
    """
    Offered 3C against a hidden capacity C: within 10 windows the rate holds
    in [0.75C, C] and later windows see under 5% 429s; when C doubles the
    rate reaches 0.75 of the new C within 15 windows.
    """
    clock = HeapClock()
    # A short queue keeps demand saturated without thousands of waiters.
    _, rl, _ = limiter(clock, queueTimeout=WINDOW, maxQueue=int(2 * capacity) + 1)
    upstream = ModelUpstream(clock, capacity)
    history = simulate(capacity, 30, rl, clock, upstream, 3 * capacity)
    # From the 10th window the rate holds in [0.75C, C]; a probe may look
    # above it for a window (that is how a rise in capacity is found).
    held = [rate for rate, _, probing in history[9:] if not probing]
    assert held and all(0.75 * capacity <= rate <= capacity for rate in held), held
    later = [fraction for _, fraction, _ in history[10:]]
    assert sum(later) / len(later) < 0.05
    upstream.capacity = 2 * capacity
    history = simulate(2 * capacity, 15, rl, clock, upstream, 3 * capacity)
    reached = [i for i, (rate, _, _) in enumerate(history) if rate >= 0.75 * 2 * capacity]
    assert reached and reached[0] < 15
    rl.admission.close()


def test_restoreAtTheHoldLevel(tmp_path: Path) -> None:
    """
    A ceiling persisted mid-probe (the rate above it) or mid-convergence
    (below it) restores at the hold level: just below the ceiling.
    """
    path = tmp_path / "ceiling.json"
    clock = Clock()
    clock.advance(1_767_225_600)
    _, rl, _ = limiter(clock, stateFile=str(path), initial=9.8, probeInterval=1)
    rl.ceiling = 10.0
    window(clock, rl, successes=294)  # probe to 10.2
    window(clock, rl, successes=306)  # clean probe: ceiling 10.2, rate 10.8
    assert rl.rate > rl.ceiling
    _, again, _ = limiter(clock, stateFile=str(path))
    assert again.ceiling == pytest.approx(10.2)
    assert again.rate == pytest.approx(10.2 * 0.98)


def test_tailOfAnOverloadOnlyNudges() -> None:
    """
    The window right after a measured overload still sees its tail (Z.AI's
    window remembers what it took) and only moves the ceiling by alpha; an
    overload that persists is measured again the window after.
    """
    clock, rl, _ = limiter(initial=40.0)
    window(clock, rl, successes=720, frequency=480)  # first evidence: 24 req/s
    assert rl.ceiling == pytest.approx(24.0)
    window(clock, rl, successes=450, frequency=150)  # the tail: 15 req/s, 25%+
    assert rl.ceiling == pytest.approx(0.3 * 15 + 0.7 * 24)
    window(clock, rl, successes=300, frequency=300)  # still: measured
    assert rl.ceiling == pytest.approx(10.0)


@pytest.mark.parametrize("makeClock", [Clock, HeapClock])
def test_heapClockRunsLikeClock(makeClock: Any) -> None:
    """
    The simulations' L{HeapClock} runs calls as L{Clock} does: in time
    order, ties in the order scheduled, a call reset earlier or delayed
    later at its new time, a cancelled one never; a call that a call
    schedules counts from the end of the advance, and runs in it if due.
    """
    clock = makeClock()
    ran: list[str] = []
    clock.callLater(2, ran.append, "b")
    clock.callLater(1, ran.append, "a1")
    clock.callLater(1, ran.append, "a2")
    clock.callLater(3, ran.append, "cancelled").cancel()
    clock.callLater(5, ran.append, "reset to 1.5").reset(1.5)
    clock.callLater(0.5, ran.append, "delayed to 2.5").delay(2)
    clock.callLater(2.2, lambda: clock.callLater(0, ran.append, "chained"))
    assert sorted(call.getTime() for call in clock.getDelayedCalls()) == [1, 1, 1.5, 2, 2.2, 2.5]
    clock.advance(1)
    assert ran == ["a1", "a2"]
    clock.advance(2)
    assert ran == ["a1", "a2", "reset to 1.5", "b", "delayed to 2.5", "chained"]
    assert not clock.getDelayedCalls()


# -- shared limits: what travels through Redis ------------------------------------


def test_judgeWindowTakesTotalsFromElsewhere() -> None:
    """
    A window's totals from every proxy (as shared limits add them up) are
    judged by the same rules: a heavy overload sets the ceiling to what
    was accepted, and the rate just below it.
    """
    _, rl, adjustments = limiter()
    rl.judgeWindow(WindowTotals(60, 40, 0, None, 4.0, True, False))
    assert rl.ceiling == 4.0
    assert rl.rate == pytest.approx(4.0 * 0.98)
    assert adjustments == ["decrease"]


def test_takeWindowEmptiesIt() -> None:
    clock, rl, _ = limiter()
    rl.record("success")
    rl.record("frequency")
    rl.record("concurrency", 7)
    rl.record("concurrency", 5)
    rl.admission.slotWaits += 1
    clock.advance(10.0)
    totals = rl.takeWindow()
    assert totals == WindowTotals(1, 1, 2, 5, 0.1, False, True)
    assert rl.takeWindow() == WindowTotals(0, 0, 0, None, 0.0, False, False)


def test_learnedIsAdoptedWhole() -> None:
    """
    What one limiter learned, taken on by another (the proxy that judged a
    window, and the ones that did not): rate, ceiling, probe state and
    concurrency alike, and its admission paces at the adopted rate.
    """
    clock, judge, _ = limiter()
    window(clock, judge, successes=300, frequency=30)
    window(clock, judge, successes=0, concurrency=5, inFlight=6)
    for _ in range(10):
        window(clock, judge, successes=int(judge.rate * WINDOW))
    fields = judge.learned()
    assert all(isinstance(value, str) for value in fields.values())
    _, other, _ = limiter()
    other.adopt(fields)
    assert other.learned() == fields
    assert (other.rate, other.ceiling, other.limit) == (judge.rate, judge.ceiling, judge.limit)
    assert other.admission.rate == judge.rate and other.admission.limit == judge.limit


def test_adoptKeepsItsOwnBounds() -> None:
    """
    Fields from a proxy with other settings (or garbage) cannot take this
    one outside its own RATE_LIMIT_MIN/MAX and MAX_WORKERS.
    """
    _, rl, _ = limiter()
    rl.adopt({"rate": "1e6", "ceiling": "1e6", "limit": "500", "gain": "not a number"})
    assert (rl.rate, rl.ceiling, rl.limit) == (50.0, 50.0, 10)
    assert rl.learned()["gain"] == "0.02"
    rl.adopt({"rate": "0.001", "limit": "0"})
    assert (rl.rate, rl.limit) == (1.0, 1)
