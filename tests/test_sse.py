"""
Tests for L{zaiproxy.sse}.
"""

from __future__ import annotations

import pytest

from zaiproxy.sse import lastEventEnd


@pytest.mark.parametrize(
    "data, end",
    [
        (b"", 0),
        (b"data: x", 0),
        (b"data: x\n", 0),
        (b"data: x\n\n", 9),
        (b"data: x\n\ndata: y", 9),
        (b"data: x\r\n\r\n", 11),
        (b"data: x\r\n\r\ndata: y\n\n", 20),
        (b"data: x\n\ndata: y\r\n\r\npart", 20),
        (b"data: x\r\n\n", 10),
        (b"data: x\r\r", 0),
        (b"\n\n", 2),
    ],
)
def test_lastEventEnd(data: bytes, end: int) -> None:
    """
    The cut falls just after the last blank line, never inside an event.
    """
    assert lastEventEnd(data) == end
