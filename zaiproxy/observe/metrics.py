# -*- test-case-name: tests.test_metrics -*-
"""
Every Prometheus metric of the proxy, defined once, with the Go zai-proxy's
names, types, labels and buckets so existing dashboards keep working.

Unlike the Go zai-proxy, every label is bounded: C{path} is the route name, never
the raw path, and C{method} is one of a fixed set.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any, Protocol

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from zaiproxy.dialects.zai_errors import codeLabel
from zaiproxy.observe.catalog import (
    DURATION_BUCKETS,
    METRICS,
    SIZE_BUCKETS,
    methodLabel,
)
from zaiproxy.observe.record import Billed, Record

__all__ = ["DURATION_BUCKETS", "METRICS", "SIZE_BUCKETS", "Metrics", "methodLabel"]

# The Go zai-proxy exports no *_created series; neither do we.
prometheus_client.disable_created_metrics()


class LimiterGauges(Protocol):
    """
    What the limiter shows to the gauges, read at each scrape.
    """

    @property
    def rate(self) -> float: ...
    @property
    def ceiling(self) -> float: ...
    @property
    def limit(self) -> int: ...
    @property
    def inFlight(self) -> int: ...
    @property
    def queued(self) -> int: ...


class Metrics:
    """
    The proxy's metrics on their own registry (one per proxy, so tests that
    start several proxies in one process do not share counters).

    The attributes are the metrics of L{METRICS}, by their C{attribute};
    the methods are what the reporter and the long-lived pieces (the
    limiter, the quota poller, reloads) record.
    """

    requests: Counter
    requestDuration: Histogram
    requestSize: Histogram
    responseSize: Histogram
    timeToFirstByte: Histogram
    concurrentRequests: Gauge
    upstreamErrors: Counter
    buildInfo: Gauge
    tokens: Counter
    estimatedCost: Counter
    tokenCountDuration: Histogram
    tokenRate: Histogram
    tokenCounter: Gauge
    usageSource: Counter
    zaiErrors: Counter
    rateLimitRate: Gauge
    rateLimitCeiling: Gauge
    rateLimitWait: Histogram
    rateLimitAdjustments: Counter
    rateLimitRejections: Counter
    retryAttempts: Counter
    maxWorkers: Gauge
    concurrencyLimit: Gauge
    workerUtilization: Gauge
    quotaUsage: Gauge
    quotaRemaining: Gauge
    quotaReset: Gauge
    quotaSampleAge: Gauge
    quotaPolls: Counter
    clientAuthFailures: Counter
    clientKeys: Gauge
    ledgerRows: Counter
    ledgerDropped: Counter
    ledgerQueue: Gauge
    configReloads: Counter
    configReloadTime: Gauge
    queueLength: Gauge
    instanceInfo: Gauge
    sharedLimitsUp: Gauge
    sharedInstances: Gauge

    def __init__(
        self,
        variant: str,
        version: str,
        commit: str = "unknown",
        buildTime: str = "unknown",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.variant = variant
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry, platform=platform)
            GCCollector(registry=registry)
        self.registry = registry
        for spec in METRICS:
            setattr(self, spec.attribute, spec.make(registry))
        self.buildInfo.labels(version, variant, commit, buildTime).set(1)
        self.inFlight = self.concurrentRequests.labels(variant)
        # labels() validates and locks on every call: keep the children of
        # the bounded label sets the hot path uses.
        self._requestChildren: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}
        self._firstByteChildren: dict[tuple[str, str], Any] = {}
        self._usageChildren: dict[str, Any] = {}
        self._rateChildren: dict[str, Any] = {}
        self._tokenChildren: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    # -- per request (from the reporter) -----------------------------------------

    def requestFinished(self, record: Record) -> None:
        """
        Record one finished request (proxied, local or refused).
        """
        method, path, status = record.method, record.route, record.status
        key = (method, path, status)
        children = self._requestChildren.get(key)
        if children is None:
            code, v = str(status), self.variant
            children = self._requestChildren[key] = (
                self.requests.labels(method, path, code, v),
                self.requestDuration.labels(method, path, code, v),
                self.requestSize.labels(method, path, v),
                self.responseSize.labels(method, path, code, v),
            )
        requests, durations, requestSizes, responseSizes = children
        requests.inc()
        durations.observe(record.duration)
        requestSizes.observe(record.requestBytes)
        responseSizes.observe(record.responseBytes)
        if record.ttfb is not None:
            self._firstByte(method, path, record.ttfb)

    def _firstByte(self, method: str, path: str, seconds: float) -> None:
        key = (method, path)
        child = self._firstByteChildren.get(key)
        if child is None:
            child = self._firstByteChildren[key] = self.timeToFirstByte.labels(method, path, self.variant)
        child.observe(seconds)

    def clientAuthFailure(self, reason: str) -> None:
        """
        A proxied request refused for its client key (C{missing}, C{unknown}).
        """
        self.clientAuthFailures.labels(reason, self.variant).inc()

    def upstreamError(self, errorType: str) -> None:
        self.upstreamErrors.labels(errorType, self.variant).inc()

    def zaiError(self, cls: str, code: str | None) -> None:
        self.zaiErrors.labels(cls, codeLabel(code), self.variant).inc()

    def retried(self, reason: str) -> None:
        """
        One retry, counted as the Go zai-proxy did: under C{retry} and its reason.
        """
        self.retryAttempts.labels("retry", self.variant).inc()
        self.retryAttempts.labels(reason, self.variant).inc()

    def billed(self, billed: Billed, client: str = "-") -> None:
        """
        One answer's tokens and cost, by direction and client (a client
        key's name: bounded by the key file), and where they came from.
        """
        model, tier = billed.model, billed.tier
        for direction, tokens in billed.usage.directions().items():
            if tokens > 0:
                self._tokensUsed(direction, model, tier, client, tokens, billed.costs.get(direction, 0.0))
        child = self._usageChildren.get(billed.source)
        if child is None:
            child = self._usageChildren[billed.source] = self.usageSource.labels(billed.source, self.variant)
        child.inc()
        if billed.outputRate is not None:
            rate = self._rateChildren.get(model)
            if rate is None:
                rate = self._rateChildren[model] = self.tokenRate.labels("output", model, self.variant)
            rate.observe(billed.outputRate)

    def _tokensUsed(
        self, direction: str, model: str, tier: str, client: str, tokens: int, cost: float
    ) -> None:
        key = (direction, model, tier, client)
        children = self._tokenChildren.get(key)
        if children is None:
            v = self.variant
            children = self._tokenChildren[key] = (
                self.tokens.labels(direction, model, v, tier, client),
                self.estimatedCost.labels(direction, model, v, tier, client),
            )
        children[0].inc(tokens)
        if cost > 0:
            children[1].inc(cost)

    # -- the long-lived pieces -------------------------------------------------

    def watchInFlight(self, count: Callable[[], int]) -> None:
        self.inFlight.set_function(count)

    def watchLimiter(self, limiter: LimiterGauges, maxWorkers: int) -> None:
        """
        The limiter's gauges, read from it at each scrape.
        """
        v = self.variant
        self.rateLimitRate.labels(v).set_function(lambda: limiter.rate)
        self.rateLimitCeiling.labels(v).set_function(lambda: limiter.ceiling)
        self.maxWorkers.labels(v).set(maxWorkers)
        self.concurrencyLimit.labels(v).set_function(lambda: limiter.limit)
        self.workerUtilization.labels(v).set_function(lambda: limiter.inFlight / max(1, limiter.limit))
        self.queueLength.labels(v).set_function(lambda: limiter.queued)

    def watchShared(self, shared: Any) -> None:
        """
        Shared limits' gauges (L{zaiproxy.limits.shared.SharedLimits}).
        """
        self.sharedLimitsUp.labels(self.variant).set_function(lambda: 1 if shared.shared else 0)
        self.sharedInstances.labels(self.variant).set_function(lambda: shared.alive)

    def nameInstance(self, instance: str) -> None:
        self.instanceInfo.labels(instance, self.variant).set(1)

    def rateLimitAdjustment(self, direction: str) -> None:
        self.rateLimitAdjustments.labels(direction, self.variant).inc()

    def admissionWait(self, client: str, waited: float) -> None:
        self.rateLimitWait.labels(self.variant, client).observe(waited)

    def admissionRefused(self, client: str) -> None:
        self.rateLimitRejections.labels(self.variant, client).inc()

    def tokenizer(self, counter: str, encoding: str) -> Callable[[float], None]:
        """
        Show which token counter is active; return what times its counts.
        """
        self.tokenCounter.labels(counter, encoding, self.variant).set(1)
        observe: Callable[[float], None] = self.tokenCountDuration.labels(self.variant).observe
        return observe

    def ledgerWritten(self, rows: int) -> None:
        self.ledgerRows.labels(self.variant).inc(rows)

    def ledgerLost(self, rows: int, reason: str) -> None:
        self.ledgerDropped.labels(reason, self.variant).inc(rows)

    def watchLedger(self, queued: Callable[[], int]) -> None:
        self.ledgerQueue.labels(self.variant).set_function(queued)
        for reason in ("queue_full", "write_error"):
            self.ledgerDropped.labels(reason, self.variant)

    def watchClientKeys(self, count: Callable[[], int]) -> None:
        self.clientKeys.labels(self.variant).set_function(count)
        self.configReloadTime.labels(self.variant).set(0)

    def reloaded(self, result: str, at: float | None = None) -> None:
        """
        A reload ended with C{result}; C{at} is when, if it succeeded.
        """
        self.configReloads.labels(result, self.variant).inc()
        if at is not None:
            self.configReloadTime.labels(self.variant).set(at)

    def exposition(self, accept: bytes | None) -> tuple[bytes, str]:
        """
        The scrape body and its content type, negotiated like the client
        library's own HTTP handler (OpenMetrics when asked for).
        """
        encoder, contentType = exposition.choose_encoder((accept or b"").decode("latin-1"))
        return encoder(self.registry), contentType
