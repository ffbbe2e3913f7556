"""
Tests for L{zaiproxy.front.endpoints}: /metrics, /health and /readyz.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
import pytest_twisted
import treq
from support.stack import UPSTREAM_KEY, Stack

from zaiproxy.fake.testing import rawRequest


async def get(url: str, **kw: Any) -> tuple[Any, bytes]:
    response = await treq.get(url, persistent=False, **kw)
    return response, await response.content()


@pytest_twisted.ensureDeferred
async def test_metrics(reactor: Any, stack: Stack) -> None:
    """
    /metrics serves the seed's metric families with bounded labels, in the
    Prometheus text format (OpenMetrics when asked).
    """
    client = await rawRequest(
        reactor, stack.port, b"POST", b"/v1/messages?beta=true", [], b'{"model":"glm-4.7"}'
    )
    await client.closed.addErrback(lambda f: None)
    response, body = await get(stack.url("/metrics"))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=")
    text = body.decode()
    for family in (
        "zai_proxy_requests_total",
        "zai_proxy_request_duration_seconds_bucket",
        "zai_proxy_request_size_bytes_bucket",
        "zai_proxy_response_size_bytes_bucket",
        "zai_proxy_concurrent_requests",
        "zai_proxy_time_to_first_byte_seconds_bucket",
        "zai_proxy_build_info",
        "process_resident_memory_bytes",
    ):
        assert family in text, family
    assert (
        'zai_proxy_requests_total{method="POST",path="/v1/messages",'
        'status_code="200",variant="production"} 1.0' in text
    )
    assert (
        'zai_proxy_build_info{build_time="unknown",commit="unknown",variant="production",version="0.1.0"} 1.0'
        in text
    )
    assert "beta=true" not in text
    assert "_created" not in text
    assert UPSTREAM_KEY not in text
    response, body = await get(stack.url("/metrics"), headers={"accept": ["application/openmetrics-text"]})
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest_twisted.ensureDeferred
async def test_health(reactor: Any, stack: Stack) -> None:
    """
    /health says what runs and where it forwards, without secrets.
    """
    response, body = await get(stack.url("/health"))
    assert response.code == 200
    document = json.loads(body)
    assert document.pop("rate_limit") == {
        "current_rate": 1000.0,
        "ceiling": 1000.0,
        "hold": 980.0,
        "restored_from_state": False,
        "in_flight": 0,
        "concurrency_limit": 200,
        "queued": 0,
        "waiting_clients": 0,
    }
    assert document.pop("quota") == {"enabled": False, "fresh": False}
    assert document == {
        "status": "ok",
        "version": "0.1.0",
        "variant": "production",
        "instance": stack.proxy.instance,
        "upstream": {
            "anthropic": stack.upstream.url("/api/anthropic"),
            "openai": stack.upstream.url("/api/coding/paas/v4"),
        },
        "token_counting": {"enabled": True, "counter": "tiktoken", "encoding": "cl100k_base"},
        "reload": {"last_at": None, "result": "never", "restart_needed": []},
    }
    assert UPSTREAM_KEY.encode() not in body


@pytest_twisted.ensureDeferred
async def test_readyz(reactor: Any, stack: Stack) -> None:
    """
    /readyz is 200 while serving and 503 while draining; /health then says
    draining but stays 200.
    """
    response, body = await get(stack.url("/readyz"))
    assert (response.code, json.loads(body)) == (200, {"status": "ready"})
    stack.proxy.draining = True
    response, body = await get(stack.url("/readyz"))
    assert (response.code, json.loads(body)) == (503, {"status": "draining"})
    response, body = await get(stack.url("/health"))
    assert (response.code, json.loads(body)["status"]) == (200, "draining")


@pytest_twisted.ensureDeferred
async def test_methodNotAllowed(reactor: Any, stack: Stack) -> None:
    """
    The local endpoints answer GET and HEAD; other methods get 405 JSON,
    and nothing is forwarded.
    """
    response = await treq.post(stack.url("/metrics"), data=b"x", persistent=False)
    body = await response.content()
    assert response.code == 405
    assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert json.loads(body)["error"]["message"] == "method not allowed"
    response = await treq.head(stack.url("/health"), persistent=False)
    assert response.code == 200
    assert await response.content() == b""
    assert stack.fake.received == []


@pytest_twisted.ensureDeferred
async def test_adminResetFromLoopback(reactor: Any, stack: Stack) -> None:
    """
    POST /admin/reset-rate-limit from loopback resets the limiter; GET is
    405.
    """
    limiter = stack.proxy.limiter
    limiter._setRate(3.0)
    limiter.ceiling = 4.0
    response = await treq.post(stack.url("/admin/reset-rate-limit"), persistent=False)
    assert response.code == 200
    assert json.loads(await response.content()) == {
        "status": "reset",
        "current_rate": 1000.0,
        "ceiling": 1000.0,
        "concurrency_limit": 200,
        "window_restarted": True,
        "quota_hold_cleared": False,
    }
    assert (limiter.rate, limiter.ceiling) == (1000.0, 1000.0)
    response = await treq.get(stack.url("/admin/reset-rate-limit"), persistent=False)
    await response.content()
    assert response.code == 405


async def _promtool(text: bytes) -> tuple[bytes, int]:
    """
    C{promtool check metrics} on an exposition: its findings and exit code.
    """
    from twisted.internet import utils

    out, err, code = await utils.getProcessOutputAndValue(
        "/bin/sh", ("-c", "exec promtool check metrics"), env=dict(os.environ), stdinBytes=text
    )
    return out + err, code


@pytest_twisted.ensureDeferred
async def test_metricsPassPromtool(reactor: Any, stack: Stack) -> None:
    """
    Prometheus's own linter finds nothing in /metrics, in the text format
    and in OpenMetrics, after a streamed, a plain and a refused request
    (so the token, cost and error families have samples).
    """
    if shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for body in (
        b'{"model":"glm-4.7","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"glm-4.7","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}',
        b"{not json",
    ):
        response = await treq.post(stack.url("/v1/messages"), body, persistent=False)
        await response.content()
    response, body = await get(stack.url("/metrics"), headers={"accept": ["text/plain"]})
    assert b"zai_proxy_tokens_total" in body
    assert await _promtool(body) == (b"", 0)
    # promtool reads only the text format: on OpenMetrics its one finding
    # is "no help text" for each counter, because OpenMetrics puts HELP on
    # the family's name (zai_proxy_tokens), not the sample's (..._total).
    # Anything else it finds is ours to fix.
    response, body = await get(stack.url("/metrics"), headers={"accept": ["application/openmetrics-text"]})
    assert body.endswith(b"# EOF\n")
    findings, _ = await _promtool(body)
    lines = findings.decode().splitlines()
    assert lines, "promtool reads OpenMetrics now: assert it is clean"
    for line in lines:
        name, _, problem = line.partition(" ")
        assert problem == "no help text", line
        family = name.removesuffix("_total")
        assert name.endswith("_total") and f"# HELP {family} ".encode() in body, line
        assert f"# TYPE {family} counter".encode() in body, line
