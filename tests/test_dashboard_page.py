"""
The dashboard page, its files and its login, on twisted.web requests in
memory: who gets the page, the login form, the session cookie's flags,
and the static files' types.
"""

from __future__ import annotations

import io
from urllib.parse import urlencode

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from zaiproxy.dashboard.page import DashboardResource
from zaiproxy.front.access import SESSION_COOKIE, Credentials, Sessions

TOKEN = "admin-token-0123456789"
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
REMOTE = IPv4Address("TCP", "192.0.2.7", 40000)


def makeRequest(
    path: bytes,
    method: bytes = b"GET",
    peer: IPv4Address = LOOPBACK,
    args: dict[bytes, list[bytes]] | None = None,
    cookie: bytes | None = None,
) -> Request:
    channel = DummyChannel()
    channel.transport = DummyChannel.TCP(peer)
    request = Request(channel)
    request.method = method
    request.uri = request.path = path
    request.args = {}
    # The proxy's site leaves bodies unparsed: the login reads its form.
    request.content = io.BytesIO(urlencode({k: v[0] for k, v in (args or {}).items()}).encode())
    if cookie is not None:
        request.requestHeaders.setRawHeaders(b"cookie", [SESSION_COOKIE + b"=" + cookie])
        request.parseCookies()
    return request


def render(resource: DashboardResource, request: Request) -> tuple[int, bytes]:
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request.code, body


def header(request: Request, name: bytes) -> list[bytes]:
    return list(request.responseHeaders.getRawHeaders(name, []))


def pageWith(token: str = "") -> tuple[DashboardResource, Sessions, Clock]:
    clock = Clock()
    credentials = Credentials(None, token)
    sessions = Sessions(clock, credentials)
    return DashboardResource(credentials, sessions), sessions, clock


def test_pageFromLoopbackWithoutToken() -> None:
    """
    Without ADMIN_TOKEN the page answers loopback, with a strict policy.
    """
    page, _, _ = pageWith()
    request = makeRequest(b"/dashboard")
    code, body = render(page, request)
    assert code == 200 and b'<script src="/dashboard/static/dashboard.js"' in body
    assert header(request, b"content-type") == [b"text/html; charset=utf-8"]
    [policy] = header(request, b"content-security-policy")
    assert b"script-src 'self'" in policy and b"default-src 'none'" in policy
    assert header(request, b"x-frame-options") == [b"DENY"]


def test_pageRefusesOthersWithoutToken() -> None:
    """
    ... and a caller from elsewhere gets 403 saying why, as /admin/* does.
    """
    page, _, _ = pageWith()
    code, body = render(page, makeRequest(b"/dashboard", peer=REMOTE))
    assert code == 403 and b"loopback only unless ADMIN_TOKEN is set" in body


def test_loginTradesTheTokenForACookie() -> None:
    """
    With ADMIN_TOKEN: a login form, a wrong token refused, the right one a
    303 with an HttpOnly, SameSite=Strict session cookie that opens the
    page; logging out ends it.
    """
    page, _, _ = pageWith(TOKEN)
    code, body = render(page, makeRequest(b"/dashboard", peer=REMOTE))
    assert code == 200 and b'<form method="post" action="/dashboard/login"' in body
    wrong = makeRequest(b"/dashboard/login", b"POST", REMOTE, {b"token": [b"guess"]})
    code, body = render(page, wrong)
    assert code == 401 and b"That is not the admin token." in body and wrong.cookies == []
    right = makeRequest(b"/dashboard/login", b"POST", REMOTE, {b"token": [TOKEN.encode()]})
    code, body = render(page, right)
    assert (code, header(right, b"location")) == (303, [b"/dashboard"])
    [cookie] = right.cookies
    name, _, rest = cookie.partition(b"=")
    session = rest.split(b";")[0]
    assert name == SESSION_COOKIE and len(session) >= 40
    flags = {part.strip().lower() for part in rest.split(b";")[1:]}
    assert {b"httponly", b"samesite=strict", b"path=/", b"max-age=43200"} <= flags
    assert b"secure" not in flags  # plain HTTP here; Secure behind TLS
    code, body = render(page, makeRequest(b"/dashboard", peer=REMOTE, cookie=session))
    assert code == 200 and b"dashboard.js" in body
    code, _ = render(page, makeRequest(b"/dashboard/logout", b"POST", REMOTE, cookie=session))
    assert code == 303
    code, body = render(page, makeRequest(b"/dashboard", peer=REMOTE, cookie=session))
    assert b"<form" in body


def test_sessionsEndWithTheirTimeAndTheirToken() -> None:
    """
    A session lasts 12 hours, and only while its token is the one in force.
    """
    _, sessions, clock = pageWith(TOKEN)
    first = makeRequest(b"/dashboard", peer=REMOTE, cookie=sessions.open())
    assert sessions.valid(first)
    clock.advance(12 * 3600 + 1)
    assert not sessions.valid(first)
    second = makeRequest(b"/dashboard", peer=REMOTE, cookie=sessions.open())
    assert sessions.valid(second)
    sessions._credentials.adminToken = "a-new-token-0123456789"
    assert not sessions.valid(second)
    assert not sessions.valid(makeRequest(b"/dashboard", peer=REMOTE, cookie=b"made-up"))


@pytest.mark.parametrize(
    "name, kind",
    [
        ("uPlot.iife.min.js", b"text/javascript; charset=utf-8"),
        ("uPlot.min.css", b"text/css; charset=utf-8"),
        ("dashboard.js", b"text/javascript; charset=utf-8"),
        ("dashboard.css", b"text/css; charset=utf-8"),
    ],
)
def test_staticFiles(name: str, kind: bytes) -> None:
    """
    The page's files are served from the package, with their types.
    """
    page, _, _ = pageWith(TOKEN)
    request = makeRequest(b"/dashboard/static/" + name.encode(), peer=REMOTE)
    code, body = render(page, request)
    assert code == 200 and len(body) > 100
    assert header(request, b"content-type") in (
        [kind],
        [kind.replace(b"text/javascript", b"application/javascript")],
    )
    assert header(request, b"x-content-type-options") == [b"nosniff"]


@pytest.mark.parametrize("name", [b"nothing.js", b"index.html", b"README", b".hidden", b"a/b"])
def test_noOtherFiles(name: bytes) -> None:
    """
    Only the page's own files; the page itself only at /dashboard.
    """
    page, _, _ = pageWith()
    code, _ = render(page, makeRequest(b"/dashboard/static/" + name))
    assert code == 404


def test_otherMethodsAndPaths() -> None:
    page, _, _ = pageWith()
    code, _ = render(page, makeRequest(b"/dashboard", b"DELETE"))
    assert code == 405
    code, _ = render(page, makeRequest(b"/dashboard/elsewhere"))
    assert code == 404
