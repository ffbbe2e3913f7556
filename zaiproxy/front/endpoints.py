# -*- test-case-name: tests.test_endpoints -*-
"""
What the proxy answers itself: C{/metrics}, C{/health}, C{/readyz} and
C{/admin/reset-rate-limit} (who may reach them: L{zaiproxy.front.access}).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from zaiproxy.dialects import Dialect, errorBody
from zaiproxy.observe.metrics import Metrics

__all__ = ["AdminResetResource", "HealthResource", "MetricsResource", "ReadyResource"]


def _json(request: Request, status: int, document: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode()


class _ReadOnly(Resource):
    """
    GET and HEAD only; anything else gets 405 in JSON.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"application/json")
            return errorBody(Dialect.anthropic, 405, "method not allowed")
        return self.render_GET(request)

    def render_GET(self, request: Request) -> bytes:
        raise NotImplementedError


class MetricsResource(_ReadOnly):
    """
    The Prometheus scrape endpoint, rendered on the reactor thread (no
    thread pool, unlike C{prometheus_client.twisted}).
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        body, contentType = self._metrics.exposition(request.getHeader(b"accept"))
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return body


class HealthResource(_ReadOnly):
    """
    The proxy's state as JSON; other parts add sections (rate limit, quota).

    Always 200 while the process serves: "is it up" is a liveness question.
    Readiness is C{/readyz}.
    """

    def __init__(self, base: dict[str, Any], isDraining: Callable[[], bool]) -> None:
        super().__init__()
        self._base = base
        self._isDraining = isDraining
        self.sections: dict[str, Callable[[], Any]] = {}

    def document(self) -> dict[str, Any]:
        document = {"status": "draining" if self._isDraining() else "ok", **self._base}
        for name, section in self.sections.items():
            document[name] = section()
        return document

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, self.document())


class ReadyResource(_ReadOnly):
    """
    200 while the proxy takes new work, 503 once it drains (so a load
    balancer stops sending before the listener closes).
    """

    def __init__(self, isDraining: Callable[[], bool]) -> None:
        super().__init__()
        self._isDraining = isDraining

    def render_GET(self, request: Request) -> bytes:
        if self._isDraining():
            return _json(request, 503, {"status": "draining"})
        return _json(request, 200, {"status": "ready"})


class AdminResetResource(Resource):
    """
    C{POST /admin/reset-rate-limit}: forget what the limiter learned.

    The Go zai-proxy left it open to anyone; here L{zaiproxy.front.access.AdminGate}
    decides who reaches it.
    """

    isLeaf = True

    def __init__(self, limiter: Any) -> None:
        super().__init__()
        self._limiter = limiter

    def render(self, request: Request) -> bytes:
        if request.method != b"POST":
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            request.setHeader(b"content-type", b"application/json")
            return errorBody(Dialect.anthropic, 405, "method not allowed")
        cleared = self._limiter.reset()
        limiter = self._limiter
        return _json(
            request,
            200,
            {
                "status": "reset",
                "current_rate": limiter.rate,
                "ceiling": limiter.ceiling,
                "concurrency_limit": limiter.limit,
                "window_restarted": True,
                **cleared,
            },
        )
