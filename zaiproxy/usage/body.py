# -*- test-case-name: tests.test_body -*-
"""
The request body as accounting keeps it, and which routes are accounted for.
"""

from __future__ import annotations

import io
import os
import threading
from typing import IO

__all__ = ["COUNTED_ROUTES", "COUNT_TOKENS_ROUTE", "RequestBody"]

#: The routes whose answers are model calls, to account for.
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"
COUNTED_ROUTES = frozenset(["/v1/messages", "/v1/chat/completions", COUNT_TOKENS_ROUTE])


class RequestBody:
    """
    The request body, still readable after twisted.web closes the request's
    own copy (a client that leaves is still billed for its prompt).

    A temporary-file body is kept as a duplicate file descriptor and read
    only if its tokens are needed; it is closed when the last reader (a
    counting thread, perhaps) is done, never under it. A small body (made
    on every counted request, before its first byte) is just its bytes.
    """

    _bytes: bytes | None = None
    _fd: int | None = None

    def __init__(self, content: IO[bytes]) -> None:
        if type(content) is io.BytesIO:
            self._bytes = content.getvalue()
            self.size = len(self._bytes)
            return
        self._lock = threading.Lock()
        self._readers = 0
        self._closing = False
        content.seek(0, 2)
        self.size = content.tell()
        content.seek(0)
        self._fd = os.dup(content.fileno())

    def read(self) -> bytes:
        if self._bytes is not None:
            return self._bytes
        if self._fd is None:
            return b""
        with self._lock:
            if self._fd is None or self._closing:
                return b""
            self._readers += 1
            fd = self._fd
        try:
            return os.pread(fd, self.size, 0)
        finally:
            with self._lock:
                self._readers -= 1
                self._closeIfIdle()

    def close(self) -> None:
        if self._fd is None:
            self._bytes = b""
            return
        with self._lock:
            self._closing = True
            self._closeIfIdle()

    def _closeIfIdle(self) -> None:
        if self._closing and self._readers == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None
