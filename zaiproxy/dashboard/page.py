# -*- test-case-name: tests.test_dashboard_page -*-
"""
C{/dashboard}: the page, its static files (shipped in the package, uPlot
vendored: no CDN, no build step, works offline), and its login.

The page is behind the admin gate's rules: with C{ADMIN_TOKEN} set, a
login form trades the token for a session cookie (HttpOnly,
SameSite=Strict, Secure when the request came over TLS); without it, the
page answers loopback only, as C{/admin/*} does.
"""

from __future__ import annotations

import html
import mimetypes
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from twisted.web.resource import Resource
from twisted.web.server import Request

from zaiproxy.front.access import SESSION_COOKIE, Credentials, Sessions, fromLoopback, tokenMatches

__all__ = ["DashboardResource"]

_STATIC = resources.files("zaiproxy.dashboard").joinpath("static")
#: The page's own policy: its scripts and styles, from this origin only.
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_MAX_FORM_BYTES = 4096

_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>zaiproxy: sign in</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>
<body class="login"><main>
<h1>zaiproxy</h1>
<form method="post" action="/dashboard/login" id="login">
<label for="token">Admin token (<code>ADMIN_TOKEN</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
{problem}
</form></main></body></html>
"""


def _static(name: str) -> bytes | None:
    if "/" in name or name.startswith("."):
        return None
    entry = _STATIC.joinpath(name)
    return entry.read_bytes() if entry.is_file() else None


def _formField(request: Request, name: bytes) -> bytes | None:
    """
    One field of a small urlencoded form. The proxy's site leaves bodies
    unparsed (a proxied body is never a form), so the login reads its own.
    """
    content = request.content
    if content is None:
        return None
    content.seek(0)
    body = content.read(_MAX_FORM_BYTES + 1)
    if len(body) > _MAX_FORM_BYTES:
        return None
    values = parse_qs(body).get(name)
    return values[0] if values else None


class DashboardResource(Resource):
    """
    C{/dashboard}, C{/dashboard/login}, C{/dashboard/logout} and
    C{/dashboard/static/<file>}.
    """

    isLeaf = True

    def __init__(self, credentials: Credentials, sessions: Sessions) -> None:
        super().__init__()
        self._credentials = credentials
        self._sessions = sessions

    def render(self, request: Request) -> Any:
        path = request.uri.partition(b"?")[0]
        if path.startswith(b"/dashboard/static/"):
            return self._file(request, path[len(b"/dashboard/static/") :].decode("ascii", "replace"))
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-store")
        if path == b"/dashboard/login" and request.method == b"POST":
            return self._login(request)
        if path == b"/dashboard/logout" and request.method == b"POST":
            self._sessions.close(request)
            request.addCookie(SESSION_COOKIE, b"", path=b"/", max_age=b"0", httpOnly=True)
            return self._redirect(request)
        if path not in (b"/dashboard", b"/dashboard/"):
            return self._text(request, 404, "no such page")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._text(request, 405, "GET the dashboard")
        if self._credentials.adminToken:
            if not self._sessions.valid(request):
                return self._form(request, 200, "")
        elif not fromLoopback(request):
            return self._text(
                request, 403, "The dashboard answers loopback only unless ADMIN_TOKEN is set (see README)."
            )
        page = _static("index.html")
        assert page is not None, "the package is missing dashboard/static/index.html"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page

    def _login(self, request: Request) -> bytes:
        token = self._credentials.adminToken
        if not token:
            return self._redirect(request)
        presented = _formField(request, b"token")
        if presented is None or not tokenMatches(presented, token):
            return self._form(request, 401, "That is not the admin token.")
        session = self._sessions.open()
        request.addCookie(
            SESSION_COOKIE,
            session,
            path=b"/",
            httpOnly=True,
            secure=request.isSecure(),
            sameSite="strict",
            max_age=b"43200",
        )
        return self._redirect(request)

    def _redirect(self, request: Request) -> bytes:
        # 303: the browser GETs the page, so a reload never re-posts the token.
        request.setResponseCode(303)
        request.setHeader(b"location", b"/dashboard")
        return b""

    def _form(self, request: Request, status: int, problem: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        shown = f'<p class="problem" role="alert">{html.escape(problem)}</p>' if problem else ""
        return _LOGIN.format(problem=shown).encode("utf-8")

    def _text(self, request: Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return message.encode("utf-8") + b"\n"

    def _file(self, request: Request, name: str) -> bytes:
        content = _static(name)
        if content is None or name in ("index.html", "README"):
            return self._text(request, 404, "no such file")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind == "application/javascript":
            kind += "; charset=utf-8"
        request.setHeader(b"content-type", kind.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"public, max-age=300")
        return content
