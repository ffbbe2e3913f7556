# -*- test-case-name: tests.test_fake -*-
"""
Helpers for tests that run the fake on a real socket: start and stop it on
an ephemeral loopback port, freeze its clock, and talk raw HTTP to it (or to
the proxy) with a client that records every TCP read and can stop reading.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from .server import FakeZai

__all__ = [
    "FrozenClock",
    "RawClient",
    "RawResponse",
    "RunningFake",
    "dechunk",
    "rawRequest",
    "startFake",
]


@implementer(IReactorTime)
class FrozenClock:
    """
    A clock whose C{seconds()} never moves but whose timers are real: ids,
    C{created} and reset stamps stay the same from run to run while pacing
    still happens on the reactor.
    """

    def __init__(self, reactor: IReactorTime, now: float = 1767225600.0) -> None:
        self._reactor = reactor
        self.now = now

    def seconds(self) -> float:
        return self.now

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        return self._reactor.callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self._reactor.getDelayedCalls()


@attrs.define
class RunningFake:
    """
    A fake listening on C{127.0.0.1:port}.
    """

    fake: FakeZai
    listeningPort: IListeningPort

    @property
    def port(self) -> int:
        address: Any = self.listeningPort.getHost()
        return int(address.port)

    def url(self, path: str = "") -> str:
        """
        C{http://127.0.0.1:<port>} followed by C{path}.
        """
        return f"http://127.0.0.1:{self.port}{path}"

    async def stop(self) -> None:
        """
        Abort what is still open and stop listening.
        """
        self.fake.abortAll()
        stopped = self.listeningPort.stopListening()
        if stopped is not None:
            await stopped


async def startFake(reactor: Any, fake: FakeZai) -> RunningFake:
    """
    Serve C{fake} on an ephemeral loopback port.
    """
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(Site(fake))
    return RunningFake(fake, port)


@attrs.define
class RawResponse:
    """
    A response as raw bytes, split into its parts.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """
    Decode a chunked body; return it and whether the last chunk was seen.
    """
    body = bytearray()
    position = 0
    while True:
        lineEnd = data.find(b"\r\n", position)
        if lineEnd < 0:
            return bytes(body), False
        size = int(data[position:lineEnd].split(b";")[0], 16)
        if size == 0:
            return bytes(body), True
        start = lineEnd + 2
        if start + size > len(data):
            body += data[start:]
            return bytes(body), False
        body += data[start : start + size]
        position = start + size + 2


def portOf(listening: IListeningPort) -> int:
    """
    The TCP port number C{listening} is bound to.
    """
    address = listening.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address))
    return address.port


def delayedCalls(clock: Clock) -> list[DelayedCall]:
    """
    The clock's pending calls as the L{DelayedCall}s they are (C{Clock}
    declares L{IDelayedCall}, which has no C{func} to look at).
    """
    calls = [call for call in clock.getDelayedCalls() if isinstance(call, DelayedCall)]
    assert len(calls) == len(clock.getDelayedCalls())
    return calls


class RawClient(Protocol):
    """
    Send one request and record the answer exactly as the reads came.

    @ivar reads: the bytes of every C{dataReceived}, in order.
    @ivar closed: fires with L{None} when the connection is lost.
    @ivar lostReason: why it was lost, once it was.
    @ivar onRead: called after each read (a test hook).
    """

    def __init__(self, request: bytes) -> None:
        self._request = request
        self.reads: list[bytes] = []
        self.received = 0
        self.closed: Deferred[None] = Deferred()
        self.lostReason: Failure | None = None
        self.onRead: Callable[[RawClient], None] = lambda client: None
        self._waiters: list[tuple[Callable[[RawClient], bool], Deferred[None]]] = []

    @property
    def connection(self) -> tcp.Client:
        """
        The TCP connection (the tests pause, resume and abort it).
        """
        # None first: mypy-zope finds isinstance on "ITransport | None" never true.
        assert self.transport is not None
        assert isinstance(self.transport, tcp.Client)
        return self.transport

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self.received += len(data)
        self.onRead(self)
        self._check()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason
        self._check(final=True)
        self.closed.callback(None)

    @property
    def raw(self) -> bytes:
        return b"".join(self.reads)

    def when(self, condition: Callable[[RawClient], bool]) -> Deferred[None]:
        """
        Fire once C{condition(self)} holds after a read (or errback
        L{ConnectionError} if the connection closes first).
        """
        waiting: Deferred[None] = Deferred()
        if condition(self):
            waiting.callback(None)
        else:
            self._waiters.append((condition, waiting))
        return waiting

    def _check(self, final: bool = False) -> None:
        still = []
        for condition, waiting in self._waiters:
            if condition(self):
                waiting.callback(None)
            elif final:
                waiting.errback(ConnectionError("connection closed first"))
            else:
                still.append((condition, waiting))
        self._waiters = still

    def response(self) -> RawResponse:
        """
        Parse what was received so far (a chunked body is decoded).
        """
        raw = self.raw
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = [
            (name.strip(), value.strip()) for name, _, value in (line.partition(b":") for line in lines[1:])
        ]
        response = RawResponse(status, headers, rest)
        if [v.lower() for v in response.header(b"transfer-encoding")] == [b"chunked"]:
            response.body = dechunk(rest)[0]
        return response

    def headerEnd(self) -> int:
        """
        The offset of the body in the raw bytes, or -1 before the headers.
        """
        at = self.raw.find(b"\r\n\r\n")
        return at + 4 if at >= 0 else -1


async def rawRequest(
    reactor: Any,
    port: int,
    method: bytes,
    path: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> RawClient:
    """
    Connect to C{127.0.0.1:port}, send one request (with C{Connection:
    close}), and return the connected L{RawClient}.
    """
    lines = [b"%s %s %s" % (method, path, version), b"Host: 127.0.0.1:%d" % (port,)]
    lines += [b"%s: %s" % (name, value) for name, value in headers]
    lines += [b"Content-Length: %d" % (len(body),), b"Connection: close"]
    request = b"\r\n".join(lines) + b"\r\n\r\n" + body
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    factory = ClientFactory.forProtocol(lambda: RawClient(request))
    client = await endpoint.connect(factory)
    assert isinstance(client, RawClient)
    return client
