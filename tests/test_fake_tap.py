"""
Tests for the C{zaiproxy-fake} tap: its options and the service it makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.python import usage

from zaiproxy.fake import Scenario
from zaiproxy.fake.tap import DEFAULT_LISTEN, Options, makeService
from zaiproxy.fake.testing import RawClient


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    """
    Loopback port 9999, no key, the default scenario.
    """
    options = parse()
    assert options["listen"] == [DEFAULT_LISTEN] == ["tcp:9999:interface=127.0.0.1"]
    assert options["api-key"] is None
    assert options["defaults"] == Scenario()


def test_options() -> None:
    """
    C{--listen} repeats; C{--scenario} is parsed into the defaults.
    """
    options = parse(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "-l",
        "unix:/tmp/x.sock",
        "--api-key",
        "k",
        "--scenario",
        "mode=error code=1308, events=3",
    )
    assert options["listen"] == ["tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock"]
    assert options["api-key"] == "k"
    assert options["defaults"] == Scenario(mode="error", code="1308", events=3)


def test_badScenario() -> None:
    """
    A bad C{--scenario} is a usage error naming the culprit.
    """
    with pytest.raises(usage.UsageError, match="bogus"):
        parse("--scenario", "bogus=1")


def test_helpDocumentsEveryOption() -> None:
    """
    The help text mentions every option.
    """
    text = str(Options())
    for option in ("--listen", "--api-key", "--scenario", "tcp:9999:interface=127.0.0.1"):
        assert option in text


@pytest_twisted.ensureDeferred
async def test_makeService(reactor: Any, tmp_path: Path) -> None:
    """
    The service listens on every C{--listen} and serves the fake with the
    key and default scenario given.
    """
    socket = tmp_path / "fake.sock"
    options = parse(
        "--listen",
        f"unix:{socket}",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--api-key",
        "k",
        "--scenario",
        "events=2 deltaText=yo",
    )
    service = makeService(options)
    assert isinstance(service, MultiService)
    children = list(service)
    assert len(children) == 2
    assert all(isinstance(c, StreamServerEndpointService) for c in children)
    service.startService()
    try:
        request = (
            b"POST /api/paas/v4/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer k\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        endpoint = UNIXClientEndpoint(reactor, str(socket))
        client = await endpoint.connect(ClientFactory.forProtocol(lambda: RawClient(request)))
        await client.closed
        response = client.response()
        assert response.status == 200
        assert b'"content":"yoyo"' in response.body
    finally:
        await service.stopService()
