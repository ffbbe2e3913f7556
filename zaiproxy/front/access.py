# -*- test-case-name: tests.test_access -*-
"""
Who may reach what: the credentials in force, the gate in front of
C{/metrics} and C{/admin/*}, and the root resource of the admin-only port.

The credentials live in one mutable holder that every request reads, so a
reload (SIGHUP) swaps client keys and the admin token for the next request
without touching the ones in flight.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Request

from zaiproxy.dialects import Dialect, errorBody
from zaiproxy.front.clientkeys import ClientKeys

__all__ = ["AdminGate", "AdminRoot", "Credentials", "fromLoopback", "isLoopbackAddress"]


@attrs.define
class Credentials:
    """
    The client keys (L{None}: the proxy is open) and the admin token
    (empty: none) in force now.
    """

    clientKeys: ClientKeys | None = None
    adminToken: str = attrs.field(default="", repr=False)


def isLoopbackAddress(address: Any) -> bool:
    """
    Whether a Twisted address is on loopback. A UNIX socket is local too
    (file permissions guard it); anything without a host is not.
    """
    if getattr(address, "name", None) is not None and not hasattr(address, "host"):
        return True
    host = getattr(address, "host", "")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fromLoopback(request: Request) -> bool:
    """
    Whether the client is on this host (by its address, never a header).
    """
    host = getattr(request.getClientAddress(), "host", "")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return errorBody(Dialect.anthropic, status, message)


class AdminGate(Resource):
    """
    Only callers allowed to see C{resource} reach it.

    With C{ADMIN_TOKEN} set, that means C{Authorization: Bearer <token>},
    from anywhere (loopback included: on a shared host, loopback is every
    local user). Without it, C{loopbackOnly} endpoints (C{/admin/*}) answer
    loopback only and the others (C{/metrics}) are open.
    """

    isLeaf = True

    def __init__(self, resource: Resource, credentials: Credentials, loopbackOnly: bool) -> None:
        super().__init__()
        self._resource = resource
        self._credentials = credentials
        self._loopbackOnly = loopbackOnly

    def _tokenPresented(self, request: Request, token: str) -> bool:
        expected = hashlib.sha256(b"Bearer " + token.encode("utf-8")).digest()
        matched = False
        for value in request.requestHeaders.getRawHeaders(b"authorization", ()):
            presented = hashlib.sha256(value.strip()).digest()
            matched |= hmac.compare_digest(presented, expected)
        return matched

    def render(self, request: Request) -> Any:
        token = self._credentials.adminToken
        if token:
            if not self._tokenPresented(request, token):
                request.setHeader(b"www-authenticate", b'Bearer realm="zaiproxy-admin"')
                return _json(request, 401, "this endpoint needs Authorization: Bearer <ADMIN_TOKEN>")
        elif self._loopbackOnly and not fromLoopback(request):
            return _json(request, 403, "admin endpoints answer loopback only unless ADMIN_TOKEN is set")
        return self._resource.render(request)


class AdminRoot(Resource):
    """
    The root of the admin port (C{--admin-listen}): its local endpoints by
    exact path, a JSON 404 for anything else; nothing is ever forwarded.
    """

    isLeaf = True

    def __init__(self, local: dict[bytes, Resource]) -> None:
        super().__init__()
        self._local = local

    def render(self, request: Request) -> Any:
        path = request.uri.partition(b"?")[0]
        resource = self._local.get(path)
        if resource is None:
            return _json(request, 404, "no such endpoint on the admin port")
        return resource.render(request)

    def rejected(self, method: bytes, path: bytes, status: int, bodyBytes: int) -> None:
        """
        A request the HTTP channel refused: nothing to count on this port.
        """
