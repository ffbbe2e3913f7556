"""
Tests for L{zaiproxy.observe.reporter}: the one door a finished request
leaves by.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

from zaiproxy.dialects.usage import Usage
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.record import Billed, Record
from zaiproxy.observe.reporter import Reporter

LABELS = {"method": "POST", "path": "/v1/messages", "variant": "test"}


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    # Any callable taking an event is an observer; the annotation wants the interface.
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def record(**fields: Any) -> Record:
    values: dict[str, Any] = dict(
        method="POST",
        route="/v1/messages",
        status=200,
        startedAt=0.0,
        duration=2.0,
        ttfb=0.5,
        requestBytes=10,
        responseBytes=300,
        model="glm-4.7",
    )
    values.update(fields)
    return Record(**values)


def test_finished(events: list[dict[str, Any]]) -> None:
    """
    A record becomes the request's metric samples and one access-log event
    with its fields.
    """
    metrics = Metrics("test", "1.0")
    Reporter(metrics).finished(record())
    sample = metrics.registry.get_sample_value
    assert sample("zai_proxy_requests_total", {**LABELS, "status_code": "200"}) == 1
    assert sample("zai_proxy_request_duration_seconds_sum", {**LABELS, "status_code": "200"}) == 2.0
    assert sample("zai_proxy_time_to_first_byte_seconds_sum", LABELS) == 0.5
    assert sample("zai_proxy_request_size_bytes_sum", LABELS) == 10
    assert sample("zai_proxy_response_size_bytes_sum", {**LABELS, "status_code": "200"}) == 300
    access = [e for e in events if e.get("log_namespace") == "zaiproxy.access"]
    assert len(access) == 1
    event = access[0]
    assert event["log_level"] is LogLevel.info
    assert event["line"] == "POST /v1/messages 200 2.000s in=10 out=300 model=glm-4.7"
    assert (event["bytesIn"], event["bytesOut"], event["ttfb"]) == (10, 300, 0.5)
    assert json.dumps({k: v for k, v in event.items() if not k.startswith("log_")})
    assert not [e for e in events if e.get("log_namespace") == "zaiproxy.tokens"]


def test_requestId(events: list[dict[str, Any]]) -> None:
    """
    The request's id ends the access line and is a field of its event.
    """
    Reporter(Metrics("test", "1.0")).finished(record(requestId="0123456789abcdef", keyName="alice"))
    [event] = [e for e in events if e.get("log_namespace") == "zaiproxy.access"]
    assert event["line"].endswith(" model=glm-4.7 client=alice id=0123456789abcdef")
    assert event["requestId"] == "0123456789abcdef"


def test_failuresCountedOnce(events: list[dict[str, Any]]) -> None:
    """
    Each upstream failure, Z.AI error and retry the record holds is counted
    once, and the last error shows in the access line.
    """
    metrics = Metrics("test", "1.0")
    Reporter(metrics).finished(
        record(
            status=502,
            errorType="read_error",
            upstreamErrors=("429", "read_error"),
            zaiErrors=(("frequency", "1303"),),
            retries=("429",),
            keyName="alice",
        )
    )
    sample = metrics.registry.get_sample_value
    for errorType in ("429", "read_error"):
        assert sample("zai_proxy_upstream_errors_total", {"error_type": errorType, "variant": "test"}) == 1
    assert (
        sample("zai_proxy_zai_errors_total", {"class": "frequency", "code": "1303", "variant": "test"}) == 1
    )
    assert sample("zai_proxy_retry_attempts_total", {"reason": "retry", "variant": "test"}) == 1
    assert sample("zai_proxy_retry_attempts_total", {"reason": "429", "variant": "test"}) == 1
    [line] = [e["line"] for e in events if e.get("log_namespace") == "zaiproxy.access"]
    assert line.endswith(" error=read_error client=alice")


def test_billed(events: list[dict[str, Any]]) -> None:
    """
    A billed answer's tokens, cost, source and output rate are counted, and
    the usage line follows the access line.
    """
    metrics = Metrics("test", "1.0")
    billed = Billed(Usage(input=17, output=3), "reported", "glm-4.7", "glm-4.7", "peak", {"input": 0.5}, 6.0)
    Reporter(metrics).finished(record(billed=billed))
    sample = metrics.registry.get_sample_value
    tokenLabels = {"model": "glm-4.7", "variant": "test", "pricing_tier": "peak", "client": "-"}
    assert sample("zai_proxy_tokens_total", {"direction": "input", **tokenLabels}) == 17
    assert sample("zai_proxy_tokens_total", {"direction": "output", **tokenLabels}) == 3
    assert sample("zai_proxy_estimated_cost_usd_total", {"direction": "input", **tokenLabels}) == 0.5
    # The child exists once its tokens are counted; a price of 0 adds nothing.
    assert sample("zai_proxy_estimated_cost_usd_total", {"direction": "output", **tokenLabels}) == 0
    assert sample("zai_proxy_token_usage_source_total", {"source": "reported", "variant": "test"}) == 1
    rate = {"direction": "output", "model": "glm-4.7", "variant": "test"}
    assert sample("zai_proxy_token_rate_sum", rate) == 6.0
    namespaces = [e["log_namespace"] for e in events if e.get("log_namespace", "").startswith("zaiproxy.")]
    assert namespaces == ["zaiproxy.access", "zaiproxy.tokens"]
    assert events[-1]["line"] == (
        "Token usage: input=17, output=3, cache_read=0, cache_write=0, source=reported, model=glm-4.7"
    )


def test_sinks(events: list[dict[str, Any]]) -> None:
    """
    Every record reaches each sink; a sink that raises is logged, and the
    next one still gets the record.
    """
    reporter = Reporter(Metrics("test", "1.0"))
    got: list[Record] = []

    def broken(record: Record) -> None:
        raise ValueError("sink broke")

    reporter.addSink(broken)
    reporter.addSink(got.append)
    finished = record(status=499)
    reporter.finished(finished)
    assert got == [finished]
    [failure] = [e["log_failure"] for e in events if "log_failure" in e]
    assert failure.check(ValueError)
    failure.cleanFailure()


def test_limiterEvents() -> None:
    """
    The limiter's adjustments, admissions and refusals come through the
    reporter as its observer.
    """
    metrics = Metrics("test", "1.0")
    reporter = Reporter(metrics)
    reporter.rateAdjusted("down")
    reporter.admitted("alice", 0.25)
    reporter.refused("bob")
    sample = metrics.registry.get_sample_value
    assert sample("zai_proxy_rate_limit_adjustments_total", {"direction": "down", "variant": "test"}) == 1
    assert sample("zai_proxy_rate_limit_wait_seconds_sum", {"client": "alice", "variant": "test"}) == 0.25
    assert sample("zai_proxy_rate_limit_rejections_total", {"client": "bob", "variant": "test"}) == 1
