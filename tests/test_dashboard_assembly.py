"""
The ledger, live points and dashboard as one part of the service: what it
serves, how it opens the ledger, and that stopping it leaves no thread.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from zaiproxy.dashboard.api import DashboardConfig
from zaiproxy.dashboard.assembly import LedgerOptions, UsageViews
from zaiproxy.dashboard.live import GaugeReading
from zaiproxy.front.access import Credentials
from zaiproxy.ledger.migrations import LedgerError
from zaiproxy.ledger.store import Retention
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.record import Record
from zaiproxy.observe.reporter import Reporter

CONFIG = DashboardConfig("production", "host-1", "1.0", 10, lambda: False)
RETENTION = Retention(86400, 86400, 86400)


def gauges() -> GaugeReading:
    return (0, 10, 1.0, 1.0, None)


def views(reactor: Any, ledger: LedgerOptions | None) -> tuple[UsageViews, Metrics]:
    metrics = Metrics("production", "1.0", "c", "t")
    made = UsageViews(reactor, Reporter(metrics), metrics, Credentials(), CONFIG, ledger, 5.0, gauges)
    return made, metrics


@pytest_twisted.ensureDeferred
async def test_withoutALedger(reactor: Any) -> None:
    """
    Without a ledger the dashboard and the live API are still served.
    """
    made, _ = views(reactor, None)
    assert sorted(made.resources) == [b"/api/", b"/api/events", b"/dashboard"]
    assert sorted(made.clientResources) == [b"/api/usage/me"]
    made.start()
    await made.stop()
    assert made.ledger is None


@pytest_twisted.ensureDeferred
async def test_ledgerRowsAndThreads(reactor: Any, tmp_path: Path) -> None:
    """
    A record handed to the reporter is written; stopping ends the writer's
    and readers' threads.
    """
    before = set(threading.enumerate())
    made, metrics = views(reactor, LedgerOptions(f"sqlite:///{tmp_path}/l.sqlite3", RETENTION, 100))
    made.start()
    record = Record(
        method="POST", route="/v1/messages", status=200, startedAt=1000.0, duration=0.5, requestId="r1"
    )
    assert made.ledger is not None and made.reader is not None
    made.ledger.add(record)
    await made.stop()
    assert (
        metrics.registry.get_sample_value("zai_proxy_ledger_rows_written_total", {"variant": "production"})
        == 1
    )
    assert set(threading.enumerate()) <= before


@pytest.mark.parametrize("path", [b"/api/", b"/api/events"])
def test_apiAnswersLoopbackOnlyWithoutToken(reactor: Any, path: bytes) -> None:
    """
    Without ADMIN_TOKEN the API answers loopback only, as /admin/* does.
    """
    made, _ = views(reactor, None)
    channel = DummyChannel()
    channel.transport = DummyChannel.TCP(IPv4Address("TCP", "192.0.2.7", 4000))
    request = Request(channel)
    request.method, request.uri = b"GET", b"/api/usage"
    body = made.resources[path].render(request)
    assert request.code == 403 and b"loopback only" in body


def test_unusableLedgerStopsStartUp(reactor: Any, tmp_path: Path) -> None:
    """
    A ledger path that cannot be opened is one clear error at start.
    """
    (tmp_path / "taken").mkdir()
    with pytest.raises(LedgerError, match=r"cannot open the ledger .*/taken"):
        views(reactor, LedgerOptions(f"sqlite:///{tmp_path}/taken", RETENTION, 100))
