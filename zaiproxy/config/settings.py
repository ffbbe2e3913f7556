# -*- test-case-name: tests.test_settings -*-
"""
The proxy's settings: one frozen object built from the environment and an
optional EnvironmentFile, checked once at start-up.

The variable names and defaults are the Go zai-proxy's, so its users can switch
without rewriting their deployment. Unlike the Go zai-proxy, a value that does not
parse is an error naming the variable, the value and what is accepted,
never a silent fallback to the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.logger import LogLevel

from zaiproxy.config.envfile import EnvironmentFileError, readEnvironmentFile
from zaiproxy.config.parsers import (
    parseBool,
    parseByteSize,
    parseChoice,
    parseDuration,
    parseFraction,
    parseGrace,
    parseHours,
    parseLedgerURL,
    parseLogLevel,
    parseNames,
    parseNonNegativeInt,
    parseOptionalPath,
    parsePositiveFloat,
    parsePositiveInt,
    parsePrices,
    parseRedisURL,
    parseSecret,
    parseText,
    parseURL,
    parseUTCOffset,
)
from zaiproxy.front.clientkeys import ClientKey, parseInlineKeys

__all__ = [
    "SettingSpec",
    "Settings",
    "SettingsError",
    "loadSettings",
    "settingSpecs",
    "stateDirectory",
]


class SettingsError(ValueError):
    """
    A setting is missing or invalid; C{str()} is the one line to show.
    """


# ---------------------------------------------------------------------------
# The schema.


@attrs.frozen
class SettingSpec:
    """
    How one environment variable becomes one attribute of L{Settings}.

    @ivar default: the default as it would be written in the environment;
        L{None} when the variable is required.
    """

    env: str
    attribute: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    secret: bool = False


_SPECS: list[SettingSpec] = []


def _setting(
    env: str,
    parse: Callable[[str], Any],
    default: str | None,
    help: str,
    secret: bool = False,
) -> Any:
    """
    Declare an attribute of L{Settings} and the variable it comes from.
    """
    metadata = {"env": env, "parse": parse, "default": default, "help": help, "secret": secret}
    if default is None:
        return attrs.field(metadata=metadata, repr=not secret)
    return attrs.field(default=parse(default), metadata=metadata, repr=not secret)


@attrs.frozen(kw_only=True)
class Settings:
    """
    Every setting of the proxy, validated; build it with L{loadSettings}.
    """

    zaiApiKey: str = _setting(
        "ZAI_API_KEY",
        parseSecret,
        None,
        "Upstream Z.AI key, injected into every forwarded request. Required; never logged.",
        secret=True,
    )
    zaiTargetURL: str = _setting(
        "ZAI_TARGET_URL",
        parseURL,
        "https://api.z.ai/api/anthropic",
        "Anthropic-compatible upstream base; /v1/... paths are appended to it.",
    )
    zaiOpenAITargetURL: str = _setting(
        "ZAI_OPENAI_TARGET_URL",
        parseURL,
        "https://api.z.ai/api/coding/paas/v4",
        "OpenAI-compatible upstream base; /chat/completions is appended to it.",
    )
    deploymentVariant: str = _setting(
        "DEPLOYMENT_VARIANT",
        parseText,
        "production",
        "Value of the variant label on every metric (canary deployments).",
    )
    tokenCountingEnabled: bool = _setting(
        "TOKEN_COUNTING_ENABLED",
        parseBool,
        "true",
        "Count tokens with tiktoken where the upstream does not report usage.",
    )
    tokenizerModel: str = _setting(
        "TOKENIZER_MODEL",
        parseText,
        "glm-4",
        "Model label used when a request names no model.",
    )
    modelLabels: tuple[str, ...] = _setting(
        "MODEL_LABELS",
        parseNames,
        "",
        "Extra model names kept as their own metric label (known GLM ids always are); others count as other.",
    )
    tokenPrices: tuple[tuple[str, tuple[float, float, float, float]], ...] = _setting(
        "TOKEN_PRICES",
        parsePrices,
        "*=0.60/2.20/0.11/0",
        "Prices for the estimated-cost metric: model=input/output/cache_read/cache_write in USD per million "
        "tokens; * is any other model.",
    )
    peakHours: tuple[float, float] = _setting(
        "PEAK_HOURS",
        parseHours,
        "02:00-06:00",
        "Daily window of peak pricing (pricing_tier=peak), or off.",
    )
    peakUTCOffset: float = _setting(
        "PEAK_UTC_OFFSET",
        parseUTCOffset,
        "-5",
        "Time zone of PEAK_HOURS, in hours from UTC (the Go zai-proxy's fixed UTC-5).",
    )
    peakMultiplier: float = _setting(
        "PEAK_MULTIPLIER",
        parsePositiveFloat,
        "2",
        "Price multiplier during peak hours.",
    )
    tiktokenCacheDir: str = _setting(
        "TIKTOKEN_CACHE_DIR",
        parseText,
        "",
        "A directory holding tiktoken's cached cl100k_base file, used before the bundled copy.",
    )
    maxWorkers: int = _setting(
        "MAX_WORKERS",
        parsePositiveInt,
        "10",
        "Upstream calls in flight at once.",
    )
    maxRetries: int = _setting(
        "MAX_RETRIES",
        parseNonNegativeInt,
        "3",
        "Retries before the first byte reaches the client (total attempts = 1 + this).",
    )
    rateLimitInitial: float = _setting(
        "RATE_LIMIT_INITIAL",
        parsePositiveFloat,
        "10.0",
        "Starting request rate (requests/s).",
    )
    rateLimitMin: float = _setting(
        "RATE_LIMIT_MIN",
        parsePositiveFloat,
        "1.0",
        "Lowest request rate the limiter will go to (requests/s).",
    )
    rateLimitMax: float = _setting(
        "RATE_LIMIT_MAX",
        parsePositiveFloat,
        "50.0",
        "Highest request rate, and the first ceiling estimate (requests/s).",
    )
    rateLimitStateFile: str | None = _setting(
        "RATE_LIMIT_STATE_FILE",
        parseOptionalPath,
        "",
        "Where the learned rate ceiling is kept across restarts (empty: ceiling.json in the"
        " state folder); off disables it.",
    )
    rateLimitWindow: float = _setting(
        "RATE_LIMIT_WINDOW",
        parseDuration,
        "30s",
        "How often the limiter judges the last window's outcomes and adjusts.",
    )
    rateLimitCeilingAlpha: float = _setting(
        "RATE_LIMIT_CEILING_ALPHA",
        parseFraction(0.0, 1.0, closedHigh=True),
        "0.3",
        "Weight of a new capacity observation in the ceiling estimate (EWMA).",
    )
    rateLimitHoldMargin: float = _setting(
        "RATE_LIMIT_HOLD_MARGIN",
        parseFraction(0.0, 1.0, closedHigh=False),
        "0.02",
        "Hold this fraction below the ceiling; probes start this fraction above it.",
    )
    rateLimitProbeInterval: int = _setting(
        "RATE_LIMIT_PROBE_INTERVAL",
        parsePositiveInt,
        "10",
        "Clean windows at the ceiling before probing above it.",
    )
    rateLimitStateMaxAge: float = _setting(
        "RATE_LIMIT_STATE_MAX_AGE",
        parseDuration,
        "6h",
        "A persisted ceiling older than this is ignored at start-up.",
    )
    maxQueue: int = _setting(
        "MAX_QUEUE",
        parseNonNegativeInt,
        "256",
        "Model calls that may wait for admission; beyond it they get 429 at once.",
    )
    queueTimeout: float = _setting(
        "QUEUE_TIMEOUT",
        parseDuration,
        "120s",
        "Longest wait for admission before a 429 with Retry-After.",
    )
    quotaHold: bool = _setting(
        "QUOTA_HOLD",
        parseBool,
        "true",
        "After a quota 429 (1308, 1310) answer 429 locally until the stated reset, without calling Z.AI.",
    )
    quotaPollEnabled: bool = _setting(
        "QUOTA_POLL_ENABLED",
        parseBool,
        "false",
        "Poll Z.AI's quota endpoint (observe only: it never blocks a request).",
    )
    quotaPollInterval: float = _setting(
        "QUOTA_POLL_INTERVAL",
        parseDuration,
        "1m",
        "How often the quota poller asks.",
    )
    quotaPollTimeout: float = _setting(
        "QUOTA_POLL_TIMEOUT",
        parseDuration,
        "5s",
        "Time budget of one quota poll.",
    )
    quotaStaleAfter: float = _setting(
        "QUOTA_STALE_AFTER",
        parseDuration,
        "15m",
        "A quota sample older than this is reported stale.",
    )
    zaiQuotaBaseURL: str = _setting(
        "ZAI_QUOTA_BASE_URL",
        parseURL,
        "https://api.z.ai",
        "Origin of the quota endpoint (/api/monitor/usage/quota/limit).",
    )
    quotaMaxResponseBytes: int = _setting(
        "QUOTA_MAX_RESPONSE_BYTES",
        parseByteSize,
        "64KiB",
        "Largest quota response read.",
    )
    proxyApiKeysFile: str = _setting(
        "PROXY_API_KEYS_FILE",
        parseText,
        "",
        "File of client keys, one name:key (or name:sha256:<hex>) per line; when keys are set, proxied "
        "routes need one. Re-read on SIGHUP.",
    )
    proxyApiKeys: tuple[ClientKey, ...] = _setting(
        "PROXY_API_KEYS",
        parseInlineKeys,
        "",
        "Client keys as a comma-separated name:key list, in addition to the file. Never logged.",
        secret=True,
    )
    adminToken: str = _setting(
        "ADMIN_TOKEN",
        parseSecret,
        "",
        "When set, /metrics, /admin/*, /api/* and /dashboard require Authorization: Bearer <token>"
        " (the dashboard: a login), from loopback too; unset, /metrics is open and the rest answers"
        " loopback only.",
        secret=True,
    )
    # _setting returns an attrs field, not a shared value; ruff cannot tell that LogLevel is immutable.
    logLevel: LogLevel = _setting(  # noqa: RUF009
        "LOG_LEVEL",
        parseLogLevel,
        "info",
        "Lowest level logged: debug, info, warn, error or critical.",
    )
    logFormat: str = _setting(
        "LOG_FORMAT",
        parseChoice("text", "json"),
        "text",
        "text, or json for one JSON object per line.",
    )
    maxRequestBytes: int = _setting(
        "MAX_REQUEST_BYTES",
        parseByteSize,
        "32MiB",
        "Largest request body accepted; larger ones get 413 before they are read.",
    )
    upstreamConnectTimeout: float = _setting(
        "UPSTREAM_CONNECT_TIMEOUT",
        parseDuration,
        "10s",
        "Time to open a connection to the upstream.",
    )
    upstreamFirstByteTimeout: float = _setting(
        "UPSTREAM_FIRST_BYTE_TIMEOUT",
        parseDuration,
        "300s",
        "Time from sending a request to the upstream's response headers (thinking models are slow).",
    )
    upstreamIdleTimeout: float = _setting(
        "UPSTREAM_IDLE_TIMEOUT",
        parseDuration,
        "120s",
        "Longest silence between two chunks of a response before the stream is ended.",
    )
    upstreamPoolSize: int = _setting(
        "UPSTREAM_POOL_SIZE",
        parsePositiveInt,
        "32",
        "Idle upstream connections kept open for reuse, per upstream host.",
    )
    clientHeaderTimeout: float = _setting(
        "CLIENT_HEADER_TIMEOUT",
        parseDuration,
        "30s",
        "Time a client has to send its request line and headers.",
    )
    clientIdleTimeout: float = _setting(
        "CLIENT_IDLE_TIMEOUT",
        parseDuration,
        "75s",
        "Idle time after which a client's keep-alive connection is closed.",
    )
    drainGrace: float = _setting(
        "DRAIN_GRACE",
        parseGrace,
        "5s",
        "On SIGTERM, how long to keep serving with /readyz answering 503 before the listeners close,"
        " so load balancers see the drain (0: close at once).",
    )
    drainTimeout: float = _setting(
        "DRAIN_TIMEOUT",
        parseDuration,
        "30s",
        "On SIGTERM, how long in-flight requests may take to finish.",
    )
    instanceName: str = _setting(
        "INSTANCE_NAME",
        parseText,
        "",
        "This process's name in logs, /health, metrics, the ledger and the dashboard (empty: host:port,"
        " the host name and the port it listens on).",
    )
    redisURL: str = _setting(
        "REDIS_URL",
        parseRedisURL,
        "",
        "Share the rate limit, the concurrency slots and the quota hold with every proxy using this Redis:"
        " redis://[:password@]host[:port][/db] (empty: this process limits alone).",
        secret=True,
    )
    redisTimeout: float = _setting(
        "REDIS_TIMEOUT",
        parseDuration,
        "250ms",
        "How long any Redis call may take; past it this proxy limits alone at its share of the ceiling"
        " until Redis answers again.",
    )
    redisLease: float = _setting(
        "REDIS_LEASE",
        parseDuration,
        "15s",
        "How long a concurrency slot taken through Redis outlives its proxy: the slots of a proxy that"
        " died come back after this (live proxies renew theirs).",
    )
    ledgerEnabled: bool = _setting(
        "LEDGER_ENABLED",
        parseBool,
        "true",
        "Keep the usage ledger: one row per request, read by /api/usage and the dashboard.",
    )
    ledgerURL: str = _setting(
        "LEDGER_URL",
        parseLedgerURL,
        "",
        "Where the ledger is kept: sqlite:///path/to/file, or postgresql://user:password@host/database"
        " to share one ledger between proxies (empty: sqlite:///<state folder>/ledger.sqlite3).",
    )
    ledgerRequestsRetention: float = _setting(
        "LEDGER_REQUESTS_RETENTION",
        parseDuration,
        "30d",
        "How long the ledger keeps each request's own row (/api/requests; exact short-range sums).",
    )
    ledgerMinutesRetention: float = _setting(
        "LEDGER_MINUTES_RETENTION",
        parseDuration,
        "8d",
        "How long the per-minute rollups are kept; spans over 3 days read the hourly ones.",
    )
    ledgerHoursRetention: float = _setting(
        "LEDGER_HOURS_RETENTION",
        parseDuration,
        "400d",
        "How long the per-hour rollups (and the dashboard's gauge samples) are kept (usage over months).",
    )
    ledgerQueueSize: int = _setting(
        "LEDGER_QUEUE_SIZE",
        parsePositiveInt,
        "10000",
        "Rows waiting for the ledger's writer; past this a row is dropped and counted"
        " (zai_proxy_ledger_dropped_total), never waited for.",
    )
    dashboardInterval: float = _setting(
        "DASHBOARD_INTERVAL",
        parseDuration,
        "5s",
        "How often the dashboard's live view gets a new point (/api/events).",
    )

    def __attrs_post_init__(self) -> None:
        if not self.rateLimitMin <= self.rateLimitMax:
            raise SettingsError(
                f"RATE_LIMIT_MIN={self.rateLimitMin:g} must not exceed RATE_LIMIT_MAX={self.rateLimitMax:g}"
            )
        if not self.rateLimitMin <= self.rateLimitInitial <= self.rateLimitMax:
            raise SettingsError(
                f"RATE_LIMIT_INITIAL={self.rateLimitInitial:g} must lie between "
                f"RATE_LIMIT_MIN={self.rateLimitMin:g} and "
                f"RATE_LIMIT_MAX={self.rateLimitMax:g}"
            )


def settingSpecs() -> list[SettingSpec]:
    """
    Every setting in declaration order, for help texts and documentation.
    """
    return [
        SettingSpec(
            env=f.metadata["env"],
            attribute=f.name,
            parse=f.metadata["parse"],
            default=f.metadata["default"],
            help=f.metadata["help"],
            secret=f.metadata["secret"],
        )
        for f in attrs.fields(Settings)
    ]


def loadSettings(environ: Mapping[str, str], configPath: str | None = None) -> tuple[Settings, list[str]]:
    """
    Build L{Settings} from a config file overlaid by the environment.

    An empty value counts as unset (as in the Go zai-proxy), so C{KEY=} in a file
    means "the default".

    @return: the settings, and warnings to log once logging is up (such as
        unknown variables in the config file, which are usually typos).
    @raise SettingsError: with one line naming the variable and what is
        accepted; a secret's value is never quoted.
    """
    merged: dict[str, str] = {}
    warnings: list[str] = []
    specs = settingSpecs()
    known = {spec.env for spec in specs}
    if configPath is not None:
        try:
            fileValues = readEnvironmentFile(configPath)
        except EnvironmentFileError as e:
            raise SettingsError(str(e)) from None
        for name in fileValues:
            if name not in known:
                warnings.append(f"config file {configPath} sets {name}, which zaiproxy does not use")
        merged.update(fileValues)
    merged.update({k: v for k, v in environ.items() if k in known})

    values: dict[str, Any] = {}
    for spec in specs:
        raw = merged.get(spec.env, "")
        if raw.strip() == "":
            if spec.default is None:
                raise SettingsError(f"{spec.env} is required but not set")
            continue
        try:
            values[spec.attribute] = spec.parse(raw)
        except ValueError as e:
            shown = "(hidden)" if spec.secret else repr(raw)
            raise SettingsError(f"{spec.env}={shown} is not valid: {e}") from None
    settings = Settings(**values)
    if settings.rateLimitStateFile == "":
        path = os.path.join(stateDirectory(environ), "ceiling.json")
        settings = attrs.evolve(settings, rateLimitStateFile=path)
    if settings.ledgerURL == "":
        path = os.path.join(stateDirectory(environ), "ledger.sqlite3")
        settings = attrs.evolve(settings, ledgerURL="sqlite://" + path)
    return settings, warnings


def stateDirectory(environ: Mapping[str, str]) -> str:
    """
    The folder for what the proxy keeps across restarts (the learned
    ceiling; later the usage ledger), created when first written.

    systemd's C{StateDirectory=} sets C{$STATE_DIRECTORY} (a colon-separated
    list when a unit names several: the first is ours); otherwise the XDG
    base directory spec's C{$XDG_STATE_HOME}, else C{~/.local/state}. The
    Go zai-proxy used C{/var/lib/zai-proxy}, which exists only under its
    unit, so a user running it by hand got an error line at every start.
    """
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0].strip()
    if systemd:
        return systemd
    xdg = environ.get("XDG_STATE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "zaiproxy")
    home = environ.get("HOME", "").strip() or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "zaiproxy")
