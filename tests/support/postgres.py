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

    def stop(self) -> None:
        _run(
            [str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"],
            self.asPostgres,
        )
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
    data = folder / "data"
    _run(
        [str(bin / "initdb"), "-D", str(data), "-U", "zaiproxy", "--auth=trust", "-E", "UTF8", "--no-sync"],
        asPostgres,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    _run(
        [str(bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
        asPostgres,
    )
    return RunningPostgres(bin, folder, port, asPostgres)
