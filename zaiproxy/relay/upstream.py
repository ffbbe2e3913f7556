# -*- test-case-name: tests.test_upstream -*-
"""
The proxy's HTTP client side: one persistent connection pool to Z.AI.

The relay talks to a plain L{Agent} on that pool. treq's L{HTTPClient}
costs 0.2-0.3 ms more per request on the relay path (bench/layers.py:
mostly its URL handling, plus its cookie agent), stores upstream cookies,
and would decode bytes the relay must pass on unchanged. Calls that are
not relays (the quota poller) use treq over the same pool, with a cookie
jar that refuses every cookie.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import IO, Any, cast

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.web.client import BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from zaiproxy.twistedprivate import TargetCachingAgent

__all__ = ["BodyProtocol", "BytesProducer", "DiscardBody", "DrainBody", "Upstream", "bodyProducerFor"]

# Below Z.AI's (and most load balancers') keep-alive timeout, so the proxy
# closes an idle connection before the far end does and never sends a
# request into a socket that is being closed.
_CACHED_CONNECTION_TIMEOUT = 50


@implementer(IBodyProducer)
class BytesProducer:
    """
    A body already in memory, written in one go.

    L{FileBodyProducer} would spend a cooperator turn (a reactor iteration)
    per 64 KiB even for a 1 KiB body.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def bodyProducerFor(content: IO[bytes], cooperator: task.Cooperator) -> IBodyProducer | None:
    """
    A producer for a request body twisted.web has already received.

    twisted.web keeps bodies under 100 kB in a L{BytesIO} and larger ones in
    a temporary file; the file is streamed, not read into memory.
    """
    getvalue = getattr(content, "getvalue", None)
    if getvalue is not None:
        body = getvalue()
        return BytesProducer(body) if body else None
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    if size == 0:
        return None
    return FileBodyProducer(content, cooperator=cooperator)


class BodyProtocol(Protocol):
    """
    A protocol for L{IResponse.deliverBody}, with its transport as the
    producer it is.
    """

    @property
    def producer(self) -> IPushProducer:
        # deliverBody connects the protocol to a transport that provides
        # IPushProducer (IResponse.deliverBody says so); Protocol types it
        # ITransport | None, so the type is restated here, unchecked.
        return cast(IPushProducer, self.transport)


class DiscardBody(BodyProtocol):
    """
    A body nobody will read: close the connection rather than download it.
    """

    def connectionMade(self) -> None:
        self.producer.stopProducing()


class DrainBody(BodyProtocol):
    """
    A short body to read and drop, so its connection returns to the pool.
    """

    def dataReceived(self, data: bytes) -> None:
        pass


@implementer(IAgentEndpointFactory)
class EndpointCache:
    """
    One endpoint per upstream origin, made once.

    Twisted's Agent builds a new endpoint for every request (IDNA-checking
    the host name each time) although a warm pool never uses it; there are
    only ever two origins here.
    """

    def __init__(self, reactor: Any, connectTimeout: float) -> None:
        self._reactor = reactor
        self._connectTimeout = connectTimeout
        self._policy = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._connectTimeout
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                raise ValueError(f"unsupported scheme {uri.scheme!r}")
            self._endpoints[key] = endpoint
        return endpoint


class Upstream:
    """
    The pool, the agent the relay uses, and a treq client for the rest.
    """

    def __init__(self, reactor: Any, connectTimeout: float, poolSize: int) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = poolSize
        self.pool.cachedConnectionTimeout = _CACHED_CONNECTION_TIMEOUT
        self.agent: TargetCachingAgent = TargetCachingAgent.usingEndpointFactory(
            reactor, EndpointCache(reactor, connectTimeout), pool=self.pool
        )
        self.client = HTTPClient(
            self.agent,
            cookiejar=IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )
        self.cooperator = task.Cooperator(scheduler=_scheduler(reactor), started=True)

    def request(
        self, method: bytes, url: bytes, headers: Headers | None, body: IBodyProducer | None
    ) -> Deferred[IResponse]:
        """
        Send one request; the Deferred fires with the response at its headers.
        """
        return self.agent.request(method, url, headers, body)

    def close(self) -> Deferred[None]:
        """
        Close idle pooled connections; in-flight ones close as they finish.
        """
        self.cooperator.stop()
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


def _scheduler(reactor: IReactorTime) -> Any:
    def schedule(work: Any) -> Any:
        return reactor.callLater(0, work)

    return schedule
