# -*- test-case-name: tests.test_ledger_store -*-
"""
The SQLite ledger file: where it is, how it is opened, and what one batch
writes.

Blocking code: the writer thread (L{zaiproxy.ledger.writer}) calls
L{SQLiteStore.write}, the reader's threads open their own read-only
connections; the reactor thread never touches the file.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote

import attrs

from zaiproxy.ledger.migrations import LedgerError, migrate
from zaiproxy.ledger.rows import (
    REQUEST_COLUMNS,
    ROLLUP_KEYS,
    ROLLUP_SUMS,
    GaugeSample,
    Origin,
    Rollups,
    requestRow,
)
from zaiproxy.observe.record import Record

__all__ = [
    "INSERT_REQUEST",
    "UPSERT_GAUGES",
    "UPSERT_HOUR",
    "UPSERT_MINUTE",
    "LedgerStore",
    "Reading",
    "Retention",
    "SQLiteStore",
    "sqlitePath",
]

INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(REQUEST_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
)


def _upsert(table: str) -> str:
    """
    Add a batch's sums to a rollup row, creating it the first time.
    """
    columns = (*ROLLUP_KEYS, *ROLLUP_SUMS)
    added = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in ROLLUP_SUMS)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}) DO UPDATE SET {added}"
    )


UPSERT_MINUTE = _upsert("usage_minute")
UPSERT_HOUR = _upsert("usage_hour")
UPSERT_GAUGES = (
    "INSERT INTO gauges_minute (bucket, variant, instance, concurrent_max, max_workers, rate_limit_rps, "
    "rate_limit_ceiling, adj_increase, adj_decrease, quota) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (bucket, variant, instance) DO UPDATE SET concurrent_max = excluded.concurrent_max, "
    "max_workers = excluded.max_workers, rate_limit_rps = excluded.rate_limit_rps, "
    "rate_limit_ceiling = excluded.rate_limit_ceiling, adj_increase = excluded.adj_increase, "
    "adj_decrease = excluded.adj_decrease, quota = excluded.quota"
)


def sqlitePath(url: str) -> str:
    """
    The file of a C{sqlite:///path} URL (three slashes, then the path, as
    C{sqlite:///var/lib/zaiproxy/ledger.sqlite3}).

    @raise ValueError: not a SQLite URL, or no path.
    """
    scheme, sep, rest = url.partition("://")
    if scheme != "sqlite" or not sep:
        raise ValueError(f"expected sqlite:///path/to/ledger.sqlite3, not {url!r}")
    if not rest.startswith("/") or not rest.strip("/"):
        raise ValueError("a sqlite URL needs a path after three slashes: sqlite:///path/to/ledger.sqlite3")
    return "/" + rest.lstrip("/")


class Reading(Protocol):
    """
    A read-only connection, as the reports use it: C{execute} with
    SQLite-style C{?} parameters, rows as tuples.
    """

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def close(self) -> None: ...


class LedgerStore(Protocol):
    """
    Where the ledger is kept: L{SQLiteStore} or
    L{zaiproxy.ledger.postgres.PostgresStore}.
    """

    path: str

    def open(self) -> int: ...

    def close(self) -> None: ...

    def write(self, records: Sequence[Record], gauges: Sequence[GaugeSample], origin: Origin) -> None: ...

    def prune(self, now: float, retention: Retention) -> int: ...

    def reader(self) -> Reading: ...

    def transient(self, error: BaseException) -> bool:
        """
        Whether a write that raised C{error} may work if tried again (the
        database is away or busy), rather than never.
        """
        ...


@attrs.frozen
class Retention:
    """
    How long each table keeps its rows, in seconds.
    """

    requests: float
    minutes: float
    hours: float


class SQLiteStore:
    """
    The ledger in one SQLite file, in WAL mode: readers never block the
    writer, and a killed process loses at most the transaction in flight.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None

    def open(self) -> int:
        """
        Open (creating the folder and file) and migrate; return the schema
        version. Called on the writer thread, which alone uses the
        connection afterwards.

        @raise LedgerError: with what went wrong and where.
        """
        try:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, mode=0o750, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}") from None
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a crash of the process
            # (not of the machine's power), at a tenth of FULL's fsyncs.
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=5000")
            version = migrate(connection)
        except (OSError, sqlite3.Error, LedgerError) as e:
            connection.close()
            if isinstance(e, LedgerError):
                raise
            raise LedgerError(f"cannot open the ledger {self.path}: {e}") from None
        self._connection = connection
        return version

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def write(self, records: Sequence[Record], gauges: Sequence[GaugeSample], origin: Origin) -> None:
        """
        One batch, in one transaction: the rows, and their rollups added.
        """
        connection = self._connection
        if connection is None:
            raise LedgerError("the ledger is not open")
        with _transaction(connection):
            rows = [(record, requestRow(record, origin)) for record in records]
            before = connection.total_changes
            connection.executemany(INSERT_REQUEST, [row for _, row in rows])
            if connection.total_changes - before < len(rows):
                # A request id already written (or twice in the batch): undo,
                # and write only the new ones, so each is counted once.
                connection.execute("ROLLBACK")
                connection.execute("BEGIN")
                rows = self._newRows(connection, records, origin)
                connection.executemany(INSERT_REQUEST, [row for _, row in rows])
            rollups = Rollups(origin)
            rollups.add(record for record, _ in rows)
            connection.executemany(UPSERT_MINUTE, rollups.rows(rollups.minutes))
            connection.executemany(UPSERT_HOUR, rollups.rows(rollups.hours))
            connection.executemany(UPSERT_GAUGES, [g.row(origin) for g in gauges])

    @staticmethod
    def _newRows(
        connection: sqlite3.Connection, records: Sequence[Record], origin: Origin
    ) -> list[tuple[Record, tuple[Any, ...]]]:
        """
        The batch's records whose request id is not in the ledger yet, with
        their rows: a request is counted once, in its row and its rollups.
        """
        rows: dict[str, tuple[Record, tuple[Any, ...]]] = {}
        for record in records:
            row = requestRow(record, origin)
            rows.setdefault(row[0], (record, row))
        ids = list(rows)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for (known,) in connection.execute(
                f"SELECT request_id FROM requests WHERE request_id IN ({marks})", chunk
            ):
                del rows[known]
        return list(rows.values())

    def prune(self, now: float, retention: Retention) -> int:
        """
        Delete what is past its retention; return the rows deleted.
        """
        connection = self._connection
        if connection is None:
            raise LedgerError("the ledger is not open")
        deleted = 0
        with _transaction(connection):
            for sql, keep in (
                ("DELETE FROM requests WHERE started_at < ?", retention.requests),
                ("DELETE FROM usage_minute WHERE bucket < ?", retention.minutes),
                # One row a minute per process: kept as long as the hours, so
                # the 30-day view has its gauge lines too.
                ("DELETE FROM gauges_minute WHERE bucket < ?", retention.hours),
                ("DELETE FROM usage_hour WHERE bucket < ?", retention.hours),
            ):
                deleted += connection.execute(sql, (now - keep,)).rowcount
        return deleted

    def transient(self, error: BaseException) -> bool:
        """
        Locked, busy, full or failing disks: worth another try. A
        constraint or a programming error is not.
        """
        return isinstance(error, sqlite3.OperationalError)

    def reader(self) -> sqlite3.Connection:
        """
        A new read-only connection, for one query on a reader thread.
        """
        connection = sqlite3.connect(f"file:{quote(self.path)}?mode=ro", uri=True, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout=5000")
        return connection


class _transaction:
    """
    C{BEGIN} ... C{COMMIT}, or C{ROLLBACK} when the body raises.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN")

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self._connection.execute("ROLLBACK" if kind is not None else "COMMIT")
