"""
Tests for L{zaiproxy.front.access}: the admin token in front of /metrics and
/admin/*, the loopback rule, and the separate admin port.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from support.doubles import RequestDouble
from support.stack import Stack
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.resource import Resource

from zaiproxy.fake.testing import RawResponse, portOf, rawRequest
from zaiproxy.front.access import AdminGate, Credentials, isLoopbackAddress

TOKEN = "admin-token-5e1f2a"


class Inner(Resource):
    isLeaf = True
    calls = 0

    def render(self, request: Any) -> bytes:
        self.calls += 1
        return b"inner"


def gate(token: str, presented: bytes | None, host: str, loopbackOnly: bool) -> tuple[int, bytes, Inner, Any]:
    inner = Inner()
    request = RequestDouble([b""])
    request.client = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 5555)
    if presented is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [presented])
    body = AdminGate(inner, Credentials(None, token), loopbackOnly).render(request.asRequest())
    return request.responseCode or 200, body, inner, request


@pytest.mark.parametrize(
    "token, presented, host, loopbackOnly, status",
    [
        # No token: /admin/* from loopback only, /metrics open.
        ("", None, "127.0.0.1", True, 200),
        ("", None, "127.5.5.5", True, 200),
        ("", None, "::1", True, 200),
        ("", None, "10.1.2.3", True, 403),
        ("", None, "fe80::1", True, 403),
        ("", b"Bearer anything", "10.1.2.3", True, 403),
        ("", None, "10.1.2.3", False, 200),
        # A token: needed from everywhere, loopback included.
        (TOKEN, None, "127.0.0.1", True, 401),
        (TOKEN, None, "127.0.0.1", False, 401),
        (TOKEN, b"Bearer wrong", "10.1.2.3", True, 401),
        (TOKEN, TOKEN.encode(), "10.1.2.3", True, 401),
        (TOKEN, b"Bearer " + TOKEN.encode() + b"x", "10.1.2.3", True, 401),
        (TOKEN, b"Bearer " + TOKEN.encode(), "10.1.2.3", True, 200),
        (TOKEN, b"Bearer " + TOKEN.encode(), "10.1.2.3", False, 200),
        (TOKEN, b"Bearer " + TOKEN.encode() + b" ", "127.0.0.1", True, 200),
    ],
)
def test_gate(token: str, presented: bytes | None, host: str, loopbackOnly: bool, status: int) -> None:
    got, body, inner, request = gate(token, presented, host, loopbackOnly)
    assert got == status
    assert inner.calls == (1 if status == 200 else 0)
    if status == 401:
        assert request.responseHeaders.getRawHeaders(b"www-authenticate") == [
            b'Bearer realm="zaiproxy-admin"'
        ]
        assert json.loads(body)["error"] == {
            "type": "authentication_error",
            "message": "this endpoint needs Authorization: Bearer <ADMIN_TOKEN>",
        }
        assert TOKEN.encode() not in body
    elif status == 403:
        assert json.loads(body)["error"]["type"] == "permission_error"


def test_tokenChangesLive() -> None:
    """
    The gate reads the credentials on every request (a reload swaps them).
    """
    inner = Inner()
    credentials = Credentials(None, "")
    resource = AdminGate(inner, credentials, loopbackOnly=True)
    request = RequestDouble([b""])
    request.client = IPv4Address("TCP", "127.0.0.1", 1)
    resource.render(request.asRequest())
    assert inner.calls == 1
    credentials.adminToken = TOKEN
    request = RequestDouble([b""])
    request.client = IPv4Address("TCP", "127.0.0.1", 1)
    resource.render(request.asRequest())
    assert (request.responseCode, inner.calls) == (401, 1)


def test_isLoopbackAddress() -> None:
    assert isLoopbackAddress(IPv4Address("TCP", "127.0.0.1", 80))
    assert isLoopbackAddress(IPv6Address("TCP", "::1", 80))
    assert isLoopbackAddress(UNIXAddress("/run/zaiproxy.sock"))
    assert not isLoopbackAddress(IPv4Address("TCP", "0.0.0.0", 80))
    assert not isLoopbackAddress(IPv6Address("TCP", "::", 80))
    assert not isLoopbackAddress(IPv4Address("TCP", "10.0.0.1", 80))


# -- through the proxy ---------------------------------------------------------------


async def call(reactor: Any, port: int, method: bytes, path: bytes, headers: Any = ()) -> RawResponse:
    client = await rawRequest(reactor, port, method, path, list(headers), b"")
    await client.closed.addErrback(lambda f: None)
    return client.response()


@pytest_twisted.ensureDeferred
async def test_adminTokenOnMainPort(reactor: Any, makeStack: Any) -> None:
    """
    With ADMIN_TOKEN, /metrics and /admin/* on the proxy's port need the
    token, even from loopback; /health and /readyz stay open.
    """
    stack: Stack = await makeStack(ADMIN_TOKEN=TOKEN)
    bearer = [(b"authorization", b"Bearer " + TOKEN.encode())]
    response = await call(reactor, stack.port, b"GET", b"/metrics")
    assert response.status == 401
    assert b"zai_proxy" not in response.body
    response = await call(reactor, stack.port, b"GET", b"/metrics", bearer)
    assert response.status == 200 and b"zai_proxy_build_info" in response.body
    assert (await call(reactor, stack.port, b"POST", b"/admin/reset-rate-limit")).status == 401
    response = await call(reactor, stack.port, b"POST", b"/admin/reset-rate-limit", bearer)
    assert (response.status, json.loads(response.body)) == (
        200,
        {
            "status": "reset",
            "current_rate": 1000.0,
            "ceiling": 1000.0,
            "concurrency_limit": 200,
            "window_restarted": True,
            "quota_hold_cleared": False,
        },
    )
    assert (await call(reactor, stack.port, b"GET", b"/health")).status == 200
    assert (await call(reactor, stack.port, b"GET", b"/readyz")).status == 200
    assert stack.fake.received == []


@pytest_twisted.ensureDeferred
async def test_adminListen(reactor: Any, makeStack: Any) -> None:
    """
    With --admin-listen, /metrics and /admin/* move to the admin port: the
    proxy's port answers them 404 in JSON; the admin port serves them with
    /health and /readyz and forwards nothing.
    """
    stack: Stack = await makeStack(adminListen=["tcp:0:interface=127.0.0.1"])
    admin = portOf(stack.proxy.adminPorts[0])
    assert admin != stack.port
    for method, path in ((b"GET", b"/metrics"), (b"POST", b"/admin/reset-rate-limit")):
        response = await call(reactor, stack.port, method, path)
        assert response.status == 404, path
        assert json.loads(response.body)["error"]["message"] == "no route for this path on the proxy"
    assert (await call(reactor, stack.port, b"GET", b"/health")).status == 200
    response = await call(reactor, admin, b"GET", b"/metrics")
    assert response.status == 200
    # The proxy's own 404s above are counted; the admin port is not a route.
    assert (
        b'zai_proxy_requests_total{method="GET",path="unknown",status_code="404",variant="production"} 1.0'
        in response.body
    )
    response = await call(reactor, admin, b"POST", b"/admin/reset-rate-limit")
    assert response.status == 200
    for path in (b"/health", b"/readyz", b"/health?x=1"):
        assert (await call(reactor, admin, b"GET", path)).status == 200
    for path in (b"/v1/messages", b"/", b"/metrics/x"):
        response = await call(reactor, admin, b"POST", path)
        assert response.status == 404
        assert json.loads(response.body)["error"]["message"] == "no such endpoint on the admin port"
    assert stack.fake.received == []


@pytest_twisted.ensureDeferred
async def test_adminListenWithToken(reactor: Any, makeStack: Any) -> None:
    """
    Both together: the admin port asks for the token too.
    """
    stack: Stack = await makeStack(adminListen=["tcp:0:interface=127.0.0.1"], ADMIN_TOKEN=TOKEN)
    admin = portOf(stack.proxy.adminPorts[0])
    assert (await call(reactor, admin, b"GET", b"/metrics")).status == 401
    bearer = [(b"authorization", b"Bearer " + TOKEN.encode())]
    assert (await call(reactor, admin, b"GET", b"/metrics", bearer)).status == 200
    assert (await call(reactor, admin, b"GET", b"/health")).status == 200
    await stack.proxy.stopService()
    assert stack.proxy.adminPorts == []
