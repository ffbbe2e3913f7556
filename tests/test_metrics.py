"""
Tests for L{zaiproxy.observe.metrics}: the seed's names, types, labels and buckets.
"""

from __future__ import annotations

import pytest

from zaiproxy.observe.metrics import DURATION_BUCKETS, SIZE_BUCKETS, Metrics, methodLabel
from zaiproxy.observe.record import Record

# The Go seed's table (seed inventory section 8.1).
SEED = {
    "zai_proxy_requests": ("counter", ["method", "path", "status_code", "variant"]),
    "zai_proxy_request_duration_seconds": ("histogram", ["method", "path", "status_code", "variant"]),
    "zai_proxy_request_size_bytes": ("histogram", ["method", "path", "variant"]),
    "zai_proxy_response_size_bytes": ("histogram", ["method", "path", "status_code", "variant"]),
    "zai_proxy_concurrent_requests": ("gauge", ["variant"]),
    "zai_proxy_upstream_errors": ("counter", ["error_type", "variant"]),
    "zai_proxy_build_info": ("gauge", ["version", "variant", "commit", "build_time"]),
}


def test_seedNamesTypesAndLabels() -> None:
    """
    Every seed metric exists with the seed's type and label names.
    """
    metrics = Metrics("production", "1.2.3")
    metrics.requestFinished(
        Record(
            method="POST",
            route="/v1/messages",
            status=200,
            startedAt=0.0,
            duration=0.1,
            requestBytes=10,
            responseBytes=20,
        )
    )
    metrics.upstreamError("429")
    families = {f.name: f for f in metrics.registry.collect()}
    for name, (kind, labels) in SEED.items():
        family = families[name]
        assert family.type == kind, name
        sample = family.samples[0]
        assert sorted(k for k in sample.labels if k != "le") == sorted(labels), name


def test_buckets() -> None:
    """
    The duration and size buckets are the seed's.
    """
    assert DURATION_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
    assert SIZE_BUCKETS == (100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)
    metrics = Metrics("production", "1")
    metrics.requestFinished(Record(method="GET", route="/v1/models", status=200, startedAt=0.0, duration=0.2))
    bounds = [
        s.labels["le"]
        for f in metrics.registry.collect()
        if f.name == "zai_proxy_request_duration_seconds"
        for s in f.samples
        if s.name.endswith("_bucket")
    ]
    assert bounds == [
        "0.005",
        "0.01",
        "0.025",
        "0.05",
        "0.1",
        "0.25",
        "0.5",
        "1.0",
        "2.5",
        "5.0",
        "10.0",
        "30.0",
        "60.0",
        "120.0",
        "300.0",
        "+Inf",
    ]


@pytest.mark.parametrize(
    "method, label",
    [(b"GET", "GET"), (b"post", "POST"), (b"PROPFIND", "OTHER"), (b"\xff", "OTHER")],
)
def test_methodLabelIsBounded(method: bytes, label: str) -> None:
    """
    Unknown methods share one label, so clients cannot grow the series.
    """
    assert methodLabel(method) == label


def test_separateRegistries() -> None:
    """
    Two proxies in one process do not share counters.
    """
    a, b = Metrics("a", "1"), Metrics("b", "1")
    a.upstreamError("read_error")
    assert (
        b.registry.get_sample_value(
            "zai_proxy_upstream_errors_total", {"error_type": "read_error", "variant": "b"}
        )
        is None
    )
    assert (
        a.registry.get_sample_value(
            "zai_proxy_upstream_errors_total", {"error_type": "read_error", "variant": "a"}
        )
        == 1
    )
