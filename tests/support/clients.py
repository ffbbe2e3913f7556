"""
What clients send, and helpers to read what comes back and to wait on
real sockets.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet import task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from support.stack import Stack
from zaiproxy.fake.testing import RawClient

ANTHROPIC = [
    (b"content-type", b"application/json"),
    (b"anthropic-version", b"2023-06-01"),
    (b"x-api-key", b"client-key"),
]
OPENAI = [(b"content-type", b"application/json"), (b"authorization", b"Bearer client-key")]


def messagesBody(stream: bool = True, text: str = "hi") -> bytes:
    return json.dumps(
        {
            "model": "glm-4.7",
            "max_tokens": 100,
            "stream": stream,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()


def chatBody(stream: bool = True) -> bytes:
    return json.dumps(
        {"model": "glm-4.7", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


def events(body: bytes) -> list[tuple[str | None, str]]:
    """
    The (event, data) pairs of an SSE body; asserts it ends on a boundary.
    """
    assert body.endswith(b"\n\n"), body[-80:]
    parsed = []
    for frame in body.decode().split("\n\n")[:-1]:
        name, data = None, []
        for line in frame.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        parsed.append((name, "\n".join(data)))
    return parsed


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def ended(client: RawClient) -> None:
    """
    Wait until the connection is closed (cleanly or not).
    """
    await client.closed.addErrback(lambda failure: None)


async def settled(reactor: Any, read: Callable[[], int], step: float = 0.2, limit: float = 10.0) -> int:
    """
    Wait until C{read()} stops changing; return its value.
    """
    last = read()
    waited = 0.0
    while waited < limit:
        await sleep(reactor, step)
        waited += step
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError("value kept changing")


async def connect(stack: Stack, reactor: Any, data: bytes) -> RawClient:
    """
    Open a connection to the proxy and send C{data} (possibly an incomplete
    request).
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", stack.port)
    client = await endpoint.connect(ClientFactory.forProtocol(lambda: RawClient(data)))
    assert isinstance(client, RawClient)
    return client


#: A small non-streaming Messages call.
LOAD_BODY = b'{"model":"glm-4.7","max_tokens":8,"stream":false,"messages":[{"role":"user","content":"hi"}]}'


class SocketLoad:
    """
    Offers C{rate} requests a second of the reactor to a proxy on a real
    socket.
    """

    def __init__(self, reactor: Any, url: str, rate: float, body: bytes = LOAD_BODY) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 50
        self._client = HTTPClient(Agent(reactor, pool=self._pool))
        self._url = url
        self._body = body
        self.answers: dict[int, int] = {}
        self._loop = task.LoopingCall(self._send)
        self._loop.clock = reactor
        self._rate = rate
        self.outstanding: set[Any] = set()

    def start(self) -> None:
        self._loop.start(1.0 / self._rate, now=True)

    def _send(self) -> None:
        sent = self._client.post(
            self._url, data=self._body, headers=Headers({b"content-type": [b"application/json"]})
        )
        sent.addCallback(self._answered)
        sent.addErrback(lambda failure: None)
        self.outstanding.add(sent)
        sent.addBoth(lambda _: self.outstanding.discard(sent))

    def _answered(self, response: Any) -> Any:
        self.answers[response.code] = self.answers.get(response.code, 0) + 1
        return response.content()

    async def stop(self) -> None:
        self._loop.stop()
        for sent in list(self.outstanding):
            await sent
        await self._pool.closeCachedConnections()
