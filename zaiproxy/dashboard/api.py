# -*- test-case-name: tests.test_dashboard_api -*-
"""
The JSON API under C{/api/}: usage and requests from the ledger, and the
Go dashboard's C{/api/status}, C{/api/metrics} and C{/api/config} for
scripts written against it. C{/api/events} is in
L{zaiproxy.dashboard.events}.

Each answer is read off the reactor thread (L{LedgerReader}); errors are
JSON with a message (400 for a bad parameter, 503 when the ledger is off
or cannot be read).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from zaiproxy.dashboard.live import Sampler
from zaiproxy.dialects import Dialect, errorBody
from zaiproxy.front.access import Credentials
from zaiproxy.front.clientkeys import presentedKeys
from zaiproxy.ledger import reports
from zaiproxy.ledger.queries import (
    BadQuery,
    UsageQuery,
    parseRange,
    requestsQuery,
    usageQuery,
    variantOf,
)
from zaiproxy.ledger.reader import LedgerReader

__all__ = ["ApiRoot", "DashboardConfig", "UsageMeResource", "sendJSON"]

#: Ranges up to this long are served from the live points in memory.
LIVE_SPAN = 3600


def sendJSON(request: Request, status: int, document: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode()


def sendError(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return errorBody(Dialect.anthropic, status, message)


@attrs.frozen
class DashboardConfig:
    """
    What C{/api/config} says, and what the API needs to know of the proxy.
    """

    variant: str
    instance: str
    version: str
    maxWorkers: int
    clientKeys: Callable[[], bool]
    #: Whether the dashboard signs in (C{ADMIN_TOKEN} is set).
    login: Callable[[], bool] = lambda: False

    def document(self, interval: float, ledger: bool, variants: list[str]) -> dict[str, Any]:
        return {
            "scrape_interval": interval,
            "targets": [],
            "variant": self.variant,
            "variants": variants,
            "instance": self.instance,
            "version": self.version,
            "ranges": ["5m", "15m", "1h", "6h", "24h", "7d", "30d"],
            "ledger": ledger,
            "client_keys": self.clientKeys(),
            "login": self.login(),
            "max_workers": self.maxWorkers,
        }


class _Answering:
    """
    Writes a Deferred's answer to a request, or a 503 if it failed; a
    client that left meanwhile gets nothing.
    """

    log = Logger()

    def answer(self, request: Request, pending: Deferred[Any], write: Callable[[Any], bytes]) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(result: Any) -> None:
            if not gone:
                request.write(write(result))
                request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("reading the ledger failed", failure=failure)
            if not gone:
                request.write(sendError(request, 503, "the ledger could not be read; see the proxy's log"))
                request.finish()

        pending.addCallbacks(done, failed).addErrback(
            lambda failure: self.log.failure("answering an API request failed", failure=failure)
        )
        return NOT_DONE_YET


class ApiRoot(Resource, _Answering):
    """
    C{/api/*} behind the admin gate.
    """

    isLeaf = True

    def __init__(self, reader: LedgerReader | None, sampler: Sampler, config: DashboardConfig) -> None:
        super().__init__()
        self._reader = reader
        self._sampler = sampler
        self._config = config
        self._routes: Mapping[bytes, Callable[[Request], Any]] = {
            b"/api/usage": self._usage,
            b"/api/requests": self._requests,
            b"/api/metrics": self._metrics,
            b"/api/status": self._status,
            b"/api/config": self._configuration,
        }

    def render(self, request: Request) -> Any:
        path = request.uri.partition(b"?")[0].rstrip(b"/")
        handler = self._routes.get(path)
        if handler is None:
            return sendError(request, 404, "no such API endpoint")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return sendError(request, 405, "the API answers GET only")
        try:
            return handler(request)
        except BadQuery as e:
            return sendError(request, 400, str(e))

    def _now(self) -> float:
        return float(self._sampler.clock.seconds())

    def _ledger(self, request: Request) -> LedgerReader | None:
        if self._reader is None:
            request.write(sendError(request, 503, "the ledger is off (LEDGER_ENABLED=false)"))
            request.finish()
        return self._reader

    def _usage(self, request: Request) -> Any:
        query = usageQuery(request.args or {}, self._now())
        return self._answerUsage(request, query)

    def _answerUsage(self, request: Request, query: UsageQuery) -> Any:
        reader = self._ledger(request)
        if reader is None:
            return NOT_DONE_YET
        writer = _usageCSV if query.format == "csv" else _usageJSON
        return self.answer(request, reader.ask(reports.usage, query), lambda doc: writer(request, doc))

    def _requests(self, request: Request) -> Any:
        query = requestsQuery(request.args or {}, self._now())
        reader = self._ledger(request)
        if reader is None:
            return NOT_DONE_YET
        return self.answer(request, reader.ask(reports.requests, query), lambda d: sendJSON(request, 200, d))

    def _metrics(self, request: Request) -> Any:
        args = request.args or {}
        _, span = parseRange(args)
        variant = variantOf(args)
        now = self._now()
        sampler = self._sampler
        if span <= LIVE_SPAN or self._reader is None:
            live = sampler.since(now - span) if variant in (None, sampler.variant) else []
            return sendJSON(request, 200, live)
        step = 60 if span <= 86400 else 3600
        pending = self._reader.ask(reports.series, now - span, now, step, variant)
        return self.answer(request, pending, lambda points: sendJSON(request, 200, points))

    def _status(self, request: Request) -> Any:
        sampler = self._sampler
        points = sampler.points
        if not points or variantOf(request.args or {}) not in (None, sampler.variant):
            return sendJSON(request, 200, {})
        last = points[-1]
        age = self._now() - last["timestamp"] / 1000
        return sendJSON(request, 200, {sampler.variant: _variantStatus(last, age, sampler.interval)})

    def _configuration(self, request: Request) -> Any:
        sampler = self._sampler
        if self._reader is None:
            return sendJSON(request, 200, self._config.document(sampler.interval, False, [sampler.variant]))

        def withVariants(found: list[str]) -> bytes:
            names = sorted({*found, sampler.variant})
            return sendJSON(request, 200, self._config.document(sampler.interval, True, names))

        return self.answer(request, self._reader.ask(reports.variants), withVariants)


def _variantStatus(point: Mapping[str, Any], age: float, interval: float) -> dict[str, Any]:
    """
    The Go dashboard's C{VariantStatus}, healthy only while points are fresh.
    """
    when = datetime.datetime.fromtimestamp(point["timestamp"] / 1000, datetime.timezone.utc)
    return {
        "healthy": age <= 3 * interval,
        "last_scrape": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "req_rate": point["req_rate"],
        "error_rate_pct": point["error_rate_pct"],
        "latency_p50_ms": point["latency_p50"],
        "concurrent": point["concurrent_requests"],
        "worker_utilization": point["worker_utilization"],
        "rate_limit_rps": point["rate_limit_rps"],
        "token_rate_in": point["token_rate_in"],
        "token_rate_out": point["token_rate_out"],
        "quota": point["quota"],
    }


def _usageJSON(request: Request, document: dict[str, Any]) -> bytes:
    return sendJSON(request, 200, document)


def _usageCSV(request: Request, document: dict[str, Any]) -> bytes:
    """
    The usage rows as CSV: the group columns, then the sums.
    """
    out = io.StringIO()
    columns = [*document["group_by"], *reports.NUMBERS]
    table = csv.DictWriter(out, columns, lineterminator="\r\n")
    table.writeheader()
    table.writerows(document["rows"])
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/csv; charset=utf-8")
    request.setHeader(b"content-disposition", b'attachment; filename="zaiproxy-usage.csv"')
    request.setHeader(b"cache-control", b"no-store")
    return out.getvalue().encode("utf-8")


class UsageMeResource(Resource, _Answering):
    """
    C{/api/usage/me}: a client's own usage, authenticated with its client
    key exactly as the proxied routes are (so a Claude Code status line
    can ask with the key it already has).
    """

    isLeaf = True

    def __init__(self, reader: LedgerReader | None, clock: Any, credentials: Credentials) -> None:
        super().__init__()
        self._reader = reader
        self._clock = clock
        self._credentials = credentials

    def render(self, request: Request) -> Any:
        keys = self._credentials.clientKeys
        if keys is None:
            return sendError(request, 404, "client keys are off, so there is no 'me' (see /api/usage)")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return sendError(request, 405, "the API answers GET only")
        name = keys.lookupAny(presentedKeys(request.requestHeaders))
        if name is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="zaiproxy"')
            return sendError(request, 401, "send your client key as x-api-key or Authorization: Bearer")
        try:
            query = usageQuery(request.args or {}, float(self._clock.seconds()), client=name)
        except BadQuery as e:
            return sendError(request, 400, str(e))
        if "client" not in query.groupBy:
            query = attrs.evolve(query, groupBy=("client", *query.groupBy))
        if self._reader is None:
            return sendError(request, 503, "the ledger is off (LEDGER_ENABLED=false)")
        writer = _usageCSV if query.format == "csv" else _usageJSON
        return self.answer(request, self._reader.ask(reports.usage, query), lambda d: writer(request, d))
