# -*- test-case-name: tests.test_dashboard_assembly -*-
"""
The ledger, the live points and the dashboard's resources, put together
as one part of the proxy service: built from the settings' values, fed by
the reporter, started and stopped with the service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.resource import Resource

from zaiproxy.dashboard.api import ApiRoot, DashboardConfig, UsageMeResource
from zaiproxy.dashboard.events import EventsResource
from zaiproxy.dashboard.live import GaugeReading, LiveWindow, Sampler
from zaiproxy.dashboard.page import DashboardResource
from zaiproxy.front.access import AdminGate, Credentials, Sessions
from zaiproxy.ledger.postgres import PostgresStore, isPostgresURL
from zaiproxy.ledger.reader import LedgerReader
from zaiproxy.ledger.rows import Origin
from zaiproxy.ledger.store import LedgerStore, Retention, SQLiteStore, sqlitePath
from zaiproxy.ledger.writer import LedgerWriter
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.reporter import Reporter

__all__ = ["LedgerOptions", "UsageViews"]


@attrs.frozen
class LedgerOptions:
    """
    Where the ledger is and how long it keeps what (the C{LEDGER_*}
    settings).
    """

    url: str
    retention: Retention
    queueSize: int


class UsageViews:
    """
    The ledger (when configured), the live points, and C{/dashboard} and
    C{/api/*}, where C{/admin/*} is, behind its gate (the dashboard's
    session cookie counts as the token); C{/api/usage/me} answers to
    client keys instead.

    @ivar resources: the local resources by path that go where C{/admin/*}
        goes (the admin port, when there is one).
    @ivar clientResources: those that stay on the proxy's port, for its
        clients (C{/api/usage/me}).
    @raise LedgerError: the ledger cannot be opened (at construction, so a
        bad path or a newer schema stops start-up with one clear line).
    """

    def __init__(
        self,
        reactor: Any,
        reporter: Reporter,
        metrics: Metrics,
        credentials: Credentials,
        config: DashboardConfig,
        ledger: LedgerOptions | None,
        interval: float,
        readGauges: Callable[[], GaugeReading],
    ) -> None:
        self.ledger: LedgerWriter | None = None
        self.reader: LedgerReader | None = None
        if ledger is not None:
            self.ledger, self.reader = self._openLedger(reactor, reporter, metrics, config, ledger)
        window = LiveWindow()
        reporter.addSink(window.add)
        reporter.watchAdjustments(window.adjusted)
        self.sampler = Sampler(
            reactor,
            interval,
            config.variant,
            window,
            readGauges,
            self.ledger.addGauges if self.ledger is not None else None,
        )
        sessions = Sessions(reactor, credentials)
        self.events = EventsResource(self.sampler, [config.variant])
        api = ApiRoot(self.reader, self.sampler, config)
        self.resources: dict[bytes, Resource] = {
            b"/api/": AdminGate(api, credentials, loopbackOnly=True, sessions=sessions),
            b"/api/events": AdminGate(self.events, credentials, loopbackOnly=True, sessions=sessions),
            b"/dashboard": DashboardResource(credentials, sessions),
        }
        self.clientResources: dict[bytes, Resource] = {
            b"/api/usage/me": UsageMeResource(self.reader, reactor, credentials),
        }

    @staticmethod
    def _openLedger(
        reactor: Any, reporter: Reporter, metrics: Metrics, config: DashboardConfig, options: LedgerOptions
    ) -> tuple[LedgerWriter, LedgerReader]:
        store: LedgerStore = (
            PostgresStore(options.url) if isPostgresURL(options.url) else SQLiteStore(sqlitePath(options.url))
        )
        writer = LedgerWriter(
            reactor,
            store,
            Origin(config.variant, config.instance),
            options.retention,
            capacity=options.queueSize,
            onDropped=lambda rows, reason: metrics.ledgerLost(rows, reason),
            onWritten=metrics.ledgerWritten,
        )
        writer.open()
        reporter.addSink(writer.add)
        metrics.watchLedger(lambda: writer.queued)
        return writer, LedgerReader(reactor, store)

    def start(self) -> None:
        if self.ledger is not None and self.reader is not None:
            self.ledger.start()
            self.reader.start()
        self.sampler.start()

    def closeStreams(self) -> None:
        """
        End the open C{/api/events} streams (the proxy is stopping).
        """
        self.events.closeAll()

    @inlineCallbacks
    def stop(self) -> Any:
        """
        Stop sampling, write what the ledger holds, end its threads.
        """
        self.sampler.stop()
        if self.ledger is not None and self.reader is not None:
            done: Deferred[None] = self.ledger.stop()
            yield done
            self.reader.stop()
