"""
A minimal relay for bench.relay and bench.layers: a twisted.web resource that forwards
each POST body to one upstream and relays the answer with C{deliverBody}.

The variants differ only in the HTTP client, so their difference is what
that client costs per request: C{agent} is a plain L{Agent} over a
persistent pool (what zaiproxy's relay uses); C{treq} is
L{treq.client.HTTPClient} over that same agent with C{unbuffered=True,
allow_redirects=False} and the same body producer, which leaves treq's own
layers (URL parsing, CookieAgent, ContentDecoderAgent); C{treq-bytes} hands
treq the body as bytes, as most treq code does, so treq wraps it in a
FileBodyProducer (one cooperator turn per request). C{cookie} and
C{decoder} wrap the plain agent in just one of treq's layers (L{CookieAgent},
L{ContentDecoderAgent}), to tell which layer costs what.

    python bench/minirelay.py agent 8081 http://127.0.0.1:9999/api/anthropic/v1/messages
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from http.cookiejar import CookieJar
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import (
    Agent,
    ContentDecoderAgent,
    CookieAgent,
    GzipDecoder,
    HTTPConnectionPool,
)
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from zaiproxy.relay.upstream import BytesProducer

Send = Callable[[bytes, Headers], "Deferred[Any]"]

# The global reactor, typed loosely: its interfaces are not in its type.
reactor: Any = _reactor


class Body(Protocol):
    def __init__(self, request: Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: object = None) -> None:
        if not self.request._disconnected:
            self.request.finish()


class Relay(Resource):
    isLeaf = True

    def __init__(self, send: Send) -> None:
        super().__init__()
        self.send = send

    def render_POST(self, request: Request) -> Any:
        headers = Headers({b"content-type": [b"application/json"], b"x-api-key": [b"bench-key"]})

        def got(response: Any) -> None:
            request.setResponseCode(response.code)
            for value in response.headers.getRawHeaders(b"content-type", []):
                request.responseHeaders.addRawHeader(b"content-type", value)
            response.deliverBody(Body(request))

        def failed(reason: Any) -> None:
            if not request._disconnected:
                request.setResponseCode(502)
                request.finish()

        self.send(request.content.read() if request.content else b"", headers).addCallbacks(got, failed)
        return NOT_DONE_YET


def sender(kind: str, url: str) -> Send:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    agent: Any = Agent(reactor, pool=pool)  # an IAgent; mypy cannot see zope interfaces
    target = url.encode("ascii")
    layered: Any = {
        "agent": agent,
        "cookie": CookieAgent(agent, CookieJar()),
        "decoder": ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)]),
    }.get(kind)
    if layered is not None:
        return lambda body, headers: layered.request(b"POST", target, headers, BytesProducer(body))
    client = HTTPClient(agent)
    if kind == "treq":
        return lambda body, headers: client.request(
            "POST",
            url,
            headers=headers,
            data=BytesProducer(body),
            unbuffered=True,
            allow_redirects=False,
        )
    if kind == "treq-bytes":
        return lambda body, headers: client.request(
            "POST", url, headers=headers, data=body, unbuffered=True, allow_redirects=False
        )
    raise SystemExit(f"unknown client {kind!r}: agent, cookie, decoder, treq or treq-bytes")


def main(kind: str, port: str, url: str) -> None:
    site = Site(Relay(sender(kind, url)))
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log: not under test
    reactor.listenTCP(int(port), site, backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
