# -*- test-case-name: tests.test_service -*-
"""
The proxy as a service: builds the pieces, listens, and drains on stop.

SIGHUP (under twistd) reloads the config file and the key file
(L{zaiproxy.config.reload}).

Stopping (SIGTERM) closes the listeners first, lets the streams in flight
finish for up to C{DRAIN_TIMEOUT}, cuts the rest with an error event, and
then closes every client connection and waits until it is gone: a response
handed to the transport has not left the socket yet, and a reactor that
stops at that moment loses the tail of the stream.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from zaiproxy.config.activation import Listener
from zaiproxy.config.reload import Reloader
from zaiproxy.config.settings import Settings
from zaiproxy.dashboard.api import DashboardConfig
from zaiproxy.dashboard.assembly import LedgerOptions, UsageViews
from zaiproxy.dashboard.live import GaugeReading, quotaBlock
from zaiproxy.front.access import AdminGate, AdminRoot, Credentials, isLoopbackAddress
from zaiproxy.front.clientkeys import buildClientKeys
from zaiproxy.front.endpoints import AdminResetResource, HealthResource, MetricsResource, ReadyResource
from zaiproxy.front.resource import ProxyResource
from zaiproxy.front.site import InFlight, ProxySite
from zaiproxy.ledger.store import Retention
from zaiproxy.limits.limiter import LimiterSettings, RateLimiter
from zaiproxy.limits.redislink import RedisAddress, RedisLink
from zaiproxy.limits.shared import SharedKeys, SharedLimits
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.quota import QuotaPoller
from zaiproxy.observe.reporter import Reporter
from zaiproxy.relay.context import RelayContext
from zaiproxy.relay.relay import Relay
from zaiproxy.relay.routes import Targets
from zaiproxy.relay.upstream import Upstream
from zaiproxy.startup import BuildInfo, announce
from zaiproxy.twistedprivate import forgetExitSignal
from zaiproxy.usage.accounting import Accounting, ModelLabels, Price, Pricing
from zaiproxy.usage.tokens import Counting, loadCounter

__all__ = ["BuildInfo", "ProxyService"]

#: After the drain, how long closing connections may take to flush.
_FLUSH_SECONDS = 5.0
#: After cutting streams at the drain deadline, how long they have to end.
_CUT_SECONDS = 2.0
#: Largest request body on the admin port (its endpoints take none).
_ADMIN_MAX_REQUEST_BYTES = 64 * 1024


class ProxyService(MultiService):
    """
    The whole proxy: listeners, upstream pool, metrics and the drain.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        listen: Sequence[str | Listener],
        observer: ILogObserver | None = None,
        warnings: list[str] | None = None,
        build: BuildInfo | None = None,
        metrics: Metrics | None = None,
        limiterClock: Any = None,
        adminListen: list[str] | None = None,
        configPath: str | None = None,
        environ: Mapping[str, str] | None = None,
        handleSignals: bool = False,
    ) -> None:
        """
        @param adminListen: strports descriptions of the admin port; when
            given, C{/metrics} and C{/admin/*} move there from C{listen}.
        @param configPath: the C{--config} file, and C{environ} the
            environment, that L{reload} reads again.
        @param handleSignals: reload on SIGHUP (the real daemon only).
        @raise ClientKeysError: the key file cannot be used.
        """
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.reloader = Reloader(self, configPath, environ or {})
        self._handleSignals = handleSignals
        self.draining = False
        self._announced = False
        self.observer = observer
        clientKeys, keyWarnings = buildClientKeys(settings.proxyApiKeys, settings.proxyApiKeysFile or None)
        self._warnings = list(warnings or []) + keyWarnings
        self.credentials = Credentials(clientKeys, settings.adminToken)
        self.build = build = build or BuildInfo()
        self.instance = settings.instanceName or socket.gethostname()
        self.metrics = metrics or Metrics(
            settings.deploymentVariant, build.version, build.commit, build.buildTime
        )
        self.metrics.nameInstance(self.instance)
        self.upstream = Upstream(reactor, settings.upstreamConnectTimeout, settings.upstreamPoolSize)
        self.reporter = Reporter(self.metrics)
        self.accounting = self._buildAccounting(reactor, settings)
        self.limiter = self._buildLimiter(limiterClock or reactor, settings)
        self.inFlight: InFlight[Relay] = InFlight()
        self.metrics.watchInFlight(lambda: len(self.inFlight))
        self.metrics.watchClientKeys(lambda: len(self.credentials.clientKeys or ()))
        self.targets = Targets.fromURLs(settings.zaiTargetURL, settings.zaiOpenAITargetURL)
        self.context = self._buildContext(reactor, settings)
        self.quota = self._buildQuota(reactor, settings)
        self.usageViews = self._buildUsageViews(reactor, settings)
        self._buildSites(reactor, settings, list(adminListen or []))
        self._parseEndpoints(reactor, listen, adminListen or [])
        self.ports: list[IListeningPort] = []
        self.adminPorts: list[IListeningPort] = []

    def _buildContext(self, reactor: Any, settings: Settings) -> RelayContext:
        return RelayContext(
            clock=reactor,
            upstream=self.upstream,
            reporter=self.reporter,
            apiKey=settings.zaiApiKey.encode("ascii", "replace"),
            firstByteTimeout=settings.upstreamFirstByteTimeout,
            idleTimeout=settings.upstreamIdleTimeout,
            accounting=self.accounting,
            limiter=self.limiter,
            maxRetries=settings.maxRetries,
        )

    def _parseEndpoints(self, reactor: Any, listen: Sequence[str | Listener], admin: list[str]) -> None:
        """
        Parsed now, so a bad --listen stops start-up with a clear error. A
        L{Listener} is a socket passed by systemd (L{zaiproxy.config.activation}).
        """
        self._endpoints = [
            (item.description, item.endpoint)
            if isinstance(item, Listener)
            else (item, endpoints.serverFromString(reactor, item))
            for item in listen
        ]
        self._adminEndpoints = [
            (description, endpoints.serverFromString(reactor, description)) for description in admin
        ]

    def _buildQuota(self, reactor: Any, settings: Settings) -> QuotaPoller | None:
        if not settings.quotaPollEnabled:
            return None
        return QuotaPoller(
            reactor,
            self.upstream.client,
            settings.zaiQuotaBaseURL,
            settings.zaiApiKey,
            interval=settings.quotaPollInterval,
            timeout=settings.quotaPollTimeout,
            staleAfter=settings.quotaStaleAfter,
            maxBytes=settings.quotaMaxResponseBytes,
            metrics=self.metrics,
        )

    def _buildUsageViews(self, reactor: Any, settings: Settings) -> UsageViews:
        """
        The ledger, the live points and the dashboard (L{UsageViews}).

        @raise LedgerError: the ledger cannot be used.
        """
        limiter = self.limiter

        def readGauges() -> GaugeReading:
            quota = quotaBlock(self.quota, limiter, reactor.seconds())
            return (len(self.inFlight), settings.maxWorkers, limiter.rate, limiter.ceiling, quota)

        ledger = None
        if settings.ledgerEnabled and settings.ledgerURL:
            retention = Retention(
                settings.ledgerRequestsRetention,
                settings.ledgerMinutesRetention,
                settings.ledgerHoursRetention,
            )
            ledger = LedgerOptions(settings.ledgerURL, retention, settings.ledgerQueueSize)
        config = DashboardConfig(
            variant=settings.deploymentVariant,
            instance=self.instance,
            version=self.build.version,
            maxWorkers=settings.maxWorkers,
            clientKeys=lambda: self.credentials.clientKeys is not None,
            login=lambda: bool(self.credentials.adminToken),
        )
        return UsageViews(
            reactor,
            self.reporter,
            self.metrics,
            self.credentials,
            config,
            ledger,
            settings.dashboardInterval,
            readGauges,
        )

    def _buildHealth(self, settings: Settings, isDraining: Callable[[], bool]) -> HealthResource:
        """
        C{/health}: what is configured, and each piece's own snapshot.
        """
        health = HealthResource(
            {
                "version": self.build.version,
                "variant": settings.deploymentVariant,
                "instance": self.instance,
                "upstream": {
                    "anthropic": settings.zaiTargetURL,
                    "openai": settings.zaiOpenAITargetURL,
                },
            },
            isDraining,
        )
        health.sections["rate_limit"] = self.limiter.snapshot
        if self.sharedLimits is not None:
            health.sections["shared_limits"] = self.sharedLimits.snapshot
        if self.quota is not None:
            health.sections["quota"] = self.quota.snapshot
        else:
            health.sections["quota"] = lambda: {"enabled": False, "fresh": False}
        health.sections["token_counting"] = self.accounting.health
        health.sections["reload"] = self.reloader.snapshot
        return health

    def _buildSites(self, reactor: Any, settings: Settings, adminListen: list[str]) -> None:
        """
        The resource trees and sites of the proxy port and the admin port;
        without an admin port, C{/metrics} and C{/admin/*} stay on the
        proxy's (behind the admin gate).
        """
        isDraining = lambda: self.draining  # noqa: E731
        self.health = self._buildHealth(settings, isDraining)
        public: dict[bytes, Resource] = {
            b"/health": self.health,
            b"/readyz": ReadyResource(isDraining),
            **self.usageViews.clientResources,
        }
        guarded = {
            b"/metrics": AdminGate(MetricsResource(self.metrics), self.credentials, loopbackOnly=False),
            b"/admin/reset-rate-limit": AdminGate(
                AdminResetResource(self.limiter), self.credentials, loopbackOnly=True
            ),
            **self.usageViews.resources,
        }
        self.resource = ProxyResource(
            self.targets,
            self.context,
            self.inFlight,
            public if adminListen else {**public, **guarded},
            isDraining,
            self.credentials,
        )
        self.site = ProxySite(
            self.resource,
            reactor,
            maxRequestBytes=settings.maxRequestBytes,
            headerTimeout=settings.clientHeaderTimeout,
            idleTimeout=settings.clientIdleTimeout,
            onRejected=self.resource.rejected,
        )
        adminRoot = AdminRoot({**public, **guarded})
        self.adminSite = ProxySite(
            adminRoot,
            reactor,
            maxRequestBytes=_ADMIN_MAX_REQUEST_BYTES,
            headerTimeout=settings.clientHeaderTimeout,
            idleTimeout=settings.clientIdleTimeout,
            onRejected=adminRoot.rejected,
        )

    def _buildAccounting(self, reactor: Any, settings: Settings) -> Accounting:
        """
        Load the token counter now, at start-up, never on a request.
        """
        self._counterProblems: list[str] = []
        counting = None
        if settings.tokenCountingEnabled:
            environ = {"TIKTOKEN_CACHE_DIR": settings.tiktokenCacheDir} if settings.tiktokenCacheDir else {}
            counter, self._counterProblems = loadCounter(environ)
            observe = self.metrics.tokenizer(counter.name, counter.encoding)
            counting = Counting(reactor, counter, observe=observe)
        else:
            self.metrics.tokenizer("disabled", "none")
        start, end = settings.peakHours
        pricing = Pricing(
            prices={model: Price(*prices) for model, prices in settings.tokenPrices},
            peakStart=start,
            peakEnd=end,
            utcOffset=settings.peakUTCOffset,
            peakMultiplier=settings.peakMultiplier,
        )
        labels = ModelLabels(settings.modelLabels, settings.tokenizerModel)
        return Accounting(reactor, counting, labels, pricing)

    def _buildLimiter(self, clock: Any, settings: Settings) -> RateLimiter:
        reporter = self.reporter
        limiter = RateLimiter(
            clock,
            LimiterSettings(
                initial=settings.rateLimitInitial,
                minimum=settings.rateLimitMin,
                maximum=settings.rateLimitMax,
                window=settings.rateLimitWindow,
                alpha=settings.rateLimitCeilingAlpha,
                margin=settings.rateLimitHoldMargin,
                probeInterval=settings.rateLimitProbeInterval,
                maxWorkers=settings.maxWorkers,
                maxQueue=settings.maxQueue,
                queueTimeout=settings.queueTimeout,
                stateFile=settings.rateLimitStateFile,
                stateMaxAge=settings.rateLimitStateMaxAge,
                quotaHold=settings.quotaHold,
            ),
            onAdjust=reporter.rateAdjusted,
            onAdmitted=reporter.admitted,
            onRejected=reporter.refused,
        )
        self.metrics.watchLimiter(limiter, settings.maxWorkers)
        self.sharedLimits: SharedLimits | None = None
        if settings.redisURL:
            link = RedisLink(self.reactor, RedisAddress.fromURL(settings.redisURL), settings.redisTimeout)
            keys = SharedKeys.forKey(settings.zaiApiKey)
            self.sharedLimits = SharedLimits(clock, link, keys, limiter, self.instance, settings.redisLease)
            self.metrics.watchShared(self.sharedLimits)
        return limiter

    def setServiceParent(self, parent: Any) -> None:
        """
        Under twistd, give the application our log observer, so LOG_FORMAT
        and LOG_LEVEL apply without twistd command-line flags.
        """
        if self.observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # Bind before twistd drops privileges (port 80, systemd sockets).
        self._announce()
        try:
            self._listen()
        except CannotListenError as e:
            # Under twistd: one line naming the address, not a traceback
            # through twistd's internals; exit 1, as systemd may retry it.
            self.log.critical("{problem}", problem=cannotListen(e))
            raise SystemExit(1) from None
        super().privilegedStartService()

    def startService(self) -> None:
        self._announce()
        self._listen()
        self.limiter.start()
        if self.sharedLimits is not None:
            self.sharedLimits.start()
        if self._handleSignals:
            self.reloader.installSignal()
        if self.quota is not None:
            self.quota.start()
        else:
            self.log.info("Quota polling disabled (QUOTA_POLL_ENABLED is not true)")
        self.usageViews.start()
        super().startService()

    def _announce(self) -> None:
        """
        The start-up lines, once (L{zaiproxy.startup}).
        """
        if self._announced:
            return
        self._announced = True
        announce(
            self.settings,
            self.build,
            self._warnings,
            self.accounting.counting,
            self._counterProblems,
            self.credentials.clientKeys,
            self.limiter,
            self.usageViews.ledger,
            self.instance,
        )

    def _listen(self) -> None:
        """
        Listen on every endpoint; a port that cannot be bound stops start-up.
        """
        if self.ports:
            return
        separate = bool(self._adminEndpoints)
        try:
            for description, endpoint in self._endpoints:
                port = self._bind(description, endpoint, self.site)
                self.ports.append(port)
                self.log.info(
                    "Z.AI proxy listening on {where} ({description}){metrics}",
                    where=self._where(port),
                    description=description,
                    metrics="" if separate else "; metrics at /metrics",
                )
            for description, endpoint in self._adminEndpoints:
                port = self._bind(description, endpoint, self.adminSite)
                self.adminPorts.append(port)
                self.log.info(
                    "Admin port (/metrics, /health, /readyz, /admin/*) listening on {where} ({description})",
                    where=self._where(port),
                    description=description,
                )
        except BaseException:
            for port in self.ports + self.adminPorts:
                port.stopListening()
            self.ports, self.adminPorts = [], []
            raise
        self.warnIfOpen()

    @staticmethod
    def _where(port: IListeningPort) -> str:
        address = port.getHost()
        if not hasattr(address, "host"):
            return str(getattr(address, "name", address))
        return f"{address.host}:{getattr(address, 'port', '')}"

    def _bind(self, description: str, endpoint: Any, site: ProxySite) -> IListeningPort:
        outcome: list[Any] = []
        endpoint.listen(site).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"listening on {description} did not complete")
        if isinstance(outcome[0], Failure):
            failure = outcome[0]
            if failure.check(CannotListenError):
                error = failure.value
                assert isinstance(error, CannotListenError)
                if isinstance(error.port, int):
                    where = f"{error.interface or '*'}:{error.port}"
                else:  # a UNIX socket's path
                    where = str(error.port)
                raise CannotListenError(f"{where} ({description})", None, error.socketError) from None
            failure.raiseException()
        port: IListeningPort = outcome[0]
        return port

    def warnIfOpen(self) -> None:
        """
        The loud warning: no client keys, and a port reachable from other
        hosts, means anyone who can connect spends the upstream quota.
        """
        if self.credentials.clientKeys is not None:
            return
        exposed = [self._where(port) for port in self.ports if not isLoopbackAddress(port.getHost())]
        if exposed:
            self.log.warn(
                "WARNING: no client keys are configured (PROXY_API_KEYS_FILE, PROXY_API_KEYS) and the "
                "proxy listens beyond loopback on {where}: the upstream Z.AI quota is open to anyone "
                "who can connect",
                where=", ".join(exposed),
            )

    def reload(self) -> bool:
        """
        Read the config file and the key file again (what SIGHUP does); see
        L{Reloader.reload}.
        """
        return self.reloader.reload()

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Drain: stop accepting, let streams finish, flush, close the pool.
        """
        self.draining = True
        self.reloader.restoreSignal()
        grace = self.settings.drainGrace
        if grace > 0 and self.ports + self.adminPorts:
            # Keep listening for a while: a load balancer probing /readyz
            # must see the 503 (a closed port reads as a crash, and some
            # keep sending until their probes fail). Requests that come
            # meanwhile are served, with Connection: close.
            self.log.info("Draining: /readyz answers 503; listeners close in {grace:g} s", grace=grace)
            yield deferLater(self.reactor, grace, lambda: None)
        self.log.info(
            "Draining: {n} request(s) in flight, up to {timeout:g} s",
            n=len(self.inFlight),
            timeout=self.settings.drainTimeout,
        )
        ports, self.ports = self.ports + self.adminPorts, []
        self.adminPorts = []
        yield defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports], consumeErrors=True
        ).addErrback(lambda f: self.log.failure("closing a listener failed", failure=f))

        drained = yield self._within(self.inFlight.whenEmpty(), self.settings.drainTimeout)
        if not drained:
            self.log.warn("Drain timeout: cutting {n} request(s) still in flight", n=len(self.inFlight))
            for relay in self.inFlight:
                relay.shutdown()
            yield self._within(self.inFlight.whenEmpty(), _CUT_SECONDS)

        self.usageViews.closeStreams()
        # Hand every connection's last bytes to the kernel before the
        # reactor stops: loseConnection() flushes the write buffer first.
        sites = (self.site, self.adminSite)
        for site in sites:
            for channel in site.channels:
                channel.loseConnection()
        for site in sites:
            closed = yield self._within(site.channels.whenEmpty(), _FLUSH_SECONDS)
            if not closed:
                for channel in site.channels:
                    channel.abortConnection()
        self.limiter.stop()
        if self.sharedLimits is not None:
            yield self.sharedLimits.stop()
        if self.quota is not None:
            self.quota.stop()
        # The drain's last records are in the ledger's queue: written now.
        yield self.usageViews.stop()
        yield self.upstream.close()
        Service.stopService(self)
        self.log.info("Drained; stopped")
        # twistd re-raises a stopping signal after shutdown so that the exit
        # status says "killed by SIGTERM"; a completed drain is a clean exit.
        forgetExitSignal(self.reactor)

    @inlineCallbacks
    def _within(self, waiting: Deferred[None], seconds: float) -> Any:
        """
        Wait for C{waiting} for at most C{seconds}; say whether it fired.
        """
        try:
            yield waiting.addTimeout(seconds, self.reactor)
        except defer.TimeoutError:
            return False
        return True


def cannotListen(error: CannotListenError) -> str:
    """
    One line for a listener that could not be bound: where, and why.
    """
    reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
    where = error.interface if error.port is None else f"{error.interface}:{error.port}"
    return f"Cannot listen on {where}: {reason}"
