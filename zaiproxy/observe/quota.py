# -*- test-case-name: tests.test_quota -*-
"""
Watching the key's quota: Z.AI's (undocumented) monitor endpoint, polled
in the background.

Observe only: the poller never delays or refuses a request. It keeps the
last good sample through failures, says when that sample has gone stale,
and feeds C{/health} and the C{zai_proxy_quota_*} gauges. The key it sends
is never logged, nor the provider's message text (which may name the
account).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

import attrs
import treq
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["QUOTA_PATH", "QuotaError", "QuotaPoller", "QuotaSample", "QuotaWindow", "parseQuota"]

QUOTA_PATH = "/api/monitor/usage/quota/limit"

#: The endpoint's window units (the Go zai-proxy's own parsing).
_WINDOWS = {3: "five_hour", 6: "weekly"}
_ORDER = ("five_hour", "weekly")


class QuotaError(Exception):
    """
    A poll that failed: C{outcome} is C{error} or C{malformed}.
    """

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


@attrs.frozen
class QuotaWindow:
    """
    One quota window: how much of it is used, and when it resets.
    """

    window: str
    limitType: str
    usedFraction: float
    resetAt: float | None


@attrs.frozen
class QuotaSample:
    """
    One good answer of the quota endpoint.
    """

    planTier: str | None
    windows: tuple[QuotaWindow, ...]
    takenAt: float


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def parseQuota(body: bytes, now: float) -> QuotaSample:
    """
    Read the quota document, normalised as the Go zai-proxy did: CREDIT_LIMIT used
    over allowance (else the percentage), TOKENS_LIMIT from its percentage,
    fractions clamped to [0, 1], the first of duplicate windows kept, other
    types and units ignored.

    @raise QuotaError: C{error} for a provider rejection, C{malformed} for
        anything that is not the expected document.
    """
    try:
        document = json.loads(body)
    except ValueError:
        raise QuotaError("malformed", "the quota answer is not JSON") from None
    if not isinstance(document, dict):
        raise QuotaError("malformed", "the quota answer is not an object")
    success = document.get("success")
    code = document.get("code")
    if success is False or (success is None and code not in (0, 200, None)):
        raise QuotaError("error", f"quota poll rejected: provider code {code}")
    data = document.get("data")
    limits = data.get("limits") if isinstance(data, dict) else None
    if not isinstance(limits, list):
        raise QuotaError("malformed", "quota response is missing its data.limits array")
    found: dict[str, QuotaWindow] = {}
    for entry in limits:
        if not isinstance(entry, dict):
            continue
        window = _WINDOWS.get(entry.get("unit"))  # type: ignore[arg-type]
        kind = entry.get("type")
        if window is None or window in found or kind not in ("CREDIT_LIMIT", "TOKENS_LIMIT"):
            continue
        percentage = _number(entry.get("percentage"))
        fraction: float | None = None
        if kind == "CREDIT_LIMIT":
            allowance, used = _number(entry.get("usage")), _number(entry.get("currentValue"))
            if allowance and allowance > 0 and used is not None:
                fraction = used / allowance
        if fraction is None and percentage is not None:
            fraction = percentage / 100.0
        if fraction is None:
            continue
        reset = _number(entry.get("nextResetTime"))
        found[window] = QuotaWindow(
            window=window,
            limitType=kind,
            usedFraction=min(1.0, max(0.0, fraction)),
            resetAt=reset / 1000.0 if reset else None,
        )
    level = data.get("level") if isinstance(data, dict) else None
    return QuotaSample(
        planTier=level if isinstance(level, str) else None,
        windows=tuple(found[w] for w in _ORDER if w in found),
        takenAt=now,
    )


def _rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _label(text: str) -> str:
    """
    The Go zai-proxy's sanitised label value: lower case, [a-z0-9_-], 32 at most.
    """
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in text.lower())[:32]
    return cleaned or "unknown"


class QuotaPoller:
    """
    Polls the quota endpoint every C{interval} seconds (the first poll at
    once), through the proxy's treq client.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client: Any,
        baseURL: str,
        apiKey: str,
        interval: float,
        timeout: float,
        staleAfter: float,
        maxBytes: int,
        metrics: Any,
    ) -> None:
        self._clock = clock
        self._client = client
        self._url = baseURL.rstrip("/") + QUOTA_PATH
        self._baseURL = baseURL
        self._key = apiKey
        self.interval = interval
        self._timeout = timeout
        self.staleAfter = staleAfter
        self._maxBytes = maxBytes
        self._metrics = metrics
        self.sample: QuotaSample | None = None
        self.lastOutcome: str | None = None
        self._wasStale = False
        self._loop: LoopingCall | None = None
        self._polling: Deferred[None] | None = None
        variant = metrics.variant
        metrics.quotaSampleAge.labels(variant).set_function(self._sampleAge)

    def _sampleAge(self) -> float:
        if self.sample is None:
            return math.nan
        return self._clock.seconds() - self.sample.takenAt

    @property
    def fresh(self) -> bool:
        return self.sample is not None and self._sampleAge() <= self.staleAfter

    def start(self) -> None:
        self.log.info(
            "Quota polling enabled (observe-only): interval={interval:g}s, timeout={timeout:g}s, "
            "stale_after={stale:g}s, base_url={base}",
            interval=self.interval,
            timeout=self._timeout,
            stale=self.staleAfter,
            base=self._baseURL,
        )
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._polling is not None:
            self._polling.cancel()

    def poll(self) -> Deferred[None]:
        """
        One poll; it never fails (a LoopingCall that fails stops for good).
        """
        self._polling = self._poll()
        return self._polling.addErrback(
            lambda f: self.log.failure("quota poll failed unexpectedly", failure=f)
        )

    @inlineCallbacks
    def _poll(self) -> Any:
        try:
            body = yield self._fetch().addTimeout(self._timeout, self._clock)
            sample = parseQuota(body, self._clock.seconds())
        except QuotaError as e:
            self._failed(e.outcome, str(e))
            return
        except Exception as e:
            self._failed("error", f"quota poll failed: {type(e).__name__}")
            return
        self.sample = sample
        self._wasStale = False
        self._record("success")
        self._publish(sample)
        self.log.info("quota poll ok: windows={n}", n=len(sample.windows))

    @inlineCallbacks
    def _fetch(self) -> Any:
        response = yield self._client.get(
            self._url,
            headers={
                "Authorization": [self._key],
                "Accept": ["application/json"],
                "Accept-Language": ["en-US,en;q=0.9"],
            },
            allow_redirects=False,
            unbuffered=True,
        )
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > self._maxBytes:
                raise QuotaError("error", f"the quota answer is larger than {self._maxBytes} bytes")
            chunks.append(data)

        yield treq.collect(response, collect)
        if response.code != 200:
            raise QuotaError("error", f"quota poll failed: unexpected status {response.code}")
        return b"".join(chunks)

    def _failed(self, outcome: str, reason: str) -> None:
        self._record(outcome)
        self.log.warn("{reason}", reason=reason)
        if not self.fresh and not self._wasStale:
            # Counted once per transition into staleness; a poller that
            # never succeeded is stale from its first poll.
            self._wasStale = True
            self._metrics.quotaPolls.labels("stale", self._metrics.variant).inc()

    def _record(self, outcome: str) -> None:
        self.lastOutcome = outcome
        self._metrics.quotaPolls.labels(outcome, self._metrics.variant).inc()

    def _publish(self, sample: QuotaSample) -> None:
        metrics = self._metrics
        variant = _label(metrics.variant)
        for window in sample.windows:
            labels = (window.window, _label(window.limitType), variant)
            metrics.quotaUsage.labels(*labels).set(window.usedFraction)
            metrics.quotaRemaining.labels(*labels).set(1.0 - window.usedFraction)
            if window.resetAt is not None:
                metrics.quotaReset.labels(*labels).set(window.resetAt)

    def snapshot(self) -> dict[str, Any]:
        """
        The Go zai-proxy's /health "quota" section.
        """
        section: dict[str, Any] = {
            "enabled": True,
            "fresh": self.fresh,
            "interval": self.interval,
            "stale_after": self.staleAfter,
        }
        if self.lastOutcome is not None:
            section["last_outcome"] = (
                self.lastOutcome if self.fresh or self.lastOutcome != "success" else "stale"
            )
        sample = self.sample
        if sample is not None:
            section["last_success_at"] = _rfc3339(sample.takenAt)
            section["sample_age_seconds"] = round(self._sampleAge(), 3)
            if sample.planTier:
                section["plan_tier"] = sample.planTier
            section["windows"] = [
                {
                    "window": w.window,
                    "limit_type": w.limitType,
                    "used_fraction": round(w.usedFraction, 6),
                    **({"reset_at": _rfc3339(w.resetAt)} if w.resetAt is not None else {}),
                }
                for w in sample.windows
            ]
        return section
