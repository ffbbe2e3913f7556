# -*- test-case-name: tests.test_dashboard_events -*-
"""
C{/api/events}: the live points as Server-Sent Events, the Go dashboard's
frames: a C{connected} event, then a C{metrics} event per point, and a
heartbeat comment every 30 seconds so idle proxies in between keep the
connection.

One EventSource carries everything a page needs (a browser opens at most
six connections to a host). A viewer that left is dropped when its
connection closes; a viewer that stopped reading is dropped once the
bytes waiting for it pass a bound, so a stuck tab never grows the
proxy's memory.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from zaiproxy.dashboard.api import sendError
from zaiproxy.dashboard.live import Sampler
from zaiproxy.ledger.queries import BadQuery, variantOf

__all__ = ["HEARTBEAT_SECONDS", "MAX_UNREAD_BYTES", "EventsResource"]

#: How often an idle stream gets a comment.
HEARTBEAT_SECONDS = 30.0
#: A viewer with this many bytes not yet taken by its socket is dropped.
MAX_UNREAD_BYTES = 256 * 1024


class _Viewer:
    """
    One open stream.
    """

    def __init__(self, request: Request, variant: str | None) -> None:
        self.request = request
        self.variant = variant
        self.sinceBeat = 0.0

    def unread(self) -> int:
        transport = getattr(self.request.channel, "transport", None)
        buffered = getattr(transport, "dataBuffer", b"")
        return len(buffered) + sum(len(piece) for piece in getattr(transport, "_tempDataBuffer", ()))


class EventsResource(Resource):
    """
    The stream of live points.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, sampler: Sampler, variants: list[str]) -> None:
        super().__init__()
        self._sampler = sampler
        self._variants = variants
        self._viewers: list[_Viewer] = []
        # One subscription for every viewer: each point is encoded once.
        sampler.subscribe(self._point)

    def __len__(self) -> int:
        return len(self._viewers)

    def render_GET(self, request: Request) -> Any:
        try:
            variant = variantOf(request.args or {})
        except BadQuery as e:
            return sendError(request, 400, str(e))
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        viewer = _Viewer(request, variant)
        connected = {
            "type": "connected",
            "scrape_interval": self._sampler.interval,
            "variants": self._variants,
        }
        request.write(b"data: " + json.dumps(connected).encode() + b"\n\n")
        self._viewers.append(viewer)
        request.notifyFinish().addBoth(lambda _: self._forget(viewer))
        return NOT_DONE_YET

    def _point(self, point: dict[str, Any]) -> None:
        if not self._viewers:
            return
        frame = b"data: " + json.dumps({"type": "metrics", "data": point}, separators=(",", ":")).encode()
        for viewer in list(self._viewers):
            self._send(viewer, point["variant"], frame + b"\n\n")

    def _send(self, viewer: _Viewer, variant: str, frame: bytes) -> None:
        if viewer.unread() > MAX_UNREAD_BYTES:
            self.log.info("Dropping a dashboard stream that stopped reading")
            self._end(viewer)
            return
        viewer.sinceBeat += self._sampler.interval
        if viewer.sinceBeat >= HEARTBEAT_SECONDS:
            viewer.sinceBeat = 0.0
            viewer.request.write(b": heartbeat\n\n")
        if viewer.variant in (None, variant):
            viewer.request.write(frame)

    def _forget(self, viewer: _Viewer) -> None:
        if viewer in self._viewers:
            self._viewers.remove(viewer)

    def _end(self, viewer: _Viewer) -> None:
        self._forget(viewer)
        channel = viewer.request.channel
        viewer.request.finish()
        if channel is not None:
            channel.loseConnection()

    def closeAll(self) -> None:
        """
        End every stream (the proxy is stopping): the browsers reconnect
        to whichever process answers next.
        """
        for viewer in list(self._viewers):
            self._end(viewer)
