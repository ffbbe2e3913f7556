"""
Tests for L{zaiproxy.usage.body}: the request body as accounting keeps it.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading

import pytest

from zaiproxy.usage.body import COUNT_TOKENS_ROUTE, COUNTED_ROUTES, RequestBody


def test_requestBody() -> None:
    """
    The body stays readable after twisted.web closes its own copy (a
    temporary file is kept by a duplicate descriptor), until closed.
    """
    small = io.BytesIO(b'{"a":1}')
    body = RequestBody(small)
    small.close()
    assert body.read() == b'{"a":1}' and body.size == 7
    body.close()
    assert body.read() == b""
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 200_000)
        body = RequestBody(f)
    assert body.read() == b"x" * 200_000
    body.close()
    assert body.read() == b""
    body.close()


def test_closedUnderAReader(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A temporary-file body closed while a reader (a counting thread) holds
    it is closed by that reader when it is done, never under it.
    """
    with tempfile.TemporaryFile() as f:
        f.write(b"y" * 1000)
        body = RequestBody(f)
    descriptor = body._fd
    assert descriptor is not None
    reading = threading.Event()
    release = threading.Event()
    real = os.pread
    seen: list[bytes] = []

    def slowRead(fd: int, size: int, offset: int) -> bytes:
        reading.set()
        release.wait(5)
        return real(fd, size, offset)

    monkeypatch.setattr(os, "pread", slowRead)
    reader = threading.Thread(target=lambda: seen.append(body.read()))
    reader.start()
    assert reading.wait(5)
    body.close()
    # Still open: the reader holds it.
    os.fstat(descriptor)
    release.set()
    reader.join(5)
    monkeypatch.undo()
    assert seen == [b"y" * 1000]
    assert body._fd is None
    assert body.read() == b""


def test_countedRoutes() -> None:
    assert COUNTED_ROUTES == {"/v1/messages", "/v1/chat/completions", COUNT_TOKENS_ROUTE}
