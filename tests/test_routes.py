"""
Tests for L{zaiproxy.relay.routes}: the routing table, as a pure function.
"""

from __future__ import annotations

import pytest

from zaiproxy.dialects import Dialect
from zaiproxy.relay.routes import Forward, Local, Refuse, Targets, guessDialect, localKey, resolve

TARGETS = Targets.fromURLs("https://api.z.ai/api/anthropic", "https://api.z.ai/api/coding/paas/v4")
A, OA = Dialect.anthropic, Dialect.openai


@pytest.mark.parametrize(
    "uri, label, dialect, url",
    [
        (
            b"/v1/chat/completions",
            "/v1/chat/completions",
            OA,
            b"https://api.z.ai/api/coding/paas/v4/chat/completions",
        ),
        (
            b"/chat/completions",
            "/v1/chat/completions",
            OA,
            b"https://api.z.ai/api/coding/paas/v4/chat/completions",
        ),
        (
            b"/v1/chat/completions?x=1",
            "/v1/chat/completions",
            OA,
            b"https://api.z.ai/api/coding/paas/v4/chat/completions?x=1",
        ),
        (
            b"/v1/messages?beta=true",
            "/v1/messages",
            A,
            b"https://api.z.ai/api/anthropic/v1/messages?beta=true",
        ),
        (
            b"/v1/messages/count_tokens?beta=true",
            "/v1/messages/count_tokens",
            A,
            b"https://api.z.ai/api/anthropic/v1/messages/count_tokens?beta=true",
        ),
        (b"/v1/models?limit=1000", "/v1/models", A, b"https://api.z.ai/api/anthropic/v1/models?limit=1000"),
        (b"/v1/models/glm-4.7", "/v1/models", A, b"https://api.z.ai/api/anthropic/v1/models/glm-4.7"),
        (b"/v1/files", "/v1/*", A, b"https://api.z.ai/api/anthropic/v1/files"),
        (b"/api/anthropic/v1/messages", "/v1/messages", A, b"https://api.z.ai/api/anthropic/v1/messages"),
        (b"/api/anthropic/v1/other", "/api/anthropic/*", A, b"https://api.z.ai/api/anthropic/v1/other"),
        (
            b"/api/paas/v4/chat/completions",
            "/v1/chat/completions",
            OA,
            b"https://api.z.ai/api/paas/v4/chat/completions",
        ),
        (
            b"/api/coding/paas/v4/chat/completions",
            "/v1/chat/completions",
            OA,
            b"https://api.z.ai/api/coding/paas/v4/chat/completions",
        ),
        (b"/api/coding/paas/v4/models", "/v1/models", OA, b"https://api.z.ai/api/coding/paas/v4/models"),
        (b"/api/paas/v4/embeddings", "/api/paas/v4/*", OA, b"https://api.z.ai/api/paas/v4/embeddings"),
        (b"/v1/messages/", "/v1/*", A, b"https://api.z.ai/api/anthropic/v1/messages/"),
    ],
)
def test_forward(uri: bytes, label: str, dialect: Dialect, url: bytes) -> None:
    """
    Every row of the routing table: the upstream URL keeps the query and
    never doubles Z.AI's path prefix.
    """
    assert resolve(uri, TARGETS) == Forward(label, dialect, url)


def forwardedTo(path: bytes, targets: Targets) -> bytes:
    route = resolve(path, targets)
    assert isinstance(route, Forward)
    return route.url


def test_originOfTarget() -> None:
    """
    Paths naming Z.AI's prefixes go to the origin of ZAI_TARGET_URL, however
    that URL's path looks.
    """
    targets = Targets.fromURLs("http://127.0.0.1:8999/api/anthropic/", "http://127.0.0.1:8999/x")
    assert (
        forwardedTo(b"/api/anthropic/v1/messages", targets)
        == b"http://127.0.0.1:8999/api/anthropic/v1/messages"
    )
    assert forwardedTo(b"/v1/messages", targets) == b"http://127.0.0.1:8999/api/anthropic/v1/messages"
    assert forwardedTo(b"/chat/completions", targets) == b"http://127.0.0.1:8999/x/chat/completions"


@pytest.mark.parametrize("path", [b"/metrics", b"/health", b"/readyz"])
def test_local(path: bytes) -> None:
    """
    The local endpoints are answered here (also with a query string).
    """
    assert resolve(path, TARGETS) == Local(path)
    assert resolve(path + b"?x=1", TARGETS) == Local(path)


@pytest.mark.parametrize(
    "uri",
    [b"/", b"/v1", b"/api/event_logging/batch", b"/api/hello", b"/metrics/x", b"/healthz", b"/api/anthropic"],
)
def test_notFound(uri: bytes) -> None:
    """
    Anything else is a local 404, never forwarded.
    """
    assert resolve(uri, TARGETS) == Refuse(404, "no route for this path on the proxy", "unknown")


@pytest.mark.parametrize(
    "uri",
    [
        b"http://evil.example/v1/messages",
        b"https://api.z.ai/api/anthropic/v1/messages",
        b"api.z.ai:443",
        b"*",
        b"/v1/../metrics",
        b"/v1/messages/..",
        b"/v1/./messages",
        b"/v1/%2e%2e/%2e%2e/etc/passwd",
        b"/v1/%2E%2E/x",
        b"/v1/%252e%252e/x",
        b"/v1/..%2fmetrics",
        b"/v1/..%5cmetrics",
        b"/v1/a%00b",
        b"/v1/a\\..\\b",
        b"/v1//messages",
        b"/v1/\xc3\xa9",
        b"/v1/a#frag",
    ],
)
def test_refused(uri: bytes) -> None:
    """
    Absolute-URI targets and paths that could traverse are refused with 400.
    """
    route = resolve(uri, TARGETS)
    assert isinstance(route, Refuse)
    assert route.status == 400
    assert route.label == "invalid"


def test_guessDialect() -> None:
    """
    Refusals answer in the dialect the client most likely speaks.
    """
    assert guessDialect(b"/x", True) is A
    assert guessDialect(b"/v1/chat/completions/x", False) is OA
    assert guessDialect(b"/api/paas/v4/x", False) is OA
    assert guessDialect(b"/whatever", False) is A


@pytest.mark.parametrize(
    "path, key",
    [
        (b"/api/usage", b"/api/"),
        (b"/api/requests", b"/api/"),
        (b"/api/metrics", b"/api/"),
        (b"/api/status", b"/api/"),
        (b"/api/config", b"/api/"),
        (b"/api/usage/me", b"/api/usage/me"),
        (b"/api/events", b"/api/events"),
        (b"/dashboard", b"/dashboard"),
        (b"/dashboard/static/uPlot.min.css", b"/dashboard"),
        (b"/dashboard/login", b"/dashboard"),
    ],
)
def test_dashboardIsLocal(path: bytes, key: bytes) -> None:
    """
    The dashboard and its API are answered here, each by its resource;
    nothing else under /api/ is (Z.AI's own paths are forwarded).
    """
    assert resolve(path + b"?range=1h", TARGETS) == Local(key)
    assert localKey(path) == key
