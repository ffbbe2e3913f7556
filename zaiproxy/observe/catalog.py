# -*- test-case-name: tests.test_metrics -*-
"""
The catalogue of the proxy's Prometheus metrics: each one's attribute,
type, name, labels, help and buckets, with the Go zai-proxy's names and
buckets so existing dashboards keep working. L{zaiproxy.observe.metrics}
makes them and feeds them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DURATION_BUCKETS", "METRICS", "SIZE_BUCKETS", "methodLabel"]

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


class _Spec(NamedTuple):
    """
    One metric: the attribute that holds it, its type, the Go zai-proxy's
    name, labels and buckets, and its help text.
    """

    attribute: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None = None

    def make(self, registry: CollectorRegistry) -> Any:
        if self.buckets is None:
            return self.kind(self.name, self.help, self.labels, registry=registry)
        return Histogram(self.name, self.help, self.labels, buckets=self.buckets, registry=registry)


#: Every metric the proxy exports. Requests and bytes, then tokens and cost
#: (the Go zai-proxy's section 8.2), admission and retries (8.1), the quota
#: poller, client keys and reloads.
METRICS = (
    _Spec(
        "requests",
        Counter,
        "zai_proxy_requests",
        ("method", "path", "status_code", "variant"),
        "Requests handled, by route and status.",
    ),
    _Spec(
        "requestDuration",
        Histogram,
        "zai_proxy_request_duration_seconds",
        ("method", "path", "status_code", "variant"),
        "Time from request to the end of the response.",
        DURATION_BUCKETS,
    ),
    _Spec(
        "requestSize",
        Histogram,
        "zai_proxy_request_size_bytes",
        ("method", "path", "variant"),
        "Request body size.",
        SIZE_BUCKETS,
    ),
    _Spec(
        "responseSize",
        Histogram,
        "zai_proxy_response_size_bytes",
        ("method", "path", "status_code", "variant"),
        "Response body bytes written to the client.",
        SIZE_BUCKETS,
    ),
    _Spec(
        "timeToFirstByte",
        Histogram,
        "zai_proxy_time_to_first_byte_seconds",
        ("method", "path", "variant"),
        "Time from request to the first response body byte sent to the client.",
        TTFB_BUCKETS,
    ),
    _Spec(
        "concurrentRequests",
        Gauge,
        "zai_proxy_concurrent_requests",
        ("variant",),
        "Proxied requests in flight.",
    ),
    _Spec(
        "upstreamErrors",
        Counter,
        "zai_proxy_upstream_errors",
        ("error_type", "variant"),
        "Upstream failures, by kind.",
    ),
    _Spec(
        "buildInfo",
        Gauge,
        "zai_proxy_build_info",
        ("version", "variant", "commit", "build_time"),
        "Build information (always 1).",
    ),
    _Spec(
        "tokens",
        Counter,
        "zai_proxy_tokens",
        ("direction", "model", "variant", "pricing_tier", "client"),
        "Tokens billed (as Z.AI reports them, else estimated); client is the client key's name, or -.",
    ),
    _Spec(
        "estimatedCost",
        Counter,
        "zai_proxy_estimated_cost_usd",
        ("direction", "model", "variant", "pricing_tier", "client"),
        "Estimated cost in USD, from the configured prices; client is the client key's name, or -.",
    ),
    _Spec(
        "tokenCountDuration",
        Histogram,
        "zai_proxy_token_count_duration_seconds",
        ("variant",),
        "Time spent counting tokens locally.",
        TOKEN_COUNT_BUCKETS,
    ),
    _Spec(
        "tokenRate",
        Histogram,
        "zai_proxy_token_rate",
        ("direction", "model", "variant"),
        "Output tokens per second of generation.",
        TOKEN_RATE_BUCKETS,
    ),
    _Spec(
        "tokenCounter",
        Gauge,
        "zai_proxy_tokenizer_info",
        ("counter", "encoding", "variant"),
        "Which local token counter is active (always 1).",
    ),
    _Spec(
        "usageSource",
        Counter,
        "zai_proxy_token_usage_source",
        ("source", "variant"),
        "Model answers by where their token numbers came from: reported by Z.AI, "
        "estimated locally, or partial (the answer was cut short).",
    ),
    _Spec(
        "zaiErrors",
        Counter,
        "zai_proxy_zai_errors",
        ("class", "code", "variant"),
        "Z.AI business errors, by class and code.",
    ),
    _Spec(
        "rateLimitRate",
        Gauge,
        "zai_proxy_rate_limit_requests_per_second",
        ("variant",),
        "The limiter's current rate.",
    ),
    _Spec(
        "rateLimitCeiling",
        Gauge,
        "zai_proxy_rate_limit_ceiling_requests_per_second",
        ("variant",),
        "The limiter's estimate of Z.AI's capacity for this key.",
    ),
    _Spec(
        "rateLimitWait",
        Histogram,
        "zai_proxy_rate_limit_wait_seconds",
        ("variant", "client"),
        "Time a model call waited for admission.",
        WAIT_BUCKETS,
    ),
    _Spec(
        "rateLimitAdjustments",
        Counter,
        "zai_proxy_rate_limit_adjustments",
        ("direction", "variant"),
        "Limiter adjustments, by direction.",
    ),
    _Spec(
        "rateLimitRejections",
        Counter,
        "zai_proxy_rate_limit_rejections",
        ("variant", "client"),
        "Calls refused by the proxy's queue (full or timed out).",
    ),
    _Spec(
        "retryAttempts",
        Counter,
        "zai_proxy_retry_attempts",
        ("reason", "variant"),
        "Retries, by reason (and all of them under retry).",
    ),
    _Spec("maxWorkers", Gauge, "zai_proxy_max_workers", ("variant",), "MAX_WORKERS."),
    _Spec(
        "concurrencyLimit",
        Gauge,
        "zai_proxy_concurrency_limit",
        ("variant",),
        "The current limit of model calls in flight (adaptive).",
    ),
    _Spec(
        "workerUtilization",
        Gauge,
        "zai_proxy_worker_utilization_ratio",
        ("variant",),
        "Model calls in flight over the current limit.",
    ),
    _Spec(
        "quotaUsage",
        Gauge,
        "zai_proxy_quota_usage_ratio",
        ("window", "limit_type", "variant"),
        "Share of a quota window used.",
    ),
    _Spec(
        "quotaRemaining",
        Gauge,
        "zai_proxy_quota_remaining_ratio",
        ("window", "limit_type", "variant"),
        "Share of a quota window left.",
    ),
    _Spec(
        "quotaReset",
        Gauge,
        "zai_proxy_quota_reset_time_seconds",
        ("window", "limit_type", "variant"),
        "When a quota window resets (Unix time).",
    ),
    _Spec(
        "quotaSampleAge",
        Gauge,
        "zai_proxy_quota_sample_age_seconds",
        ("variant",),
        "Age of the last good quota sample.",
    ),
    _Spec("quotaPolls", Counter, "zai_proxy_quota_poll", ("result", "variant"), "Quota polls, by result."),
    _Spec(
        "clientAuthFailures",
        Counter,
        "zai_proxy_client_auth_failures",
        ("reason", "variant"),
        "Proxied requests refused with 401: no client key (missing) or not a configured one (unknown).",
    ),
    _Spec(
        "clientKeys",
        Gauge,
        "zai_proxy_client_keys",
        ("variant",),
        "Client keys in force (0: the proxy is open).",
    ),
    _Spec(
        "ledgerRows",
        Counter,
        "zai_proxy_ledger_rows_written",
        ("variant",),
        "Request rows committed to the usage ledger.",
    ),
    _Spec(
        "ledgerDropped",
        Counter,
        "zai_proxy_ledger_dropped",
        ("reason", "variant"),
        "Request rows the ledger lost: its queue was full (queue_full) or a write failed (write_error).",
    ),
    _Spec(
        "ledgerQueue",
        Gauge,
        "zai_proxy_ledger_queue_rows",
        ("variant",),
        "Rows waiting for the ledger's writer.",
    ),
    _Spec(
        "configReloads",
        Counter,
        "zai_proxy_config_reloads",
        ("result", "variant"),
        "Configuration reloads (SIGHUP), by result.",
    ),
    _Spec(
        "configReloadTime",
        Gauge,
        "zai_proxy_config_last_reload_timestamp_seconds",
        ("variant",),
        "When the configuration was last reloaded successfully (Unix time; 0: never).",
    ),
    _Spec(
        "queueLength",
        Gauge,
        "zai_proxy_rate_limit_queue_length",
        ("variant",),
        "Model calls waiting for admission.",
    ),
    _Spec(
        "instanceInfo",
        Gauge,
        "zai_proxy_instance_info",
        ("instance", "variant"),
        "Always 1; names this process (INSTANCE_NAME), to tell proxies and workers apart.",
    ),
    _Spec(
        "sharedLimitsUp",
        Gauge,
        "zai_proxy_shared_limits_up",
        ("variant",),
        "1 while the limits are shared through Redis (REDIS_URL); 0 while this proxy limits alone.",
    ),
    _Spec(
        "sharedInstances",
        Gauge,
        "zai_proxy_shared_instances",
        ("variant",),
        "Proxies sharing the limits, seen in the last three rate-limit windows.",
    ),
)
