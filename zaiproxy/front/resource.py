# -*- test-case-name: tests.test_resource -*-
"""
The root of the resource tree: route each request to a relay, a local
endpoint, or a refusal; and the relays in flight, for shutdown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from zaiproxy.dialects import Dialect, respondWithError
from zaiproxy.front.access import Credentials
from zaiproxy.front.clientkeys import UNAUTHORIZED, presentedKeys
from zaiproxy.front.site import InFlight
from zaiproxy.observe.metrics import methodLabel
from zaiproxy.observe.record import Exchange, loggedPath, newRequestId, sniffModel
from zaiproxy.relay.context import RelayContext
from zaiproxy.relay.headers import REQUEST_ID_HEADER
from zaiproxy.relay.relay import Relay
from zaiproxy.relay.routes import Forward, Local, Refuse, Targets, guessDialect, resolve
from zaiproxy.usage.body import RequestBody

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
        inFlight: InFlight[Relay],
        local: dict[bytes, Resource],
        isDraining: Callable[[], bool],
        credentials: Credentials | None = None,
    ) -> None:
        super().__init__()
        self._credentials = credentials or Credentials()
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
        requestId = newRequestId()
        request.setHeader(REQUEST_ID_HEADER, requestId.encode("ascii"))
        route = resolve(request.uri, self._targets)
        if isinstance(route, Local):
            resource = self._local.get(route.path)
            if resource is not None:
                return resource.render(request)
            # Served on the admin port (--admin-listen) only.
            route = Refuse(404, "no route for this path on the proxy", "unknown")
        context = self._context
        exchange = Exchange(
            method=methodLabel(request.method),
            route=route.label,
            startedAt=context.clock.seconds(),
            requestBytes=_bodySize(request),
            client=_peer(request),
            requestId=requestId,
        )
        if not isinstance(route, Forward):
            exchange.path = loggedPath(request.uri)
            exchange.dialect = guessDialect(
                request.path, request.requestHeaders.hasHeader(b"anthropic-version")
            )
            exchange.responseBytes = respondWithError(request, exchange.dialect, route.status, route.message)
            exchange.status = route.status
            context.reporter.finished(exchange.freeze(context.clock.seconds()))
            return NOT_DONE_YET
        exchange.dialect = route.dialect
        keys = self._credentials.clientKeys
        if keys is not None:
            presented = presentedKeys(request.requestHeaders)
            exchange.keyName = keys.lookupAny(presented)
            if exchange.keyName is None:
                self._unauthorized(request, exchange, route.dialect, "unknown" if presented else "missing")
                return NOT_DONE_YET
        # The whole body was read before render: twisted.web only drops it later.
        content = request.content
        assert content is not None
        exchange.model = sniffModel(content)
        body = None
        accounting = context.accounting
        if accounting is not None and route.label in accounting.countedRoutes:
            # Kept now: twisted.web drops its copy when the client leaves.
            body = RequestBody(content)
        Relay(request, route, exchange, context, self._inFlight, body).start()
        return NOT_DONE_YET

    def _unauthorized(self, request: Request, exchange: Exchange, dialect: Dialect, reason: str) -> None:
        """
        401 in the route's dialect, shaped so the SDKs raise their
        AuthenticationError. The presented key is never logged or echoed.
        """
        exchange.keyName = UNAUTHORIZED
        exchange.errorType = UNAUTHORIZED
        exchange.authFailure = reason
        exchange.status = 401
        if reason == "missing":
            message = "this proxy needs a client key: send it as x-api-key or Authorization: Bearer"
        else:
            message = "the client key is not valid for this proxy"
        request.setHeader(b"www-authenticate", b'Bearer realm="zaiproxy"')
        exchange.responseBytes = respondWithError(
            request, dialect, 401, message, "invalid_api_key" if dialect is Dialect.openai else None
        )
        clock = self._context.clock
        self._context.reporter.finished(exchange.freeze(clock.seconds()))

    def rejected(self, method: bytes, path: bytes, status: int, bodyBytes: int) -> None:
        """
        Report a request the HTTP channel refused before it got here.
        """
        route = resolve(path or b"/", self._targets)
        now = self._context.clock.seconds()
        exchange = Exchange(
            method=methodLabel(method),
            route=route.label,
            startedAt=now,
            status=status,
            responseBytes=bodyBytes,
            path=loggedPath(path or b"/"),
            requestId=newRequestId(),
        )
        self._context.reporter.finished(exchange.freeze(now))


def _peer(request: Request) -> str:
    address: Any = request.getClientAddress()
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else "-"
