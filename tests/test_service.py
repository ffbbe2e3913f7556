"""
Tests for L{zaiproxy.service}: building the proxy and draining it.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
import treq
from support.stack import Stack
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import ClientFactory

from zaiproxy.config.settings import loadSettings
from zaiproxy.fake.testing import RawClient, rawRequest
from zaiproxy.service import ProxyService

STREAM = b'{"model":"glm-4.7","stream":true,"messages":[{"role":"user","content":"hi"}]}'


async def ended(client: RawClient) -> None:
    await client.closed.addErrback(lambda failure: None)


@pytest_twisted.ensureDeferred
async def test_drainLetsStreamsFinish(reactor: Any, makeStack: Any) -> None:
    """
    Stopping closes the listener at once, but a stream in flight runs to
    its end (terminating chunk included) before the stop completes.
    """
    stack: Stack = await makeStack("events=5 interval=0.2")
    port = stack.port
    client = await rawRequest(reactor, port, b"POST", b"/v1/messages", [], STREAM)
    await client.when(lambda c: b"message_start" in c.raw)
    stopping = stack.proxy.stopService()
    assert not stopping.called
    with pytest.raises(ConnectionRefusedError):
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            ClientFactory.forProtocol(lambda: RawClient(b""))
        )
    await stopping
    assert client.raw.endswith(b"0\r\n\r\n")
    assert b"event: message_stop" in client.raw
    assert stack.fake.received[0].done.result == "completed"
    assert (
        stack.sample(
            "zai_proxy_requests_total",
            method="POST",
            path="/v1/messages",
            status_code="200",
            variant="production",
        )
        == 1
    )


@pytest_twisted.ensureDeferred
async def test_drainTimeoutCutsStreams(reactor: Any, makeStack: Any) -> None:
    """
    Streams still running at DRAIN_TIMEOUT end with an error event (not a
    silent truncation), and the stop completes soon after.
    """
    stack: Stack = await makeStack("events=100 interval=0.1", DRAIN_TIMEOUT="0.3")
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", [], STREAM)
    await client.when(lambda c: b"content_block_delta" in c.raw)
    started = reactor.seconds()
    await stack.proxy.stopService()
    assert reactor.seconds() - started < 1.5
    await ended(client)
    body = client.response().body
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert (
        json.loads(last.split(b"data: ", 1)[1])["error"]["message"]
        == "the proxy is shutting down; the stream was cut"
    )
    assert client.raw.endswith(b"0\r\n\r\n")
    assert await stack.fake.received[0].done == "disconnected"


@pytest_twisted.ensureDeferred
async def test_drainClosesIdleConnections(reactor: Any, stack: Stack) -> None:
    """
    Idle keep-alive connections are closed by the stop, not left to the
    idle timeout.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", stack.port)
    client = await endpoint.connect(
        ClientFactory.forProtocol(lambda: RawClient(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"))
    )
    assert isinstance(client, RawClient)
    await client.when(lambda c: c.raw.endswith(b'{"status":"ready"}'))
    assert not client.closed.called
    started = reactor.seconds()
    await stack.proxy.stopService()
    await ended(client)
    assert reactor.seconds() - started < 1


def test_badListenDescription(reactor: Any) -> None:
    """
    A malformed --listen is found when the service is built.
    """
    settings, _ = loadSettings({"ZAI_API_KEY": "k"})
    with pytest.raises(ValueError):
        ProxyService(reactor, settings, ["tcp:notaport"])


def test_portInUse(reactor: Any, logEvents: list[dict[str, Any]]) -> None:
    """
    A port that cannot be bound stops start-up (exit status 1) with one
    critical line naming the address; ports already bound are closed.
    """
    from twisted.logger import LogLevel, formatEvent

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        settings, _ = loadSettings({"ZAI_API_KEY": "k", "RATE_LIMIT_STATE_FILE": "off"})
        description = f"tcp:{port}:interface=127.0.0.1"
        service = ProxyService(reactor, settings, ["tcp:0:interface=127.0.0.1", description])
        with pytest.raises(SystemExit) as exited:
            service.privilegedStartService()
        assert exited.value.code == 1
        assert service.ports == []
    finally:
        taken.close()
    critical = [formatEvent(e) for e in logEvents if e.get("log_level") == LogLevel.critical]
    assert critical == [f"Cannot listen on 127.0.0.1:{port} ({description}): Address already in use"]


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({}, "Client keys: off (any caller may use the proxied routes)"),
        (
            {"PROXY_API_KEYS": "alice:alice-key-0123456789abcdef"},
            "Client keys: on, 1 key (from PROXY_API_KEYS)",
        ),
        (
            {"PROXY_API_KEYS": "alice:alice-key-0123456789abcdef,bob:bob-key-0123456789abcdef0"},
            "Client keys: on, 2 keys (from PROXY_API_KEYS)",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_startUpSaysWhetherClientKeysAreOn(
    reactor: Any, logEvents: list[dict[str, Any]], env: dict[str, str], line: str
) -> None:
    """
    The start-up log says whether client keys are on and how many there
    are, never the keys.
    """
    from twisted.logger import formatEvent

    settings, _ = loadSettings(
        {"ZAI_API_KEY": "k", "RATE_LIMIT_STATE_FILE": "off", "DRAIN_GRACE": "0", **env}
    )
    service = ProxyService(reactor, settings, ["tcp:0:interface=127.0.0.1"])
    service.startService()
    await service.stopService()
    said = [formatEvent(e) for e in logEvents if formatEvent(e).startswith("Client keys:")]
    assert said == [line]
    assert "key-0123456789abcdef" not in repr(logEvents)


@pytest.mark.parametrize(
    "listen, env, warned",
    [
        ("tcp:0", {}, True),
        ("tcp6:0:interface=\\:\\:", {}, True),
        ("tcp:0:interface=127.0.0.1", {}, False),
        ("unix:{tmp}/zaiproxy.sock", {}, False),
        ("tcp:0", {"PROXY_API_KEYS": "alice:alice-key-0123456789abcdef"}, False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_openProxyWarning(
    reactor: Any,
    tmp_path: Any,
    logEvents: list[dict[str, Any]],
    listen: str,
    env: dict[str, str],
    warned: bool,
) -> None:
    """
    Without client keys, listening beyond loopback (tcp:8080 with no
    interface is every interface) logs a loud warning at start-up.
    """
    from twisted.logger import formatEvent

    settings, _ = loadSettings(
        {"ZAI_API_KEY": "k", "RATE_LIMIT_STATE_FILE": "off", "DRAIN_GRACE": "0", **env}
    )
    service = ProxyService(reactor, settings, [listen.format(tmp=tmp_path)])
    service.startService()
    try:
        where = service._where(service.ports[0])
        warnings = [
            formatEvent(e)
            for e in logEvents
            if e.get("log_level") is not None
            and e["log_level"].name == "warn"
            and "client keys" in formatEvent(e)
        ]
    finally:
        await service.stopService()
    if warned:
        assert where.split(":")[-1] != "0"
        assert warnings == [
            "WARNING: no client keys are configured (PROXY_API_KEYS_FILE, PROXY_API_KEYS) and the proxy "
            f"listens beyond loopback on {where}: the upstream Z.AI quota is open to anyone who can connect"
        ]
    else:
        assert warnings == []


@pytest_twisted.ensureDeferred
async def test_drainGraceKeepsListening(reactor: Any) -> None:
    """
    For DRAIN_GRACE after the stop begins, the port stays open: /readyz
    answers 503 and other requests are still served; then the listeners
    close.
    """
    settings, _ = loadSettings({"ZAI_API_KEY": "k", "RATE_LIMIT_STATE_FILE": "off", "DRAIN_GRACE": "0.5"})
    service = ProxyService(reactor, settings, ["tcp:0:interface=127.0.0.1"])
    service.startService()
    host = service.ports[0].getHost()
    assert isinstance(host, IPv4Address)
    port = host.port
    stopping = service.stopService()
    ready = await treq.get(f"http://127.0.0.1:{port}/readyz", persistent=False)
    assert (ready.code, await ready.content()) == (503, b'{"status":"draining"}')
    health = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
    assert health.code == 200
    assert json.loads(await health.content())["status"] == "draining"
    assert not stopping.called
    await stopping
    with pytest.raises(ConnectionRefusedError):
        await treq.get(f"http://127.0.0.1:{port}/readyz", persistent=False)
