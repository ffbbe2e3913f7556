"""
Tests for L{zaiproxy.relay.upstream}.
"""

from __future__ import annotations

import io
import tempfile
from typing import Any

import pytest_twisted
import treq
from support.stack import UPSTREAM_KEY
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from zaiproxy.fake import FakeZai, parseScenario
from zaiproxy.fake.testing import startFake
from zaiproxy.relay.upstream import BytesProducer, Upstream, bodyProducerFor


def test_bytesProducer() -> None:
    """
    A body in memory is written in one call, with its length known.
    """
    transport = StringTransport()
    producer = BytesProducer(b"hello")
    assert producer.length == 5
    done = producer.startProducing(transport)
    assert done.called
    assert transport.value() == b"hello"


def test_bodyProducerFor() -> None:
    """
    Small bodies (BytesIO) are sent from memory, large ones (a temporary
    file) streamed with their length; empty bodies send none.
    """
    cooperator = task.Cooperator(started=False)
    assert bodyProducerFor(io.BytesIO(b""), cooperator) is None
    small = bodyProducerFor(io.BytesIO(b"abc"), cooperator)
    # None first: mypy-zope finds isinstance on "IBodyProducer | None" never true.
    assert small is not None
    assert isinstance(small, BytesProducer) and small.length == 3
    with tempfile.TemporaryFile() as f:
        assert bodyProducerFor(f, cooperator) is None
        f.write(b"x" * 200_000)
        large = bodyProducerFor(f, cooperator)
        assert large is not None
        assert isinstance(large, FileBodyProducer)
        assert large.length == 200_000
        assert f.tell() == 0


def test_pool(reactor: Any) -> None:
    """
    The pool keeps UPSTREAM_POOL_SIZE idle connections per host, closed
    before a typical load balancer's keep-alive timeout.
    """
    upstream = Upstream(reactor, connectTimeout=3.0, poolSize=17)
    assert upstream.pool.maxPersistentPerHost == 17
    assert upstream.pool.cachedConnectionTimeout < 60
    assert upstream.pool.persistent


@pytest_twisted.ensureDeferred
async def test_treqClientRefusesCookies(reactor: Any) -> None:
    """
    The treq client for non-relay calls never stores upstream cookies, so
    it can never replay one.
    """
    fake = FakeZai(reactor, apiKey=None, defaults=parseScenario("cookie=true"))
    running = await startFake(reactor, fake)
    upstream = Upstream(reactor, connectTimeout=3.0, poolSize=2)
    try:
        for _ in range(2):
            response = await upstream.client.get(running.url("/api/coding/paas/v4/models"), unbuffered=True)
            assert response.headers.getRawHeaders(b"set-cookie")
            await response.content()
        assert [r.header(b"cookie") for r in fake.received] == [[], []]
    finally:
        await upstream.close()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_requestReusesConnections(reactor: Any) -> None:
    """
    Sequential requests reuse one pooled connection.
    """
    fake = FakeZai(reactor, apiKey=UPSTREAM_KEY)
    running = await startFake(reactor, fake)
    upstream = Upstream(reactor, connectTimeout=3.0, poolSize=4)
    try:
        for _ in range(3):
            response = await upstream.request(
                b"GET",
                running.url("/api/anthropic/v1/models").encode(),
                Headers({b"x-api-key": [UPSTREAM_KEY.encode()]}),
                None,
            )
            assert response.code == 200
            await treq.content(response)
        assert len(fake.received) == 3
        [(_, idle)] = upstream.pool._connections.items()
        assert len(idle) == 1
    finally:
        await upstream.close()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_agentParsesEachURLOnce(reactor: Any) -> None:
    """
    The relay's Agent keeps each upstream URL parsed (a bounded cache) and
    sends the right Host header itself.
    """
    fake = FakeZai(reactor, apiKey=None)
    running = await startFake(reactor, fake)
    upstream = Upstream(reactor, connectTimeout=3.0, poolSize=2)
    agent = upstream.agent
    try:
        url = running.url("/api/coding/paas/v4/models?x=1").encode()
        for _ in range(2):
            response = await upstream.request(b"GET", url, Headers(), None)
            await treq.content(response)
        assert list(agent._targets) == [url]
        assert [r.header(b"host") for r in fake.received] == [[b"127.0.0.1:%d" % running.port]] * 2
        assert [r.uri for r in fake.received] == [b"/api/coding/paas/v4/models?x=1"] * 2
        agent._MAX_TARGETS = 1
        other = running.url("/api/coding/paas/v4/models").encode()
        response = await upstream.request(b"GET", other, None, None)
        await treq.content(response)
        assert list(agent._targets) == [url]
    finally:
        await upstream.close()
        await running.stop()
