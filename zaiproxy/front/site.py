# -*- test-case-name: tests.test_site -*-
"""
The HTTP server side: a Site whose channels enforce the request limits
before a body is buffered, answer bad requests in JSON, and can be counted
and closed at shutdown.

twisted.web reads the whole request body (into memory or a temporary file)
before the resource sees it, so the size limit has to live here, where the
length is first known and each chunk arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http import datetimeToString

from zaiproxy.dialects import errorBody
from zaiproxy.relay.routes import guessDialect

__all__ = ["ProxyChannel", "ProxyRequest", "ProxySite"]

#: How long a rejected client may keep sending before it is cut off: long
#: enough for it to read our answer instead of a connection reset.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}


class ProxyRequest(server.Request):
    """
    A request that refuses an oversized body as soon as it can tell.
    """

    _received = 0
    _rejected = False

    @property
    def proxyChannel(self) -> ProxyChannel:
        """
        The channel, as the L{ProxyChannel} that L{ProxySite} always builds.
        """
        channel = self.channel
        assert isinstance(channel, ProxyChannel)
        return channel

    def gotLength(self, length: int | None) -> None:
        channel = self.proxyChannel
        limit = channel.site.maxRequestBytes
        if length is not None and length > limit:
            self._rejected = True
            # Twisted would otherwise invite the body with "100 Continue".
            self.requestHeaders.removeHeader(b"expect")
            channel.reject(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        channel = self.proxyChannel
        limit = channel.site.maxRequestBytes
        if self._received > limit:
            self._rejected = True
            channel.reject(413, f"request body exceeds the limit of {limit} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Hand the request straight to the root resource.

        The proxy routes on the raw target itself, so twisted.web's resource
        traversal (which splits and unquotes every path segment, and answers
        C{OPTIONS *} on its own) would only cost time.
        """
        site = self.proxyChannel.site
        self.site = site
        self.prepath = []
        self.postpath = []
        self.setHeader(b"date", site.date())
        try:
            body = site.resource.render(self)
        except Exception:
            self.processingFailed(Failure())
            return
        if body is not server.NOT_DONE_YET:
            self.setHeader(b"content-length", b"%d" % (len(body),))
            self.write(b"" if self.method == b"HEAD" else body)
            self.finish()

    def processingFailed(self, reason: Failure) -> None:
        """
        A bug in a resource: log it, and answer JSON rather than HTML.
        """
        self._log.failure("request for {uri} failed", failure=reason, uri=self.uri)
        if self.startedWriting:
            self.channel.forceAbortClient()
            return
        dialect = guessDialect(self.path, self.requestHeaders.hasHeader(b"anthropic-version"))
        body = errorBody(dialect, 500, "internal proxy error")
        self.setResponseCode(500)
        self.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
        self.write(body)
        self.finish()


