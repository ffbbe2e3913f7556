"""
A real PostgreSQL server for tests: the machine's own (Debian's
C{postgresql} package), initialised in a temporary folder and listening on
a free loopback port, one per test session; each test gets a database of
its own.

PostgreSQL refuses to run as root, so as root (CI) the server runs as the
C{postgres} user the package created.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from support.processes import freePort

__all__ = ["RunningPostgres", "postgresBin", "startPostgres"]


def postgresBin() -> Path | None:
    """
    The newest installed PostgreSQL's bin folder, if any.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _run(argv: Sequence[str], asPostgres: bool) -> None:
    command = ["runuser", "-u", "postgres", "--", *argv] if asPostgres else list(argv)
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stdout}{done.stderr}")


@attrs.define
class RunningPostgres:
    """
    A server, and the way to make a database on it and to stop it.
    """

    bin: Path
    folder: Path
    port: int
    asPostgres: bool
    made: int = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://zaiproxy@127.0.0.1:{self.port}/{database}"

    def newDatabase(self) -> str:
        """
        A fresh, empty database; its URL.
        """
        import psycopg

        self.made += 1
        name = f"test_{self.made}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def halt(self, mode: str = "fast") -> None:
        """
        Stop the server, cutting every connection (its data stays; L{resume}
        starts it again). C{fast} flushes first: the test server runs with
        C{synchronous_commit=off}, so C{immediate} may lose commits.
        """
        data = str(self.folder / "data")
        _run([str(self.bin / "pg_ctl"), "-D", data, "-m", mode, "stop"], self.asPostgres)

    def resume(self) -> None:
        _start(self.bin, self.folder, self.port, self.asPostgres)

    def stop(self) -> None:
        self.halt("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def startPostgres() -> RunningPostgres:
    """
    initdb and start a server on a free loopback port (no fsync: a test
    server's data need not survive a power cut).
    """
    bin = postgresBin()
    if bin is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    asPostgres = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="zaiproxy-pg-"))
    folder.chmod(0o755)
    if asPostgres:
        shutil.chown(folder, "postgres", "postgres")
    port = freePort()
    data = str(folder / "data")
    _run(
        [str(bin / "initdb"), "-D", data, "-U", "zaiproxy", "--auth=trust", "-E", "UTF8", "--no-sync"],
        asPostgres,
    )
    _start(bin, folder, port, asPostgres)
    return RunningPostgres(bin, folder, port, asPostgres)


def _start(bin: Path, folder: Path, port: int, asPostgres: bool) -> None:
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    data, log = str(folder / "data"), str(folder / "log")
    _run([str(bin / "pg_ctl"), "-D", data, "-o", options, "-l", log, "-w", "start"], asPostgres)
