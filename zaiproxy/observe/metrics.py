# -*- test-case-name: tests.test_metrics -*-
"""
Every Prometheus metric of the proxy, defined once, with the Go seed's
names, types, labels and buckets so existing dashboards keep working.

Unlike the seed, every label is bounded: C{path} is the route name, never
the raw path, and C{method} is one of a fixed set.
"""

from __future__ import annotations

import platform
from typing import Any

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

__all__ = ["DURATION_BUCKETS", "SIZE_BUCKETS", "Metrics", "methodLabel"]

# The seed exports no *_created series; neither do we.
prometheus_client.disable_created_metrics()

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SIZE_BUCKETS = tuple(100.0 * 10**i for i in range(8))
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
TOKEN_COUNT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1)
TOKEN_RATE_BUCKETS = (10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


def methodLabel(method: bytes) -> str:
    """
    The request method as a bounded label.
    """
    text = method.decode("ascii", "replace").upper()
    return text if text in _METHODS else "OTHER"


class Metrics:
    """
    The proxy's metrics on their own registry (one per proxy, so tests that
    start several proxies in one process do not share counters).
    """

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
        r = registry

        self.requests = Counter(
            "zai_proxy_requests",
            "Requests handled, by route and status.",
            ["method", "path", "status_code", "variant"],
            registry=r,
        )
        self.requestDuration = Histogram(
            "zai_proxy_request_duration_seconds",
            "Time from request to the end of the response.",
            ["method", "path", "status_code", "variant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.requestSize = Histogram(
            "zai_proxy_request_size_bytes",
            "Request body size.",
            ["method", "path", "variant"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.responseSize = Histogram(
            "zai_proxy_response_size_bytes",
            "Response body bytes written to the client.",
            ["method", "path", "status_code", "variant"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.timeToFirstByte = Histogram(
            "zai_proxy_time_to_first_byte_seconds",
            "Time from request to the first response body byte sent to the client.",
            ["method", "path", "variant"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.concurrentRequests = Gauge(
            "zai_proxy_concurrent_requests",
            "Proxied requests in flight.",
            ["variant"],
            registry=r,
        )
        self.upstreamErrors = Counter(
            "zai_proxy_upstream_errors",
            "Upstream failures, by kind.",
            ["error_type", "variant"],
            registry=r,
        )
        self.buildInfo = Gauge(
            "zai_proxy_build_info",
            "Build information (always 1).",
            ["version", "variant", "commit", "build_time"],
            registry=r,
        )
        self.buildInfo.labels(version, variant, commit, buildTime).set(1)
        self.inFlight = self.concurrentRequests.labels(variant)
        # labels() validates and locks on every call: keep the children of
        # the bounded label sets the hot path uses.
        self._requestChildren: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}
        self._firstByteChildren: dict[tuple[str, str], Any] = {}
        self._usageChildren: dict[str, Any] = {}
        self._rateChildren: dict[str, Any] = {}
        self._tokenChildren: dict[tuple[str, str, str], tuple[Any, Any]] = {}

        # Tokens and cost (seed section 8.2).
        tokenLabels = ["direction", "model", "variant", "pricing_tier"]
        self.tokens = Counter(
            "zai_proxy_tokens",
            "Tokens billed (as Z.AI reports them, else estimated).",
            tokenLabels,
            registry=r,
        )
        self.estimatedCost = Counter(
            "zai_proxy_estimated_cost_usd",
            "Estimated cost in USD, from the configured prices.",
            tokenLabels,
            registry=r,
        )
        self.tokenCountDuration = Histogram(
            "zai_proxy_token_count_duration_seconds",
            "Time spent counting tokens locally.",
            ["variant"],
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.tokenRate = Histogram(
            "zai_proxy_token_rate",
            "Output tokens per second of generation.",
            ["direction", "model", "variant"],
            buckets=TOKEN_RATE_BUCKETS,
            registry=r,
        )
        self.tokenCounter = Gauge(
            "zai_proxy_tokenizer_info",
            "Which local token counter is active (always 1).",
            ["counter", "encoding", "variant"],
            registry=r,
        )
        self.usageSource = Counter(
            "zai_proxy_token_usage_source",
            "Model answers by where their token numbers came from: reported by Z.AI, "
            "estimated locally, or partial (the answer was cut short).",
            ["source", "variant"],
            registry=r,
        )
        self.zaiErrors = Counter(
            "zai_proxy_zai_errors",
            "Z.AI business errors, by class and code.",
            ["class", "code", "variant"],
            registry=r,
        )

        # Admission, adaptation and retries (seed section 8.1).
        self.rateLimitRate = Gauge(
            "zai_proxy_rate_limit_requests_per_second",
            "The limiter's current rate.",
            ["variant"],
            registry=r,
        )
        self.rateLimitCeiling = Gauge(
            "zai_proxy_rate_limit_ceiling_requests_per_second",
            "The limiter's estimate of Z.AI's capacity for this key.",
            ["variant"],
            registry=r,
        )
        self.rateLimitWait = Histogram(
            "zai_proxy_rate_limit_wait_seconds",
            "Time a model call waited for admission.",
            ["variant", "client"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.rateLimitAdjustments = Counter(
            "zai_proxy_rate_limit_adjustments",
            "Limiter adjustments, by direction.",
            ["direction", "variant"],
            registry=r,
        )
        self.rateLimitRejections = Counter(
            "zai_proxy_rate_limit_rejections",
            "Calls refused by the proxy's queue (full or timed out).",
            ["variant", "client"],
            registry=r,
        )
        self.retryAttempts = Counter(
            "zai_proxy_retry_attempts",
            "Retries, by reason (and all of them under retry).",
            ["reason", "variant"],
            registry=r,
        )
        self.maxWorkers = Gauge(
            "zai_proxy_max_workers",
            "MAX_WORKERS.",
            ["variant"],
            registry=r,
        )
        self.concurrencyLimit = Gauge(
            "zai_proxy_concurrency_limit",
            "The current limit of model calls in flight (adaptive).",
            ["variant"],
            registry=r,
        )
        self.workerUtilization = Gauge(
            "zai_proxy_worker_utilization_ratio",
            "Model calls in flight over the current limit.",
            ["variant"],
            registry=r,
        )
        # The quota poller (seed section 8.2), observe only.
        quotaLabels = ["window", "limit_type", "variant"]
        self.quotaUsage = Gauge(
            "zai_proxy_quota_usage_ratio",
            "Share of a quota window used.",
            quotaLabels,
            registry=r,
        )
        self.quotaRemaining = Gauge(
            "zai_proxy_quota_remaining_ratio",
            "Share of a quota window left.",
            quotaLabels,
            registry=r,
        )
        self.quotaReset = Gauge(
            "zai_proxy_quota_reset_time_seconds",
            "When a quota window resets (Unix time).",
            quotaLabels,
            registry=r,
        )
        self.quotaSampleAge = Gauge(
            "zai_proxy_quota_sample_age_seconds",
            "Age of the last good quota sample.",
            ["variant"],
            registry=r,
        )
        self.quotaPolls = Counter(
            "zai_proxy_quota_poll",
            "Quota polls, by result.",
            ["result", "variant"],
            registry=r,
        )
        # Client keys and reloads.
        self.clientAuthFailures = Counter(
            "zai_proxy_client_auth_failures",
            "Proxied requests refused with 401: no client key (missing) or not a configured one (unknown).",
            ["reason", "variant"],
            registry=r,
        )
        self.clientKeys = Gauge(
            "zai_proxy_client_keys",
            "Client keys in force (0: the proxy is open).",
            ["variant"],
            registry=r,
        )
        self.configReloads = Counter(
            "zai_proxy_config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            ["result", "variant"],
            registry=r,
        )
        self.configReloadTime = Gauge(
            "zai_proxy_config_last_reload_timestamp_seconds",
            "When the configuration was last reloaded successfully (Unix time; 0: never).",
            ["variant"],
            registry=r,
        )
        self.queueLength = Gauge(
            "zai_proxy_rate_limit_queue_length",
            "Model calls waiting for admission.",
            ["variant"],
            registry=r,
        )

    def requestFinished(
        self,
        method: str,
        path: str,
        status: int,
        duration: float,
        requestBytes: int,
        responseBytes: int,
    ) -> None:
        """
        Record one finished request (proxied, local or refused).
        """
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
        durations.observe(duration)
        requestSizes.observe(requestBytes)
        responseSizes.observe(responseBytes)

    def clientAuthFailure(self, reason: str) -> None:
        """
        A proxied request refused for its client key (C{missing}, C{unknown}).
        """
        self.clientAuthFailures.labels(reason, self.variant).inc()

    def upstreamError(self, errorType: str) -> None:
        self.upstreamErrors.labels(errorType, self.variant).inc()

    def firstByte(self, method: str, path: str, seconds: float) -> None:
        key = (method, path)
        child = self._firstByteChildren.get(key)
        if child is None:
            child = self._firstByteChildren[key] = self.timeToFirstByte.labels(method, path, self.variant)
        child.observe(seconds)

    def zaiError(self, cls: str, code: str | None) -> None:
        from zaiproxy.limits.zai_errors import codeLabel

        self.zaiErrors.labels(cls, codeLabel(code), self.variant).inc()

    def retried(self, reason: str) -> None:
        self.retryAttempts.labels("retry", self.variant).inc()
        self.retryAttempts.labels(reason, self.variant).inc()

    def tokensUsed(self, direction: str, model: str, tier: str, tokens: int, cost: float) -> None:
        """
        Count C{tokens} (and their cost) of one direction.
        """
        key = (direction, model, tier)
        children = self._tokenChildren.get(key)
        if children is None:
            v = self.variant
            children = self._tokenChildren[key] = (
                self.tokens.labels(direction, model, v, tier),
                self.estimatedCost.labels(direction, model, v, tier),
            )
        children[0].inc(tokens)
        if cost > 0:
            children[1].inc(cost)

    def usageRecorded(self, source: str, model: str, outputRate: float | None) -> None:
        """
        One answer's usage was recorded from C{source}; C{outputRate} is
        its output tokens per second of generation, if known.
        """
        child = self._usageChildren.get(source)
        if child is None:
            child = self._usageChildren[source] = self.usageSource.labels(source, self.variant)
        child.inc()
        if outputRate is not None:
            rate = self._rateChildren.get(model)
            if rate is None:
                rate = self._rateChildren[model] = self.tokenRate.labels("output", model, self.variant)
            rate.observe(outputRate)

    def exposition(self, accept: bytes | None) -> tuple[bytes, str]:
        """
        The scrape body and its content type, negotiated like the client
        library's own HTTP handler (OpenMetrics when asked for).
        """
        encoder, contentType = exposition.choose_encoder((accept or b"").decode("latin-1"))
        return encoder(self.registry), contentType
