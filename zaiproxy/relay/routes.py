# -*- test-case-name: tests.test_routes -*-
"""
Where an incoming request goes: upstream (and in which dialect), a local
endpoint, or nowhere.

A pure function of the request target and the configured upstreams, so the
whole table is testable without a reactor. The proxy never acts as a forward
proxy: absolute-URI targets and anything that could climb out of the
upstream's path are refused before they reach it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes, urlsplit

import attrs

from zaiproxy.dialects import Dialect

__all__ = [
    "DASHBOARD_API",
    "LOCAL_ENDPOINTS",
    "Forward",
    "Local",
    "Refuse",
    "Targets",
    "guessDialect",
    "localKey",
    "resolve",
]

#: Paths the proxy answers itself.
LOCAL_ENDPOINTS = (b"/metrics", b"/health", b"/readyz", b"/admin/reset-rate-limit")
#: The dashboard's API (the Go dashboard's paths, and the ledger's). Only
#: these: Z.AI's own paths under /api/ (/api/anthropic/, /api/paas/) are
#: forwarded.
DASHBOARD_API = frozenset(
    [
        b"/api/usage",
        b"/api/usage/me",
        b"/api/requests",
        b"/api/status",
        b"/api/metrics",
        b"/api/events",
        b"/api/config",
    ]
)
#: API endpoints with a resource of their own (not the admin-gated rest).
_OWN_API = (b"/api/usage/me", b"/api/events")


def localKey(path: bytes) -> bytes:
    """
    The key of the local resource that serves C{path}: itself for an
    exact endpoint, else C{/api/} (the rest of the API) or C{/dashboard}
    (its pages and files).
    """
    if path in LOCAL_ENDPOINTS or path in _OWN_API:
        return path
    if path in DASHBOARD_API:
        return b"/api/"
    if path == b"/dashboard" or path.startswith(b"/dashboard/"):
        return b"/dashboard"
    return path


# Labels for the metrics' bounded "path" label.
_CHAT = "/v1/chat/completions"
_MESSAGES = "/v1/messages"
_COUNT = "/v1/messages/count_tokens"
_MODELS = "/v1/models"


@attrs.frozen
class Targets:
    """
    The upstream bases, parsed once at start-up.
    """

    anthropicBase: bytes
    openaiBase: bytes
    origin: bytes

    @classmethod
    def fromURLs(cls, anthropicBase: str, openaiBase: str) -> Targets:
        parts = urlsplit(anthropicBase)
        return cls(
            anthropicBase=anthropicBase.rstrip("/").encode("ascii"),
            openaiBase=openaiBase.rstrip("/").encode("ascii"),
            origin=f"{parts.scheme}://{parts.netloc}".encode("ascii"),
        )


@attrs.frozen
class Forward:
    """
    Send the request upstream to C{url}.

    @ivar label: the bounded route name used as the metrics' C{path} label.
    """

    label: str
    dialect: Dialect
    url: bytes


@attrs.frozen
class Local:
    """
    Answer locally with the endpoint named C{path}.
    """

    path: bytes

    @property
    def label(self) -> str:
        return self.path.decode("ascii")


@attrs.frozen
class Refuse:
    """
    Answer C{status} with C{message}, in the dialect the client seems to speak.
    """

    status: int
    message: str
    label: str


Route = Forward | Local | Refuse


def _label(tail: bytes, fallback: str) -> str:
    """
    The route label of a path below a dialect's base (C{/v1/...}).
    """
    if tail == b"/v1/messages":
        return _MESSAGES
    if tail == b"/v1/messages/count_tokens":
        return _COUNT
    if tail == b"/v1/models" or tail.startswith(b"/v1/models/"):
        return _MODELS
    if tail == b"/chat/completions" or tail == b"/v1/chat/completions":
        return _CHAT
    if tail == b"/models" or tail.startswith(b"/models/"):
        return _MODELS
    return fallback


# Client base URLs that already name one of Z.AI's paths, and their dialect.
_ZAI_PREFIXES = (
    (b"/api/anthropic/", Dialect.anthropic, "/api/anthropic/*"),
    (b"/api/coding/paas/v4/", Dialect.openai, "/api/coding/paas/v4/*"),
    (b"/api/paas/v4/", Dialect.openai, "/api/paas/v4/*"),
)


_BAD_RAW = re.compile(rb"[^\x21-\x7e]|[\\#]")
_BAD_DECODED = re.compile(rb"[\x00-\x20\x7f\\]")


def _unsafe(path: bytes) -> str | None:
    """
    Why C{path} may not go upstream, or L{None} if it may.

    The path is forwarded as received, so it is judged both raw and decoded
    once; anything still percent-encoded after one decoding is refused, since
    some hop might decode it again into a traversal.
    """
    if _BAD_RAW.search(path):
        return "request path contains characters that are not allowed"
    decoded = path
    if b"%" in path:
        decoded = unquote_to_bytes(path)
        if b"%" in decoded:
            return "request path is encoded more than once"
        if _BAD_DECODED.search(decoded):
            return "request path contains characters that are not allowed"
    if b"/." in decoded:
        segments = decoded.split(b"/")
        if any(s in (b".", b"..") for s in segments):
            return "request path must not contain . or .. segments"
    if b"//" in decoded:
        return "request path must not contain empty segments"
    return None


def resolve(uri: bytes, targets: Targets) -> Route:
    """
    Decide what to do with a request for C{uri} (the raw request target).
    """
    if not uri.startswith(b"/"):
        # Absolute-URI, authority (CONNECT) or asterisk form: we are not a
        # forward proxy.
        return Refuse(400, "only origin-form request targets are accepted", "invalid")
    path, sep, query = uri.partition(b"?")
    why = _unsafe(path)
    if why is not None:
        return Refuse(400, why, "invalid")
    suffix = b"?" + query if sep else b""

    if path in LOCAL_ENDPOINTS:
        return Local(path)
    if path in DASHBOARD_API or path == b"/dashboard" or path.startswith(b"/dashboard/"):
        return Local(localKey(path))
    if path in (b"/v1/chat/completions", b"/chat/completions"):
        return Forward(_CHAT, Dialect.openai, targets.openaiBase + b"/chat/completions" + suffix)
    if path.startswith(b"/v1/"):
        return Forward(_label(path, "/v1/*"), Dialect.anthropic, targets.anthropicBase + path + suffix)
    for prefix, dialect, fallback in _ZAI_PREFIXES:
        if path.startswith(prefix):
            tail = path[len(prefix) - 1 :]
            return Forward(_label(tail, fallback), dialect, targets.origin + path + suffix)
    return Refuse(404, "no route for this path on the proxy", "unknown")


def guessDialect(path: bytes, hasAnthropicVersion: bool) -> Dialect:
    """
    The dialect to answer in when the route does not say (refusals, 404s).

    Claude Code always sends C{anthropic-version}; the OpenAI SDKs call
    C{chat/completions} or Z.AI's C{paas} paths.
    """
    if hasAnthropicVersion:
        return Dialect.anthropic
    if b"chat/completions" in path or b"/paas/" in path:
        return Dialect.openai
    return Dialect.anthropic
