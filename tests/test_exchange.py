"""
Tests for L{zaiproxy.observe.exchange}.
"""

from __future__ import annotations

import io
import json
import tempfile
from typing import Any, cast

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

from zaiproxy.observe.exchange import MAX_LOGGED_PATH, Exchange, Reporter, loggedPath, sniffModel
from zaiproxy.observe.metrics import Metrics


@pytest.mark.parametrize(
    "body, model",
    [
        (b'{"model":"glm-4.7","messages":[]}', "glm-4.7"),
        (b'{"messages":[{"role":"user","content":"say \\"model\\": \\"x\\""}], "model" : "glm-5"}', "glm-5"),
        (
            b'{"messages":[],"tools":[{"input_schema":{"properties":{"model":{"type":"string"}}}}],"model":"m"}',
            "m",
        ),
        (b'{"messages":[]}', None),
        (b"", None),
        (b"not json", None),
    ],
)
def test_sniffModel(body: bytes, model: str | None) -> None:
    """
    The request's model is found whether it comes before or after messages,
    and escaped quotes inside contents never match.
    """
    assert sniffModel(io.BytesIO(body)) == model


def test_sniffModelTempFile() -> None:
    """
    Large bodies live in a temporary file; it is scanned without being read
    into memory, and left rewound.
    """
    with tempfile.TemporaryFile() as f:
        f.write(b'{"messages":[' + b'{"role":"user","content":"x"},' * 10000 + b'{}],"model":"glm-4.6"}')
        f.seek(0)
        assert sniffModel(f) == "glm-4.6"
        assert f.tell() == 0
    with tempfile.TemporaryFile() as f:
        assert sniffModel(f) is None


def test_reporter() -> None:
    """
    A finished exchange becomes metric samples and one access-log event.
    """
    clock = Clock()
    metrics = Metrics("test", "1.0")
    reporter = Reporter(metrics, clock)
    events: list[dict[str, Any]] = []
    # Any callable taking an event is an observer; the annotation wants the interface.
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        exchange = Exchange(
            method="POST", route="/v1/messages", startedAt=0.0, requestBytes=10, model="glm-4.7"
        )
        clock.advance(0.5)
        reporter.firstByte(exchange)
        clock.advance(1.5)
        exchange.status = 200
        exchange.responseBytes = 300
        reporter.finished(exchange)
    finally:
        globalLogPublisher.removeObserver(observer)
    sample = metrics.registry.get_sample_value
    labels = {"method": "POST", "path": "/v1/messages", "variant": "test"}
    assert sample("zai_proxy_requests_total", {**labels, "status_code": "200"}) == 1
    assert sample("zai_proxy_request_duration_seconds_sum", {**labels, "status_code": "200"}) == 2.0
    assert sample("zai_proxy_time_to_first_byte_seconds_sum", labels) == 0.5
    assert sample("zai_proxy_request_size_bytes_sum", labels) == 10
    assert sample("zai_proxy_response_size_bytes_sum", {**labels, "status_code": "200"}) == 300
    access = [e for e in events if e.get("log_namespace") == "zaiproxy.front.access"]
    assert len(access) == 1
    event = access[0]
    assert event["log_level"] is LogLevel.info
    assert (event["method"], event["route"], event["status"], event["model"]) == (
        "POST",
        "/v1/messages",
        200,
        "glm-4.7",
    )
    assert (event["bytesIn"], event["bytesOut"], event["ttfb"]) == (10, 300, 0.5)
    assert json.dumps({k: v for k, v in event.items() if not k.startswith("log_")})


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (b"/v1/nothing?key=abc", "/v1/nothing"),
        (b"/caf\xc3\xa9/a b\r\nforged\x1b[31m", "/caf%C3%A9/a%20b%0D%0Aforged%1B[31m"),
        (b"/%2e%2e/x", "/%2e%2e/x"),
        (b"/" + b"\xff" * 100, "/" + "%FF" * 65 + "..."),
        (b"/" + b"a" * 199, "/" + "a" * 199),
        (b"/" + b"a" * 200, "/" + "a" * 196 + "..."),
    ],
)
def test_loggedPath(uri: bytes, shown: str) -> None:
    """
    What a log line may show of a refused path: no query string, nothing
    outside printable ASCII as it is, at most 200 characters.
    """
    assert loggedPath(uri) == shown
    assert len(shown) <= MAX_LOGGED_PATH
