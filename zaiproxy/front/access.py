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
import secrets
from typing import Any

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Request

from zaiproxy.dialects import Dialect, errorBody
from zaiproxy.front.clientkeys import ClientKeys
from zaiproxy.relay.routes import localKey

__all__ = [
    "SESSION_COOKIE",
    "AdminGate",
    "AdminRoot",
    "Credentials",
    "Sessions",
    "fromLoopback",
    "isLoopbackAddress",
    "tokenMatches",
]

#: The dashboard's session cookie.
SESSION_COOKIE = b"zaiproxy_session"
#: How long a dashboard session lasts.
SESSION_SECONDS = 12 * 3600.0
#: Sessions kept at most (the oldest goes first).
MAX_SESSIONS = 1000


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


def tokenMatches(presented: bytes, token: str) -> bool:
    """
    Whether C{presented} is the admin token, compared in constant time.
    """
    expected = hashlib.sha256(token.encode("utf-8")).digest()
    return hmac.compare_digest(hashlib.sha256(presented.strip()).digest(), expected)


class Sessions:
    """
    The dashboard's logins: a random session id (in an HttpOnly,
    SameSite=Strict cookie) for each exchange of the admin token, valid
    for 12 hours, and only while that token is the one in force (a reload
    that changes C{ADMIN_TOKEN} ends every session).
    """

    def __init__(self, clock: Any, credentials: Credentials) -> None:
        self._clock = clock
        self._credentials = credentials
        self._sessions: dict[bytes, tuple[float, bytes]] = {}

    def _tokenHash(self) -> bytes:
        return hashlib.sha256(self._credentials.adminToken.encode("utf-8")).digest()

    def open(self) -> bytes:
        """
        A new session id.
        """
        if len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session = secrets.token_urlsafe(32).encode("ascii")
        self._sessions[session] = (self._clock.seconds() + SESSION_SECONDS, self._tokenHash())
        return session

    def valid(self, request: Request) -> bool:
        """
        Whether the request carries a live session of the current token.
        """
        session = request.getCookie(SESSION_COOKIE)
        found = self._sessions.get(session) if session else None
        if found is None:
            return False
        expires, tokenHash = found
        if expires < self._clock.seconds() or not hmac.compare_digest(tokenHash, self._tokenHash()):
            del self._sessions[session]
            return False
        return True

    def close(self, request: Request) -> None:
        session = request.getCookie(SESSION_COOKIE)
        if session:
            self._sessions.pop(session, None)


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

    def __init__(
        self,
        resource: Resource,
        credentials: Credentials,
        loopbackOnly: bool,
        sessions: Sessions | None = None,
    ) -> None:
        """
        @param sessions: the dashboard's logins, accepted in place of the
            token (the dashboard and its API only).
        """
        super().__init__()
        self._resource = resource
        self._credentials = credentials
        self._loopbackOnly = loopbackOnly
        self._sessions = sessions

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
            if self._sessions is not None and self._sessions.valid(request):
                return self._resource.render(request)
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
        resource = self._local.get(localKey(request.uri.partition(b"?")[0]))
        if resource is None:
            return _json(request, 404, "no such endpoint on the admin port")
        return resource.render(request)

    def rejected(self, method: bytes, path: bytes, status: int, bodyBytes: int) -> None:
        """
        A request the HTTP channel refused: nothing to count on this port.
        """
