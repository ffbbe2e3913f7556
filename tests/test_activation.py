"""
Tests for L{zaiproxy.config.activation}: which sockets the proxy listens on.

The descriptors are real sockets, moved to consecutive descriptor numbers
the way systemd passes them; the end-to-end tests serve real requests over
an adopted socket that the test holds the way systemd does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from support.stack import UPSTREAM_KEY
from twisted.internet import task

from zaiproxy.config.activation import (
    InheritedSocket,
    ListenChoice,
    Listener,
    chooseListeners,
    inheritedSockets,
)
from zaiproxy.config.settings import loadSettings
from zaiproxy.fake import FakeZai
from zaiproxy.fake.testing import RawClient, portOf, rawRequest, startFake
from zaiproxy.service import ProxyService

PID = 4242
ANTHROPIC = [(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")]
BODY = b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}]}'


def placeAt(sockets: list[Any]) -> int:
    """
    Duplicate C{sockets} (sockets or raw descriptors) onto consecutive free
    descriptors, as systemd passes them; return the first.
    """
    start = 200
    while True:
        wanted = range(start, start + len(sockets))
        if all(not _isOpen(fd) for fd in wanted):
            break
        start += len(sockets) + 1
    for fd, s in zip(wanted, sockets, strict=True):
        os.dup2(s if isinstance(s, int) else s.fileno(), fd, inheritable=False)
    return start


def _isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    """
    Sockets and descriptors to close after the test.
    """
    things: list[Any] = []
    yield things
    for thing in things:
        if isinstance(thing, int):
            if _isOpen(thing):
                os.close(thing)
        else:
            thing.close()


def listening(
    opened: list[Any], family: int = socket.AF_INET, address: Any = ("127.0.0.1", 0)
) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    opened.append(s)
    s.bind(address)
    s.listen(16)
    return s


def test_notActivated() -> None:
    """
    Without LISTEN_PID, or with another process's, or with a LISTEN_FDS
    that is not a number, nothing is inherited and --listen is used as given.
    """
    for environ in (
        {},
        {"LISTEN_PID": str(PID + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "zaiproxy"},
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "one"},
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""},
    ):
        assert inheritedSockets(environ, PID) == []
        assert chooseListeners(None, ["tcp:8080", "unix:/run/z.sock"], environ, PID) == ListenChoice(
            ("tcp:8080", "unix:/run/z.sock"), "--listen", (), ()
        )


def test_familiesAndNames(opened: list[Any]) -> None:
    """
    Each descriptor is probed for its real address family; LISTEN_FDNAMES
    names them in order.
    """
    four = listening(opened)
    unix = listening(opened, socket.AF_UNIX, f"\0zaiproxy-test-{os.getpid()}")
    start = placeAt([four, unix])
    opened.extend([start, start + 1])
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:local"}
    found = inheritedSockets(environ, PID, start)
    assert found == [
        InheritedSocket(0, start, "web", socket.AF_INET, None),
        InheritedSocket(1, start + 1, "local", socket.AF_UNIX, None),
    ]
    assert [s.description for s in found] == [
        f"systemd:domain=INET:index=0 (fd {start}, web)",
        f"systemd:domain=UNIX:index=1 (fd {start + 1}, local)",
    ]
    # The environment is only read.
    assert environ == {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:local"}


def test_ipv6(opened: list[Any]) -> None:
    """
    An IPv6 socket (what ListenStream=8080 makes) is adopted as INET6.
    """
    try:
        six = listening(opened, socket.AF_INET6, ("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    start = placeAt([six])
    opened.append(start)
    found = inheritedSockets({"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}, PID, start)
    assert found == [InheritedSocket(0, start, None, socket.AF_INET6, None)]
    assert found[0].description == f"systemd:domain=INET6:index=0 (fd {start})"


def test_unusable(opened: list[Any]) -> None:
    """
    A datagram socket, a stream socket that does not listen, a pipe and a
    closed descriptor are reported and skipped, and probing them leaks no
    descriptor; with nothing usable, --listen is used.
    """
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected, peer = socket.socketpair()
    opened.extend([udp, connected, peer])
    readEnd, writeEnd = os.pipe()
    opened.extend([readEnd, writeEnd])
    start = placeAt([udp, connected, readEnd, peer])
    opened.extend([start, start + 1, start + 2])
    os.close(start + 3)
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "4"}
    before = sorted(os.listdir("/proc/self/fd"))
    found = inheritedSockets(environ, PID, start)
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert [(s.family, s.problem) for s in found] == [
        (socket.AF_INET, "not a stream socket (ListenStream= is needed)"),
        (socket.AF_UNIX, "not listening (Accept=yes is not supported)"),
        (None, "not a socket (Socket operation on non-socket)"),
        (None, "not open (Bad file descriptor)"),
    ]
    assert chooseListeners(None, ["tcp:8080"], environ, PID, start) == ListenChoice(
        ("tcp:8080",),
        "--listen",
        (),
        (
            f"Ignoring systemd:domain=INET:index=0 (fd {start}) passed by systemd: "
            "not a stream socket (ListenStream= is needed)",
            f"Ignoring systemd:domain=UNIX:index=1 (fd {start + 1}) passed by systemd: "
            "not listening (Accept=yes is not supported)",
            f"Ignoring systemd:domain=?:index=2 (fd {start + 2}) passed by systemd: "
            "not a socket (Socket operation on non-socket)",
            f"Ignoring systemd:domain=?:index=3 (fd {start + 3}) passed by systemd: "
            "not open (Bad file descriptor)",
            "No usable socket passed by systemd; listening on --listen tcp:8080",
        ),
    )


def test_inheritedWinOverListen(opened: list[Any]) -> None:
    """
    With a usable inherited socket, --listen is not used, and the choice
    says so; an unusable one beside it is only warned about.
    """
    tcp = listening(opened)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    opened.append(udp)
    start = placeAt([tcp, udp])
    opened.extend([start, start + 1])
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "zaiproxy:other"}
    choice = chooseListeners(None, ["tcp:8080"], environ, PID, start)
    assert choice.source == "systemd"
    assert [type(item) for item in choice.listen] == [Listener]
    listener = choice.listen[0]
    assert isinstance(listener, Listener)
    assert listener.description == f"systemd:domain=INET:index=0 (fd {start}, zaiproxy)"
    assert (listener.endpoint.fileno, listener.endpoint.addressFamily) == (start, socket.AF_INET)  # type: ignore[attr-defined]
    assert choice.notes == (
        "Socket activation: listening on 1 socket(s) passed by systemd (LISTEN_FDS=2) instead of --listen "
        "tcp:8080",
    )
    assert choice.warnings == (
        f"Ignoring systemd:domain=INET:index=1 (fd {start + 1}, other) passed by systemd: "
        "not a stream socket (ListenStream= is needed)",
    )


def test_tapImportKeepsTheEnvironment() -> None:
    """
    Importing the tap (which twistd does to parse options, before
    makeService) does not import twisted.internet.endpoints, whose import
    deletes LISTEN_PID and LISTEN_FDS.
    """
    code = "import sys, zaiproxy.tap; print('twisted.internet.endpoints' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "False\n", "")


async def _proxy(reactor: Any, upstreamURL: str, listen: Any) -> ProxyService:
    settings, _ = loadSettings(
        {
            "ZAI_API_KEY": UPSTREAM_KEY,
            "ZAI_TARGET_URL": upstreamURL,
            "RATE_LIMIT_STATE_FILE": "off",
            "DRAIN_TIMEOUT": "2",
            "DRAIN_GRACE": "0",
        }
    )
    proxy = ProxyService(reactor, settings, listen)
    proxy.startService()
    return proxy


async def _answered(client: RawClient) -> Any:
    await client.closed.addErrback(lambda f: None)
    response = client.response()
    return response.status, json.loads(response.body)["type"]


@pytest_twisted.ensureDeferred
async def test_restartOnHeldSocket(reactor: Any, opened: list[Any]) -> None:
    """
    The socket systemd holds outlives the proxy: the proxy serves on its
    copy, stopping closes only that copy, a client arriving while no proxy
    runs is queued by the kernel (not refused), and the next proxy on the
    same socket answers it.
    """
    upstream = await startFake(reactor, FakeZai(reactor, apiKey=UPSTREAM_KEY))
    held = listening(opened)
    port = held.getsockname()[1]
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "zaiproxy"}
    proxies: list[ProxyService] = []
    waiting: RawClient | None = None
    try:
        start = placeAt([held])
        opened.append(start)
        choice = chooseListeners(reactor, ["tcp:8080"], environ, PID, start)
        proxies.append(await _proxy(reactor, upstream.url("/api/anthropic"), choice.listen))
        assert portOf(proxies[0].ports[0]) == port
        # Adopting closed the passed descriptor; the proxy uses its own copy.
        assert not _isOpen(start)
        first = await rawRequest(reactor, port, b"POST", b"/v1/messages", ANTHROPIC, BODY)
        assert await _answered(first) == (200, "message")

        await proxies[0].stopService()
        waiting = await rawRequest(reactor, port, b"POST", b"/v1/messages", ANTHROPIC, BODY)
        await task.deferLater(reactor, 0.3, lambda: None)
        assert (waiting.raw, waiting.lostReason) == (b"", None)
        assert len(upstream.fake.received) == 1

        start = placeAt([held])
        opened.append(start)
        choice = chooseListeners(reactor, ["tcp:8080"], environ, PID, start)
        proxies.append(await _proxy(reactor, upstream.url("/api/anthropic"), choice.listen))
        assert await _answered(waiting) == (200, "message")
        assert len(upstream.fake.received) == 2
    finally:
        for proxy in proxies:
            if proxy.running:
                await proxy.stopService()
        held.close()
        if waiting is not None:
            await waiting.closed.addErrback(lambda f: None)
        await upstream.stop()
