# -*- test-case-name: tests.test_limiter -*-
"""
The adaptive rate limiter: learns how fast and how wide Z.AI lets this key
go, from the 429s it answers, and remembers it across restarts.

Every C{RATE_LIMIT_WINDOW} (a LoopingCall, not lazily on the next request
as the Go zai-proxy did) the window's outcomes are judged:

  - Frequency 429s (1303, 1305, unknown codes) in 1% or more of the calls
    mean the rate is above capacity; what Z.AI accepted in that window
    measures the capacity. Near capacity timing jitter makes that noisy, so
    the ceiling moves toward it by C{RATE_LIMIT_CEILING_ALPHA}; a heavy
    overload (over 25% refused), or the first evidence, is taken as it is.
    What was accepted is counted over the window's active span (first call
    to end of last), not across a quiet start or end; a window judged late
    (a stalled process) is not judged.
    The ceiling never stays above the refused rate, and the rate holds a
    margin below the ceiling.
  - A clean window in which callers waited for the rate is hard evidence
    that Z.AI takes at least that rate: the ceiling rises to it (the Go zai-proxy's
    ceiling never rose after a clean probe). Below the ceiling the rate
    converges up to it; at the ceiling, after C{RATE_LIMIT_PROBE_INTERVAL}
    clean windows, it probes above, and while probes stay clean each next
    one is three times bolder, so a capacity that doubled is found within a
    handful of windows.
  - 1302 (too many at once) lowers the concurrency limit, not the rate, to
    below the number of calls that were in flight; it recovers the same way.
  - Quota 429s (1308, 1310) are not rate signals: they put the limiter on
    hold until the stated reset, so the proxy can answer locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from zaiproxy.dialects.zai_errors import ZaiError
from zaiproxy.limits.admission import Admission
from zaiproxy.limits.ceilingfile import CeilingState, persistCeiling, restoreCeiling, rfc3339
from zaiproxy.limits.learned import WindowSharing, WindowTotals, adoptFields, learnedFields

__all__ = ["HEAVY_RATIO", "REFUSED_RATIO", "LimiterSettings", "RateLimiter", "WindowTotals"]

#: A window in which Z.AI refused at least this share of the calls (429s of
#: the class in question) is over capacity; below it, the window is clean.
REFUSED_RATIO = 0.01
#: Refusing more than this share is a clear overload: what Z.AI accepted is
#: then a sound measure of its capacity.
HEAVY_RATIO = 0.25
#: Consecutive clean probes grow bolder up to this step.
MAX_PROBE_GAIN = 0.5
#: A window judged later than this share of a window after its end is not
#: evidence: the process was stalled through part of it.
LATE_WINDOW = 0.5


@attrs.frozen
class LimiterSettings:
    """The limiter's settings (the Go zai-proxy's names, in L{zaiproxy.config.settings})."""

    initial: float
    minimum: float
    maximum: float
    window: float
    alpha: float
    margin: float
    probeInterval: int
    maxWorkers: int
    maxQueue: int
    queueTimeout: float
    stateFile: str | None
    stateMaxAge: float
    #: Answer quota 429s locally until Z.AI's stated reset (QUOTA_HOLD).
    quotaHold: bool = True


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


class RateLimiter:
    """
    Rate and concurrency, adapted per window; it owns the L{Admission} gate.

    @ivar rate: the current rate (requests/s) the bucket admits.
    @ivar ceiling: the estimate of Z.AI's capacity for this key.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        settings: LimiterSettings,
        onAdjust: Callable[[str], None] = lambda direction: None,
        onAdmitted: Callable[[str, float], None] = lambda client, waited: None,
        onRejected: Callable[[str], None] = lambda client: None,
    ) -> None:
        self._clock = clock
        self.settings = settings
        self._onAdjust = onAdjust
        self.rate = settings.initial
        self.ceiling = settings.maximum
        self.ceilingUpdatedAt: float | None = None
        self.restoredFromState = False
        self._clean = 0
        self._probing = False
        self._gain = settings.margin
        self._learned = False
        self._tail = False
        self.limit = settings.maxWorkers
        self.limitCeiling = settings.maxWorkers
        self._limitClean = 0
        self._limitProbing = False
        self._limitStep = 1
        self._windowStart = clock.seconds()
        self._successes = 0
        self._frequency = 0
        self._concurrency = 0
        self._concurrencyAt: int | None = None
        self._dirty = False
        self.quotaUntil: float | None = None
        self.quotaError: ZaiError | None = None
        self._loop: LoopingCall | None = None
        #: Shared limits, when C{REDIS_URL} is set: they judge the windows.
        self.sharing: WindowSharing | None = None
        self._restore()
        self.admission = Admission(
            clock,
            self.rate,
            self.limit,
            settings.maxQueue,
            settings.queueTimeout,
            onAdmitted=onAdmitted,
            onRejected=onRejected,
        )

    # -- outcomes -----------------------------------------------------------

    def observe(self, error: ZaiError | None) -> None:
        """
        How a model call Z.AI answered went: C{None} for a success, else
        the error of its 429 (or of its stream, at 200). This is the one
        place Z.AI's error classes become the limiter's outcomes.
        """
        if error is None:
            self.record("success")
        elif error.cls in ("frequency", "unknown"):
            self.record("frequency")
        elif error.cls == "concurrency":
            sharing = self.sharing
            shared = sharing is not None and sharing.shared
            self.record("concurrency", sharing.slotsTaken if sharing and shared else self.admission.inFlight)
        elif error.cls == "quota" and self.settings.quotaHold:
            self.holdQuota(error)

    @property
    def inFlight(self) -> int:
        """Model calls holding a slot now."""
        return self.admission.inFlight

    @property
    def queued(self) -> int:
        """Model calls waiting for a slot now."""
        return self.admission.queued

    def record(self, outcome: str, inFlight: int | None = None) -> None:
        """
        One call's outcome: C{success}, C{frequency} (a rate 429),
        C{concurrency} (1302, with the calls in flight when it came).
        """
        if outcome == "success":
            self._successes += 1
        elif outcome == "frequency":
            self._frequency += 1
        elif outcome == "concurrency":
            self._concurrency += 1
            if inFlight is not None:
                self._concurrencyAt = (
                    inFlight if self._concurrencyAt is None else min(self._concurrencyAt, inFlight)
                )

    def holdQuota(self, error: ZaiError, share: bool = True) -> None:
        """A quota 429 with a reset time: hold until then."""
        if error.resetAt is not None and error.resetAt > self._clock.seconds():
            if self.quotaUntil is None or error.resetAt > self.quotaUntil:
                self.quotaUntil = error.resetAt
                self.quotaError = error
                if share and self.sharing is not None:
                    self.sharing.holdQuota(error)
                self.log.warn(
                    "Quota exhausted (code {code}): answering 429 locally until {until}",
                    code=error.code,
                    until=rfc3339(error.resetAt),
                )

    def quotaHeld(self) -> tuple[float, ZaiError] | None:
        """The quota hold in force now, if any."""
        if self.quotaUntil is None or self.quotaError is None:
            return None
        if self._clock.seconds() >= self.quotaUntil:
            self.quotaUntil = self.quotaError = None
            return None
        return self.quotaUntil, self.quotaError

    # -- the window -----------------------------------------------------------

    def start(self) -> None:
        self._windowStart = self._clock.seconds()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.settings.window, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.admission.close()

    def _tick(self) -> None:
        # A LoopingCall whose function raises stops for good: never raise.
        try:
            if self.sharing is not None and self.sharing.shared:
                self.sharing.windowEnded()
            else:
                self.judge()
        except Exception:
            self.log.failure("judging a rate-limit window failed")

    def judge(self) -> None:
        """Judge the window that just ended and adjust."""
        now = self._clock.seconds()
        late = now - self._windowStart - self.settings.window
        totals = self.takeWindow()
        if late > LATE_WINDOW * self.settings.window:
            # The process did not run for part of this window (a blocked
            # reactor, a paused VM): its calls waited in buffers while the
            # clock ran, so its counts measure the stall, not Z.AI.
            self.log.warn(
                "Rate limit: window judged {late:.1f} s late (the process was stalled); not judging it",
                late=late,
            )
            return
        self.judgeWindow(totals)

    def takeWindow(self) -> WindowTotals:
        """
        This process's outcomes in the window that just ended; the next
        window starts now.
        """
        now = self._clock.seconds()
        admission = self.admission
        # What Z.AI accepted is measured over the time calls were going: a
        # window that began idle (a fresh start, a quiet spell, then a
        # burst) would otherwise read as a fraction of the capacity, and
        # the rate would hold there until the probes. (Without a span, as
        # for outcomes recorded with no admission, the window is the time.)
        span = admission.takeActiveSpan()
        elapsed = max(span if span > 0 else now - self._windowStart, 1e-6)
        self._windowStart = now
        totals = WindowTotals(
            successes=self._successes,
            frequency=self._frequency,
            concurrency=self._concurrency,
            concurrencyAt=self._concurrencyAt,
            accepted=self._successes / elapsed,
            rateSaturated=admission.rateWaits > 0,
            slotSaturated=admission.slotWaits > 0,
        )
        self._successes = self._frequency = self._concurrency = 0
        self._concurrencyAt = None
        admission.rateWaits = admission.slotWaits = 0
        return totals

    def judgeWindow(self, totals: WindowTotals) -> None:
        """
        Adjust to a window's outcomes: this process's, or (with shared
        limits) every proxy's together.
        """
        now = self._clock.seconds()
        self._judgeRate(totals.successes, totals.frequency, totals.accepted, totals.rateSaturated, now)
        self._judgeConcurrency(
            totals.successes, totals.concurrency, totals.concurrencyAt, totals.slotSaturated
        )
        if self._dirty:
            self._dirty = False
            self._persist(now)

    def _judgeRate(
        self, successes: int, frequency: int, accepted: float, saturated: bool, now: float
    ) -> None:
        total = successes + frequency
        if total == 0:
            return
        ratio = frequency / total
        if ratio >= REFUSED_RATIO:
            self._refusedAt(ratio, accepted, now)
            return
        self._tail = False
        self._cleanWindow(accepted, saturated, now)

    def _refusedAt(self, ratio: float, accepted: float, now: float) -> None:
        """
        Z.AI refused calls at this rate, so its capacity is below it; what
        it accepted in the window (C{accepted}, per second) measures that
        capacity. Near the capacity, timing jitter makes such windows noisy:
        their measurement moves the ceiling by alpha. A heavy overload (or
        the first evidence there is) is taken as it is. (The Go zai-proxy
        pulled the ceiling toward the current rate and held still between
        1% and 5%: slow to learn, and a steady trickle of 429s.)
        """
        s = self.settings
        old = self.ceiling
        measured = min(self.rate, accepted)
        # The window right after a measured overload still sees its tail
        # (Z.AI's own window remembers the calls it took), and undercounts:
        # it only nudges. An overload that persists is measured again the
        # window after.
        heavy = ratio > HEAVY_RATIO and not self._tail
        if heavy or not self._learned:
            ceiling = measured
        else:
            ceiling = min(self.rate, s.alpha * measured + (1 - s.alpha) * self.ceiling)
        self._tail = heavy or not self._learned or self._probing
        if self._probing:
            # A failed probe shows the capacity lies below the probed rate;
            # the clean windows before it showed where it lies at least (the
            # ceiling it set out from): go back there. What a probe window
            # accepted undercounts (Z.AI's own window refuses in bursts after
            # an overshoot); if the capacity really fell, the next window's
            # refusals say so.
            ceiling = max(ceiling, old)
        self._learned = True
        self.ceiling = _clamp(ceiling, s.minimum, s.maximum)
        self._setRate(min(self.rate, _clamp(self.ceiling * (1 - s.margin), s.minimum, s.maximum)))
        self._probing = False
        self._gain = s.margin
        self._clean = 0
        self._ceilingMoved(now)
        self._onAdjust("decrease")
        self.log.info(
            "Rate limit: Ceiling updated {old:.2f} -> {new:.2f} req/s, holding at {rate:.2f} req/s "
            "(429 rate: {ratio:.2f}%)",
            old=old,
            new=self.ceiling,
            rate=self.rate,
            ratio=ratio * 100,
        )

    def _cleanWindow(self, accepted: float, saturated: bool, now: float) -> None:
        """
        A window without (many) refusals: converge toward the ceiling, or,
        after enough clean windows at it, probe above it.
        """
        s = self.settings
        if saturated:
            # Callers waited for the rate and Z.AI took it all: hard
            # evidence that the capacity is at least this rate (so a clean
            # probe raises the ceiling; the Go zai-proxy's never rose).
            proven = min(accepted, self.rate, s.maximum)
            if proven > self.ceiling:
                self.ceiling = proven
                self._ceilingMoved(now)
        target = _clamp(self.ceiling * (1 - s.margin), s.minimum, s.maximum)
        if self._probing:
            if saturated and self.rate < s.maximum:
                self._gain = min(self._gain * 3, MAX_PROBE_GAIN)
                self._probe(min(s.maximum, max(self.rate, self.ceiling) * (1 + self._gain)))
            else:
                self._probing = False
        elif self.rate < target:
            self._setRate(min(self.rate + max(0.5 * (target - self.rate), 0.25), target))
            self._onAdjust("increase")
            self.log.info(
                "Rate limit: Converging to {rate:.2f} req/s (target: {target:.2f}, ceiling: {ceiling:.2f})",
                rate=self.rate,
                target=target,
                ceiling=self.ceiling,
            )
        else:
            self._clean += 1
            if self._clean >= s.probeInterval and saturated and self.rate < s.maximum:
                self._probing = True
                self._gain = s.margin
                self._probe(min(s.maximum, max(self.rate, self.ceiling) * (1 + s.margin)))

    def _probe(self, rate: float) -> None:
        clean, self._clean = self._clean, 0
        self._setRate(rate)
        self._onAdjust("probe")
        self.log.info(
            "Rate limit: Probing ceiling at {rate:.2f} req/s (estimated ceiling: {ceiling:.2f}, "
            "clean windows: {clean})",
            rate=self.rate,
            ceiling=self.ceiling,
            clean=clean,
        )

    def _judgeConcurrency(
        self, successes: int, refused: int, inFlightAt: int | None, saturated: bool
    ) -> None:
        s = self.settings
        total = successes + refused
        if total and refused / total >= REFUSED_RATIO:
            # Z.AI refused the call that made it inFlightAt at once.
            observed = max(1, (inFlightAt if inFlightAt is not None else self.limit) - 1)
            self.limitCeiling = observed
            self._setLimit(min(self.limit, observed))
            self._limitProbing = False
            self._limitClean = 0
            self._limitStep = 1
            self._onAdjust("concurrency_decrease")
            self.log.info(
                "Rate limit: Concurrency limit {limit} (1302 with {inFlight} in flight)",
                limit=self.limit,
                inFlight=inFlightAt,
            )
            return
        if refused or not saturated or self.limit >= s.maxWorkers:
            self._limitProbing = False
            return
        if self._limitProbing:
            self.limitCeiling = max(self.limitCeiling, self.limit)
            self._limitStep *= 2
        else:
            self._limitClean += 1
            if self._limitClean < s.probeInterval:
                return
            self._limitProbing = True
            self._limitStep = 1
        self._limitClean = 0
        self._setLimit(min(s.maxWorkers, self.limit + self._limitStep))
        self._onAdjust("concurrency_increase")
        self.log.info("Rate limit: Probing concurrency at {limit}", limit=self.limit)

    def _setRate(self, rate: float) -> None:
        self.rate = rate
        self.admission.setRate(rate)

    def _setLimit(self, limit: int) -> None:
        self.limit = limit
        self.admission.setLimit(limit)

    def _ceilingMoved(self, now: float) -> None:
        self.ceilingUpdatedAt = now
        self._dirty = True

    # -- admin ------------------------------------------------------------------

    def reset(self) -> dict[str, bool]:
        """
        Forget what was learned: the initial rate, the ceiling at
        RATE_LIMIT_MAX (the Go zai-proxy set it to the initial rate), full
        concurrency, no quota hold, no state file; and start a fresh window,
        so the 429s counted before the reset cannot undo it when the window
        in progress is judged. Says whether a quota hold was cleared.
        """
        s = self.settings
        self.ceiling = s.maximum
        self.ceilingUpdatedAt = None
        self.restoredFromState = False
        self._probing = False
        self._tail = False
        self._clean = 0
        self._gain = s.margin
        self._learned = False
        self._setRate(s.initial)
        self.limitCeiling = s.maxWorkers
        self._setLimit(s.maxWorkers)
        self._freshWindow()
        # An operator who resets wants traffic to flow: a quota hold goes
        # too. If Z.AI still refuses, its next quota 429 sets it again.
        held = self.quotaHeld() is not None
        self.quotaUntil = self.quotaError = None
        if self.sharing is not None:
            self.sharing.reset()
        if s.stateFile:
            try:
                os.remove(s.stateFile)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.log.warn(
                    "Rate limiter reset: cannot remove {path}: {error}", path=s.stateFile, error=str(e)
                )
        self.log.info(
            "Rate limiter reset: rate={rate:.1f}, ceiling={ceiling:.1f}, quota hold cleared: {held}",
            rate=self.rate,
            ceiling=self.ceiling,
            held=held,
        )
        return {"quota_hold_cleared": held}

    def _freshWindow(self) -> None:
        """Drop the window in progress and start the next one now."""
        self._windowStart = self._clock.seconds()
        self._successes = self._frequency = self._concurrency = 0
        self._concurrencyAt = None
        self.admission.rateWaits = self.admission.slotWaits = 0
        self.admission.takeActiveSpan()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self._loop.start(self.settings.window, now=False)

    def setBounds(self, initial: float, minimum: float, maximum: float) -> None:
        """
        New C{RATE_LIMIT_INITIAL}/C{MIN}/C{MAX} while running (a reload):
        the rate and the ceiling are clamped into the new bounds; a ceiling
        not learned yet follows C{RATE_LIMIT_MAX}, its first estimate.
        C{initial} applies at the next reset.
        """
        old = self.settings
        self.settings = attrs.evolve(old, initial=initial, minimum=minimum, maximum=maximum)
        if not self._learned and self.ceiling == old.maximum:
            self.ceiling = maximum
        self.ceiling = _clamp(self.ceiling, minimum, maximum)
        self._setRate(_clamp(self.rate, minimum, maximum))

    # -- persistence -------------------------------------------------------------

    def _persist(self, now: float) -> None:
        s = self.settings
        if s.stateFile:
            # The level to resume at: just below the ceiling (the rate of
            # the moment may be mid-probe or mid-convergence).
            hold = _clamp(self.ceiling * (1 - s.margin), s.minimum, s.maximum)
            state = CeilingState(self.ceiling, hold, self.limit, self.ceilingUpdatedAt or now)
            persistCeiling(s.stateFile, state, self.log)

    def _restore(self) -> None:
        s = self.settings
        if not s.stateFile:
            return
        state = restoreCeiling(s.stateFile, s.stateMaxAge, self._clock.seconds(), self.log)
        if state is None:
            return
        self.ceiling = _clamp(state.ceiling, s.minimum, s.maximum)
        self.rate = _clamp(state.hold, s.minimum, self.ceiling)
        if state.concurrency is not None and 1 <= state.concurrency <= s.maxWorkers:
            self.limit = state.concurrency
        self.ceilingUpdatedAt = state.learnedAt
        self.restoredFromState = True
        self._learned = True
        self.log.info(
            "Rate limit: resumed at persisted ceiling {ceiling:.2f} req/s, holding at {rate:.2f} req/s "
            "(learned {when})",
            ceiling=self.ceiling,
            rate=self.rate,
            when=rfc3339(state.learnedAt),
        )

    # -- sharing -------------------------------------------------------------------

    def learned(self) -> dict[str, str]:
        """
        What this limiter has learned, as the text fields shared limits
        keep in Redis.
        """
        return learnedFields(self)

    def adopt(self, fields: dict[str, str]) -> None:
        """
        Take on what the proxies sharing this key learned (L{learned}'s
        fields), within this proxy's bounds.
        """
        s = self.settings
        adoptFields(self, fields)
        self.ceiling = _clamp(self.ceiling, s.minimum, s.maximum)
        self._setRate(_clamp(self.rate, s.minimum, s.maximum))
        self._setLimit(max(1, min(s.maxWorkers, self.limit)))

    # -- reporting ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """
        The Go zai-proxy's /health "rate_limit" section, and the concurrency state.
        """
        s = self.settings
        section: dict[str, Any] = {
            "current_rate": round(self.rate, 4),
            "ceiling": round(self.ceiling, 4),
            "hold": round(_clamp(self.ceiling * (1 - s.margin), s.minimum, s.maximum), 4),
            "restored_from_state": self.restoredFromState,
            **self.admission.snapshot(),
        }
        if self.ceilingUpdatedAt is not None:
            section["ceiling_updated_at"] = rfc3339(self.ceilingUpdatedAt)
        if s.stateFile:
            section["state_file"] = s.stateFile
        held = self.quotaHeld()
        if held is not None:
            section["quota_hold_until"] = rfc3339(held[0])
            section["quota_hold_code"] = held[1].code
        return section
