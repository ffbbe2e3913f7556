# -*- test-case-name: tests.test_resource -*-
"""
The root of the resource tree: route each request to a relay, a local
endpoint, or a refusal.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from zaiproxy.exchange import Exchange, sniffModel
from zaiproxy.metrics import methodLabel
from zaiproxy.dialects import respondWithError
from zaiproxy.relay import InFlight, Relay, RelayContext
from zaiproxy.routes import Forward, Local, Targets, guessDialect, resolve

__all__ = ["ProxyResource"]


def _bodySize(request: Request) -> int:
    content = request.content
    if content is None:
        return 0
    content.seek(0, 2)
    size: int = content.tell()
    content.seek(0)
    return size


class ProxyResource(Resource):
    """
    Every request enters here; nothing is traversed.
    """

    isLeaf = True

    def __init__(
        self,
        targets: Targets,
        context: RelayContext,
        inFlight: InFlight,
        local: dict[bytes, Resource],
        isDraining: Callable[[], bool],
    ) -> None:
        super().__init__()
        self._targets = targets
        self._context = context
        self._inFlight = inFlight
        self._local = local
        self._isDraining = isDraining

    def render(self, request: Request) -> Any:
        if self._isDraining():
            # Finish this one, but tell keep-alive clients to reconnect
            # (to a process that is not stopping).
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
        route = resolve(request.uri, self._targets)
        if isinstance(route, Local):
            return self._local[route.path].render(request)
        context = self._context
        exchange = Exchange(
            method=methodLabel(request.method),
            route=route.label,
            startedAt=context.clock.seconds(),
            requestBytes=_bodySize(request),
            client=_peer(request),
        )
        if not isinstance(route, Forward):
            exchange.dialect = guessDialect(
                request.path, request.requestHeaders.hasHeader(b"anthropic-version")
            )
            exchange.responseBytes = respondWithError(
                request, exchange.dialect, route.status, route.message
            )
            exchange.status = route.status
            context.reporter.finished(exchange)
            return NOT_DONE_YET
        exchange.dialect = route.dialect
        exchange.model = sniffModel(request.content)
        tap = None
        if context.accounting is not None:
            tap = context.accounting.tapFor(route.label, route.dialect, exchange, request.content)
        Relay(request, route, exchange, context, self._inFlight, tap).start()
        return NOT_DONE_YET

    def rejected(self, method: bytes, path: bytes, status: int, bodyBytes: int) -> None:
        """
        Report a request the HTTP channel refused before it got here.
        """
        route = resolve(path or b"/", self._targets)
        exchange = Exchange(
            method=methodLabel(method),
            route=route.label,
            startedAt=self._context.clock.seconds(),
            status=status,
            responseBytes=bodyBytes,
        )
        self._context.reporter.finished(exchange)


def _peer(request: Request) -> str:
    address: Any = request.getClientAddress()
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else "-"
