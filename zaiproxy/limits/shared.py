# -*- test-case-name: tests.test_shared_limits -*-
"""
Shared limits: every proxy in front of one Z.AI key limits as one, through
Redis (C{REDIS_URL}).

Z.AI's limits belong to the key, not to a process: two proxies that each
learn the ceiling alone offer Z.AI twice what it accepts. So, in Redis:

  - the token bucket, as GCRA in a Lua script on Redis's own clock
    (C{scripts/acquire.lua}), together with the concurrency slots as
    leases that expire unless their proxy renews them, so a proxy that
    dies gives its slots back within C{REDIS_LEASE};
  - each window's outcomes (successes, 429s, waits) from every proxy,
    added up per window numbered on Redis's clock; exactly one proxy
    (C{SET NX}) judges each window with the same rules as a lone limiter
    and publishes what it learned, which every proxy takes on
    (C{scripts/window.lua});
  - the quota hold: a key that expires at Z.AI's stated reset. A proxy
    that is told sets it; the others find it at their next admission and
    answer 429 themselves from then on.

The fair queue stays per proxy: it orders this proxy's waiting callers
among themselves, and the shared bucket paces all proxies together.

When Redis fails or is slower than C{REDIS_TIMEOUT}, this proxy goes on
alone at its share of what was learned (the ceiling and the concurrency
limit divided by the proxies seen alive in the last three windows), says
so once in the log, in C{/health} and in C{zai_proxy_shared_limits_up},
and rejoins when Redis answers again. No client request fails because
Redis did.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from zaiproxy.dialects.zai_errors import ZaiError
from zaiproxy.limits.admission import Grant
from zaiproxy.limits.learned import WindowTotals
from zaiproxy.limits.limiter import RateLimiter
from zaiproxy.limits.redislink import RedisAway, RedisLink, RedisRefused, Script

__all__ = ["Mode", "SharedKeys", "SharedLimits"]

#: While alone, how often to ask whether Redis is back.
REJOIN_INTERVAL = 1.0
#: How long a freed slot may wait to ride on the next acquire's round trip.
RETURN_DELAY = 0.01

ACQUIRE = Script.named("acquire")
RENEW = Script.named("renew")
WINDOW = Script.named("window")
SEED = Script.named("seed")


class Mode(Enum):
    """
    Where this proxy's limits come from.
    """

    #: Started; the first answer from Redis not in yet (limits are local).
    JOINING = "joining"
    #: Limits are shared through Redis.
    SHARED = "shared"
    #: Redis is away: this proxy limits alone, at its share.
    ALONE = "alone"


@attrs.frozen
class SharedKeys:
    """
    The Redis keys of one Z.AI key's limits. They are named after a hash
    of the key (never the key), so proxies for different keys can share a
    Redis without sharing limits.
    """

    prefix: str

    @classmethod
    def forKey(cls, apiKey: str, namespace: str = "zaiproxy") -> SharedKeys:
        digest = hashlib.sha256(apiKey.encode("utf-8")).hexdigest()[:16]
        return cls(f"{namespace}:{digest}")

    @property
    def state(self) -> str:
        return self.prefix + ":state"

    @property
    def bucket(self) -> str:
        return self.prefix + ":bucket"

    @property
    def leases(self) -> str:
        return self.prefix + ":leases"

    @property
    def quota(self) -> str:
        return self.prefix + ":quota"

    @property
    def instances(self) -> str:
        return self.prefix + ":instances"


def _pairs(flat: Any) -> dict[str, str]:
    items = [item.decode() if isinstance(item, bytes) else str(item) for item in flat or ()]
    return dict(zip(items[::2], items[1::2], strict=False))


class SharedLimits:
    """
    The limiter's link to the other proxies: the L{RemoteGate} its
    admission asks, and the L{WindowSharing} its windows go to.

    @ivar slotsTaken: concurrency slots every proxy held, as last seen.
    @ivar alive: proxies seen in the last three windows (this one too).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        link: RedisLink,
        keys: SharedKeys,
        limiter: RateLimiter,
        instance: str,
        leaseTime: float,
    ) -> None:
        self._clock = clock
        self._link = link
        self._keys = keys
        self._limiter = limiter
        self.instance = instance
        self._leaseTime = leaseTime
        self.mode = Mode.JOINING
        self.slotsTaken = 0
        self.alive = 1
        self._share = 1
        self._held: set[str] = set()
        self._leaseNumber = 0
        self._renewing = LoopingCall(self._renew)
        self._renewing.clock = clock
        self._rejoining = LoopingCall(self._rejoin)
        self._rejoining.clock = clock
        self._pending: set[Deferred[Any]] = set()
        self._windowCall: IDelayedCall | None = None
        self._returned: list[str] = []
        self._returnCall: IDelayedCall | None = None

    @property
    def shared(self) -> bool:
        return self.mode is Mode.SHARED

    # -- life -------------------------------------------------------------------

    def start(self) -> None:
        self._limiter.sharing = self
        self._limiter.admission.remote = self
        self._link.open()
        self._renewing.start(self._leaseTime / 3, now=False)
        self._track(self._join())

    def stop(self) -> Deferred[Any]:
        for loop in (self._renewing, self._rejoining):
            if loop.running:
                loop.stop()
        if self._windowCall is not None and self._windowCall.active():
            self._windowCall.cancel()
        self._windowCall = None
        self._cancelReturn()
        self._limiter.sharing = None
        self._limiter.admission.remote = None
        leases, self._held = [*self._held, *self._returned], set()
        self._returned = []
        if leases and self.shared:
            # Hand the slots back at once rather than after REDIS_LEASE.
            self._track(self._link.command("zrem", self._keys.leases, *leases))
        self.mode = Mode.ALONE
        done = Deferred.fromCoroutine(self._closed())
        return done

    async def _closed(self) -> None:
        for pending in list(self._pending):
            try:
                await pending
            except Exception:
                pass
        await self._link.close()

    def _track(self, d: Deferred[Any]) -> None:
        """
        Keep a background call until it ends (L{stop} waits for it); its
        failure means Redis is away.
        """
        self._pending.add(d)
        d.addErrback(self._failed)
        d.addBoth(lambda _: self._pending.discard(d))

    def _join(self) -> Deferred[Any]:
        """
        Take on what the proxies learned (or publish ours, if we are the
        first), then share.
        """
        mine = self._limiter.learned()
        if self._share > 1:
            # Learned alone, at a share: the whole is about share times it.
            for field in ("rate", "ceiling"):
                mine[field] = repr(float(mine[field]) * self._share)
        args = [item for pair in mine.items() for item in pair]
        d = self._link.run(SEED, [self._keys.state], args)
        d.addCallback(self._joined)
        return d

    def _joined(self, flat: Any) -> None:
        if self._rejoining.running:
            self._rejoining.stop()
        self._limiter.adopt(_pairs(flat))
        was, self.mode, self._share = self.mode, Mode.SHARED, 1
        self.log.info(
            "Shared limits: {how} through {redis} as {instance} (rate {rate:.2f} req/s, "
            "ceiling {ceiling:.2f}, concurrency {limit})",
            how="back, sharing again" if was is Mode.ALONE else "sharing",
            redis=self._link.address.masked,
            instance=self.instance,
            rate=self._limiter.rate,
            ceiling=self._limiter.ceiling,
            limit=self._limiter.limit,
        )
        held = self._limiter.quotaHeld()
        if held is not None:
            # Told while alone: the others should hold too.
            self.holdQuota(held[1])
        # Callers that queued while we joined go through the shared gate now.
        self._limiter.admission._dispatch()

    # -- admission (RemoteGate) --------------------------------------------------

    def acquire(self, wanted: int) -> Deferred[Grant]:
        first = self._leaseNumber
        self._leaseNumber += wanted
        prefix = f"{self.instance}#{id(self):x}:"
        settings = self._limiter.settings
        # Slots freed since the last round trip go back in this one.
        returned, self._returned = self._returned, []
        self._cancelReturn()
        d = self._link.run(
            ACQUIRE,
            [self._keys.state, self._keys.bucket, self._keys.leases, self._keys.quota],
            [wanted, prefix, first, self._leaseTime, self._limiter.rate, settings.maxWorkers, *returned],
        )
        d.addCallbacks(lambda reply: self._grant(reply, prefix, first), self._acquireFailed)
        return d

    def _grant(self, reply: Any, prefix: str, first: int) -> Grant:
        granted, wait, quota, taken, _ = reply
        self.slotsTaken = int(taken)
        if quota:
            held = self._quotaFrom(quota)
            if held is not None:
                return Grant((), 0.0, held)
        leases = tuple(f"{prefix}{first + i}" for i in range(int(granted)))
        self._held.update(leases)
        retry = float(wait.decode() if isinstance(wait, bytes) else wait)
        return Grant(leases, None if retry < 0 else retry)

    def _acquireFailed(self, failure: Failure) -> Failure:
        self._failed(failure)
        return failure

    def release(self, lease: str) -> None:
        if lease not in self._held:
            return
        self._held.discard(lease)
        if not self.shared:
            return
        # Returned with the next acquire's round trip, or after RETURN_DELAY
        # in one ZREM if none comes: one round trip a batch, not a call.
        self._returned.append(lease)
        if self._returnCall is None:
            self._returnCall = self._clock.callLater(RETURN_DELAY, self._returnNow)

    def _returnNow(self) -> None:
        self._returnCall = None
        returned, self._returned = self._returned, []
        if returned and self.shared:
            self._track(self._link.command("zrem", self._keys.leases, *returned))

    def _cancelReturn(self) -> None:
        if self._returnCall is not None and self._returnCall.active():
            self._returnCall.cancel()
        self._returnCall = None

    def _renew(self) -> None:
        if self._held and self.shared:
            self._track(self._link.run(RENEW, [self._keys.leases], [self._leaseTime, *sorted(self._held)]))

    # -- windows (WindowSharing) ---------------------------------------------------

    def windowEnded(self) -> None:
        """
        The limiter's own window clock ended a window. While sharing, the
        windows follow Redis's clock instead (L{_windowDue}); this one only
        starts that clock if it is not running.
        """
        if self._windowCall is None or not self._windowCall.active():
            self._report(self._limiter.takeWindow())

    def _windowDue(self) -> None:
        self._windowCall = None
        if self.shared:
            self._report(self._limiter.takeWindow())

    def _report(self, totals: WindowTotals) -> None:
        """
        Add this proxy's window to the shared one, in the middle of a
        window on Redis's clock: each proxy then adds exactly one report to
        each window, and the window before is complete when it is judged.
        """
        args = [
            self._keys.prefix,
            self._limiter.settings.window,
            self.instance,
            totals.successes,
            totals.frequency,
            totals.concurrency,
            -1 if totals.concurrencyAt is None else totals.concurrencyAt,
            int(totals.rateSaturated),
            int(totals.slotSaturated),
            repr(totals.accepted),
        ]
        d = self._link.run(WINDOW, [self._keys.state, self._keys.instances, self._keys.quota], args)
        d.addCallback(self._windowJudged)
        self._track(d)

    def _windowJudged(self, reply: Any) -> Deferred[Any] | None:
        previous, state, alive, now, held = reply
        self.alive = max(1, int(alive))
        if not int(held) and self._limiter.quotaHeld() is not None:
            # Every hold is in Redis too: gone there means an operator
            # reset the limits on some proxy (or it expired).
            self._limiter.quotaUntil = self._limiter.quotaError = None
            self.log.info("Shared limits: the quota hold was lifted on another proxy")
        span = self._limiter.settings.window
        redisNow = float(now)
        if self.shared and self._windowCall is None:
            due = ((redisNow // span) + 1.5) * span - redisNow
            self._windowCall = self._clock.callLater(due, self._windowDue)
        limiter = self._limiter
        if state:
            limiter.adopt(_pairs(state))
        if not previous:
            return None
        fields = _pairs(previous)
        number = lambda name: float(fields.get(name, "0") or 0)  # noqa: E731
        at = fields.get("concurrency_at")
        limiter.judgeWindow(
            WindowTotals(
                successes=int(number("successes")),
                frequency=int(number("frequency")),
                concurrency=int(number("concurrency")),
                concurrencyAt=int(at) if at else None,
                accepted=number("accepted"),
                rateSaturated=number("rate_waits") > 0,
                slotSaturated=number("slot_waits") > 0,
            )
        )
        learned = limiter.learned()
        args = [item for pair in learned.items() for item in pair]
        return self._link.command("hset", self._keys.state, *args)

    # -- the quota hold -------------------------------------------------------------

    def holdQuota(self, error: Any) -> None:
        if not isinstance(error, ZaiError) or error.resetAt is None or not self.shared:
            return
        document = json.dumps({"code": error.code, "message": error.message, "reset_at": error.resetAt})
        until = int(error.resetAt * 1000)
        self._track(self._link.command("set", self._keys.quota, document, "pxat", until))

    def _quotaFrom(self, raw: Any) -> tuple[float, ZaiError] | None:
        try:
            document = json.loads(raw)
            error = ZaiError(
                code=document.get("code"),
                cls="quota",
                message=document.get("message") or "",
                resetAt=float(document["reset_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        assert error.resetAt is not None
        self._limiter.holdQuota(error, share=False)
        return error.resetAt, error

    # -- reset -------------------------------------------------------------------------

    def reset(self) -> None:
        if not self.shared:
            return
        keys = self._keys
        deleted = self._link.command("del", keys.state, keys.bucket, keys.quota)
        deleted.addCallback(lambda _: self._join())
        self._track(deleted)

    # -- Redis away ---------------------------------------------------------------------

    def _failed(self, failure: Failure) -> None:
        if failure.check(RedisRefused):
            self.log.failure("Shared limits: Redis refused a call", failure)
        elif failure.check(RedisAway):
            self._goAlone(failure.getErrorMessage())
        else:
            self.log.failure("Shared limits: a call failed", failure)

    def _goAlone(self, why: str) -> None:
        if self.mode is Mode.ALONE or not self._renewing.running:
            if self.mode is Mode.JOINING:
                self.mode = Mode.ALONE
            self._startRejoining()
            return
        was, self.mode = self.mode, Mode.ALONE
        self._share = self.alive if was is Mode.SHARED else 1
        limiter = self._limiter
        if self._share > 1:
            fields = limiter.learned()
            fields["rate"] = repr(limiter.rate / self._share)
            fields["ceiling"] = repr(limiter.ceiling / self._share)
            fields["limit"] = str(max(1, limiter.limit // self._share))
            limiter.adopt(fields)
        self._held.clear()
        self._returned = []
        self._cancelReturn()
        self.log.warn(
            "Shared limits: Redis at {redis} is away ({why}); limiting alone at 1/{share} of the shared "
            "limits ({rate:.2f} req/s, concurrency {limit}) until it answers",
            redis=self._link.address.masked,
            why=why,
            share=self._share,
            rate=limiter.rate,
            limit=limiter.limit,
        )
        self._startRejoining()
        limiter.admission._dispatch()

    def _startRejoining(self) -> None:
        if not self._rejoining.running and self._renewing.running:
            self._rejoining.start(REJOIN_INTERVAL, now=False)

    def _rejoin(self) -> None:
        d = self._link.command("ping")
        d.addCallback(lambda _: self._join())
        # Still away: the loop asks again in a second.
        d.addErrback(self._stillAway)

    def _stillAway(self, failure: Failure) -> None:
        failure.trap(RedisAway, RedisRefused)

    # -- reporting ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """
        C{/health}'s C{shared_limits} section.
        """
        return {
            "mode": self.mode.value,
            "degraded": self.mode is not Mode.SHARED,
            "redis": self._link.address.masked,
            "instance": self.instance,
            "instances_alive": self.alive,
            "share": self._share,
            "leases_held": len(self._held),
            "slots_taken_everywhere": self.slotsTaken,
        }
