# -*- test-case-name: tests.test_service -*-
"""
What the proxy says when it starts: the Go zai-proxy's start-up lines
(build, token counting, workers, the limiter, the upstreams), plus whether
client keys are on and where the usage ledger is. A user reading the
first screen of the log learns how this process is set up; no secret is
ever in it.
"""

from __future__ import annotations

from twisted.logger import Logger

from zaiproxy import __version__
from zaiproxy.config.settings import Settings
from zaiproxy.front.clientkeys import ClientKeys
from zaiproxy.ledger.writer import LedgerWriter
from zaiproxy.limits.limiter import RateLimiter
from zaiproxy.limits.redislink import RedisAddress
from zaiproxy.usage.tokens import Counting

__all__ = ["BuildInfo", "announce"]

# The namespace the lines had when the service logged them itself.
log = Logger(namespace="zaiproxy.service.ProxyService")


class BuildInfo:
    """
    The version, commit and build time reported by C{zai_proxy_build_info}.
    """

    def __init__(
        self, version: str = __version__, commit: str = "unknown", buildTime: str = "unknown"
    ) -> None:
        self.version = version
        self.commit = commit
        self.buildTime = buildTime


def announce(
    settings: Settings,
    build: BuildInfo,
    warnings: list[str],
    counting: Counting | None,
    counterProblems: list[str],
    clientKeys: ClientKeys | None,
    limiter: RateLimiter,
    ledger: LedgerWriter | None,
    instance: str = "",
) -> None:
    """
    Log the start-up lines.
    """
    for warning in warnings:
        log.warn("{warning}", warning=warning)
    if settings.deploymentVariant != "production":
        log.info("Deployment variant: {variant}", variant=settings.deploymentVariant)
    log.info(
        "Build info: version={version}, variant={variant}, commit={commit}, build_time={buildTime}",
        version=build.version,
        variant=settings.deploymentVariant,
        commit=build.commit,
        buildTime=build.buildTime,
    )
    _counting(settings, counting, counterProblems)
    _clientKeys(settings, clientKeys)
    log.info("Max workers: {maxWorkers}", maxWorkers=settings.maxWorkers)
    _limiter(settings, limiter)
    _sharing(settings, instance)
    if ledger is None:
        log.info("Usage ledger: off (LEDGER_ENABLED=false); the dashboard shows live points only")
    elif ledger.away is not None:
        log.warn(
            "Usage ledger: {path} cannot be reached yet; rows wait and it is tried again", path=ledger.path
        )
    else:
        log.info("Usage ledger: {path} (schema version {version})", path=ledger.path, version=ledger.schema)
    log.info(
        "Forwarding Anthropic-compatible calls to {anthropic} and OpenAI-compatible calls to {openai}",
        anthropic=settings.zaiTargetURL,
        openai=settings.zaiOpenAITargetURL,
    )


def _counting(settings: Settings, counting: Counting | None, problems: list[str]) -> None:
    if counting is None:
        log.info("Token counting disabled (TOKEN_COUNTING_ENABLED=false)")
        return
    for problem in problems:
        log.warn("Warning: Failed to initialize TikToken counter: {problem}", problem=problem)
    if counting.counter.name == "fallback":
        log.warn("Falling back to SimpleTokenCounter")
        log.info("Token counting enabled (fallback mode, model: {model})", model=settings.tokenizerModel)
    else:
        log.info(
            "Token counting enabled (tiktoken {encoding} encoding, model: {model})",
            encoding=counting.counter.encoding,
            model=settings.tokenizerModel,
        )


def _clientKeys(settings: Settings, keys: ClientKeys | None) -> None:
    """
    Whether proxied routes need a client key, and how many there are
    (never the keys): the first thing to check when a user gets 401.
    """
    if keys is None:
        log.info("Client keys: off (any caller may use the proxied routes)")
        return
    sources = [
        name
        for name, value in (
            ("PROXY_API_KEYS_FILE", settings.proxyApiKeysFile),
            ("PROXY_API_KEYS", settings.proxyApiKeys),
        )
        if value
    ]
    log.info(
        "Client keys: on, {count} key{s} (from {sources})",
        count=len(keys),
        s="" if len(keys) == 1 else "s",
        sources=" and ".join(sources),
    )


def _limiter(settings: Settings, limiter: RateLimiter) -> None:
    log.info(
        "Adaptive rate limiting: initial={initial:.1f}, min={minimum:.1f}, max={maximum:.1f} req/s "
        "(ceiling alpha={alpha:.2f}, margin={margin:.1f}%, probe every {probe} windows of {window:g} s, "
        "state file={stateFile}, max age={maxAge:g} s, restored={restored})",
        initial=settings.rateLimitInitial,
        minimum=settings.rateLimitMin,
        maximum=settings.rateLimitMax,
        alpha=settings.rateLimitCeilingAlpha,
        margin=settings.rateLimitHoldMargin * 100,
        probe=settings.rateLimitProbeInterval,
        window=settings.rateLimitWindow,
        stateFile=settings.rateLimitStateFile or "off",
        maxAge=settings.rateLimitStateMaxAge,
        restored=limiter.restoredFromState,
    )


def _sharing(settings: Settings, instance: str) -> None:
    """
    Whether the limits are shared with other proxies, and as whom.
    """
    if not settings.redisURL:
        log.info(
            "Shared limits: off (REDIS_URL unset); this process paces Z.AI alone as {instance}",
            instance=instance or "-",
        )
        return
    log.info(
        "Shared limits: through {redis} as {instance} (REDIS_TIMEOUT={timeout:g} s, REDIS_LEASE={lease:g} s)",
        redis=RedisAddress.fromURL(settings.redisURL).masked,
        instance=instance or "-",
        timeout=settings.redisTimeout,
        lease=settings.redisLease,
    )
