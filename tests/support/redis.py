"""
A real Redis server for tests: the machine's own (Debian's
C{redis-server} package) on a free loopback port, without persistence,
one per test session; each test gets a database number of its own, so
tests never see each other's keys. L{RunningRedis.halt} and
L{RunningRedis.resume} stop and start it on the same port, for outages.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import attrs

from support.processes import freePort

__all__ = ["RunningRedis", "redisBin", "startRedis"]

#: Redis's default: databases 0 to 15.
DATABASES = 16


def redisBin() -> str | None:
    return shutil.which("redis-server")


@attrs.define
class RunningRedis:
    """
    A server, the way to hand out a fresh database on it, and to stop it.
    """

    folder: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    made: int = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def newDatabase(self) -> str:
        """
        The URL of an emptied database (numbers are reused after 15).
        """
        self.made += 1
        db = self.made % DATABASES
        self.command("SELECT", str(db), "FLUSHDB")
        return self.url(db)

    def command(self, *words: str) -> bytes:
        """
        Send commands in Redis's inline form; the raw reply.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if words[0] == "SELECT":
                s.sendall(f"SELECT {words[1]}\r\n".encode())
                s.recv(100)
                words = words[2:]
            s.sendall((" ".join(words) + "\r\n").encode())
            return s.recv(65536)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(redisBin()),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--databases",
                str(DATABASES),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def halt(self) -> None:
        """
        Kill the server (an outage): every connection is cut at once.
        """
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def resume(self) -> None:
        self.start()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.folder, ignore_errors=True)


def startRedis() -> RunningRedis:
    server = RunningRedis(Path(tempfile.mkdtemp(prefix="zaiproxy-redis-")), freePort())
    server.start()
    return server
