"""
Tests for L{zaiproxy.observe.record}.
"""

from __future__ import annotations

import io
import tempfile

import attrs
import pytest

from zaiproxy.dialects.usage import Usage
from zaiproxy.observe.record import MAX_LOGGED_PATH, Billed, Exchange, loggedPath, sniffModel


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


def test_freeze() -> None:
    """
    A finished exchange freezes into a record with its duration and time
    to first byte, and every failure, Z.AI error and retry it saw.
    """
    exchange = Exchange(method="POST", route="/v1/messages", startedAt=100.0, requestBytes=10, model="m")
    exchange.firstByteAt = 100.5
    exchange.retries += ("429",)
    exchange.zaiErrors += (("frequency", "1303"),)
    exchange.failed("429")
    exchange.failed("read_error")
    exchange.status = 502
    billed = Billed(Usage(3, 4), "partial", "m", None, "off_peak", {"input": 0.25, "output": 0.5})
    record = exchange.freeze(102.0, billed)
    assert (record.duration, record.ttfb, record.status) == (2.0, 0.5, 502)
    assert record.upstreamErrors == ("429", "read_error")
    assert record.errorType == "read_error"
    assert record.zaiErrors == (("frequency", "1303"),)
    assert record.retries == ("429",)
    assert record.billed is billed and billed.cost == 0.75
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        record.status = 200  # type: ignore[misc]
    assert Exchange(method="GET", route="/health", startedAt=1.0).freeze(1.0).ttfb is None


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
