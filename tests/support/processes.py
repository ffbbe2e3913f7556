"""
Running the real daemon: the twistd command, a clean environment, free
ports, and collecting a child's output.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, protocol, task

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def baseEnvironment() -> dict[str, str]:
    """
    PATH, and PYTHONPATH if set: a work tree on it must run its own code in
    twistd, not the installed copy's. DRAIN_GRACE=0: a process stops at
    once unless its test is about the grace. LEDGER_ENABLED=false: the
    default ledger is in the user's state folder, which tests must not
    share; a test of the ledger gives its own LEDGER_URL.
    """
    env = {name: os.environ[name] for name in ("PATH", "PYTHONPATH") if name in os.environ}
    return {**env, "DRAIN_GRACE": "0", "LEDGER_ENABLED": "false"}


class Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        # (exit code, signal): one of them is None.
        self.ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    def records(self) -> list[dict[str, Any]]:
        """
        The JSON log lines written to stdout (LOG_FORMAT=json).
        """
        return [json.loads(line) for line in self.out.decode().splitlines() if line.startswith("{")]


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def value(path: Path, key: str) -> str:
    values = [v for _, k, v in directives(path) if k == key]
    assert len(values) == 1, (key, values)
    return values[0]


def directives(path: Path) -> list[tuple[str, str, str]]:
    """
    A unit file as (section, key, value) in order (keys may repeat).
    """
    section = ""
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


async def listening(reactor: Any, port: int, tries: int = 100) -> None:
    """
    Wait until a daemon started on C{port} answers C{/readyz}.
    """
    for _ in range(tries):
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/readyz", persistent=False)
            await response.content()
            return
        except Exception:
            await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"nothing answered /readyz on port {port}")