class ProxyChannel(http.HTTPChannel):
    """
    An HTTP connection with a deadline for request headers, JSON answers to
    malformed requests, and a lingering close after a refusal.
    """

    log = Logger()
    _headerTimer: IDelayedCall | None = None
    _lingerTimer: IDelayedCall | None = None
    _awaitingHeaders = True
    _rejecting = False
    _lingered = 0
    _host: Any = None
    site: ProxySite

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def getHost(self) -> Any:
        # Every Request asks for it (a getsockname syscall each time); it
        # does not change over the connection's life.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        if self._rejecting:
            # After a refusal, read and drop what the client still sends so
            # it can read our answer instead of getting a reset.
            self._lingered += len(data)
            if self._lingered > _LINGER_BYTES:
                self.abortConnection()
            return
        if self._awaitingHeaders and self._headerTimer is None and data:
            self._headerTimer = self.callLater(self.site.headerTimeout, self._headersTooSlow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaitingHeaders = False
        self._cancelHeaderTimer()
        super().allHeadersReceived()

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        """
        Twisted splits C{Connection} on spaces only, so C{close, x-foo}
        would keep the connection open: read it as the comma-separated
        token list it is, across every C{Connection} header.
        """
        tokens = {
            token.strip().lower()
            for value in request.requestHeaders.getRawHeaders(b"connection", [])
            for token in value.split(b",")
        }
        if version == b"HTTP/1.1" and b"close" not in tokens:
            return True
        if version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def requestDone(self, request: http.Request) -> None:
        super().requestDone(request)
        self._awaitingHeaders = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelHeaderTimer()
        if self._lingerTimer is not None and self._lingerTimer.active():
            self._lingerTimer.cancel()
        self._lingerTimer = None
        super().connectionLost(reason)
        self.site.channelClosed(self)

    def _cancelHeaderTimer(self) -> None:
        if self._headerTimer is not None:
            if self._headerTimer.active():
                self._headerTimer.cancel()
            self._headerTimer = None

    def _headersTooSlow(self) -> None:
        self._headerTimer = None
        self.reject(408, "request headers were not received in time")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own answer is a bare "400 Bad Request" with no body.
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.reject(431, f"request headers exceed {self.totalHeadersSize} bytes")
        else:
            self.reject(400, "malformed HTTP request")

    def lineLengthExceeded(self, line: bytes) -> None:
        # One header line longer than LineReceiver.MAX_LENGTH: Twisted would
        # drop the connection without a word.
        self.reject(431, f"a request header line exceeds {self.MAX_LENGTH} bytes")

    def reject(self, status: int, message: str) -> None:
        """
        Answer C{status} at once, whatever state the parser is in, then
        close the connection after a short linger.
        """
        if self._rejecting or self.transport is None:
            return
        self._rejecting = True
        # Parse nothing more, not even lines already buffered.
        self.clearLineBuffer()
        self._cancelHeaderTimer()
        self.setTimeout(None)
        request = self.requests[-1] if self.requests else None
        headers = request.requestHeaders if request is not None else None
        path = getattr(self, "_path", b"")
        path = path if isinstance(path, bytes) else b""
        dialect = guessDialect(
            path,
            headers is not None and headers.hasHeader(b"anthropic-version"),
        )
        body = errorBody(dialect, status, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS.get(status, b"Error"), len(body))
            + body
        )
        self.site.rejected(getattr(self, "_command", b"-"), path, status, len(body))
        loseWrite = getattr(self.transport, "loseWriteConnection", None)
        if loseWrite is not None:
            loseWrite()
        else:
            self.transport.loseConnection()
        self._lingerTimer = self.callLater(_LINGER_SECONDS, self.abortConnection)

    def abortConnection(self) -> None:
        """
        Close the connection at once, dropping whatever is unsent.
        """
        # Every stream transport a server protocol is given (TCP, Unix,
        # TLS) has abortConnection; Protocol types it as ITransport | None.
        cast(ITCPTransport, self.transport).abortConnection()


_T = TypeVar("_T")


class InFlight(Generic[_T]):
    """
    What is still in progress (client connections, relays), so shutdown
    can wait for it to empty, or cut what is left.
    """

    def __init__(self) -> None:
        self._items: set[_T] = set()
        self._waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[_T]:
        # A copy: cutting an item removes it while the caller iterates.
        return iter(list(self._items))

    def add(self, item: _T) -> None:
        self._items.add(item)

    def discard(self, item: _T) -> None:
        self._items.discard(item)
        if not self._items:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def whenEmpty(self) -> Deferred[None]:
        """
        Fires once nothing is left in progress.
        """
        if not self._items:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter


class ProxySite(server.Site):
    """
    The site: its channels, its limits, and where refusals are reported.
    """

    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: Any,
        reactor: Any,
        maxRequestBytes: int,
        headerTimeout: float,
        idleTimeout: float,
        onRejected: Callable[[bytes, bytes, int, int], None],
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=idleTimeout, parsePOSTFormSubmission=False)
        self.maxRequestBytes = maxRequestBytes
        self.headerTimeout = headerTimeout
        self.channels: InFlight[ProxyChannel] = InFlight()
        self._onRejected = onRejected
        self.noisy = False

    # Twisted's annotation names only the protocol-negotiating wrapper that
    # HTTPFactory builds; the proxy builds a plain HTTP/1.1 channel.
    def buildProtocol(self, addr: Any) -> ProxyChannel:  # type: ignore[override]
        channel = ProxyChannel()
        channel.factory = self
        channel.site = self
        channel.requestFactory = self.requestFactory
        # As HTTPFactory.buildProtocol does: the channel's timers run on the
        # site's reactor, and a float timeout (TimeoutMixin says int) works.
        channel.callLater = self.reactor.callLater  # type: ignore[method-assign,assignment]
        channel.timeOut = self.timeOut  # type: ignore[assignment]
        return channel

    _dateSecond = -1
    _dateValue = b""

    def date(self) -> bytes:
        """
        The Date header value, made once a second rather than per request.
        """
        now = int(self.reactor.seconds())
        if now != self._dateSecond:
            self._dateSecond = now
            self._dateValue = datetimeToString(now)
        return self._dateValue

    def channelClosed(self, channel: ProxyChannel) -> None:
        self.channels.discard(channel)

    def rejected(self, method: bytes, path: bytes, status: int, bodyBytes: int) -> None:
        self._onRejected(method, path, status, bodyBytes)

    def log(self, request: http.Request) -> None:
        """
        No Common Log Format line: the proxy writes its own access log.
        """
