# -*- test-case-name: tests.test_ledger_postgres -*-
"""
The ledger on PostgreSQL (C{LEDGER_URL=postgresql://...}): the same schema
files, the same batches and the same reports as on SQLite, so every
instance writing to one database shows the whole fleet's usage.

psycopg 3, used synchronously on the writer thread and the reader
threads, as the SQLite store is: the reactor never waits for the database.
Rollups need no coordination between instances: each batch adds its own
sums (C{ON CONFLICT ... DO UPDATE}), and an instance's rows carry its name
in the rollup key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg

from zaiproxy.ledger.migrations import LedgerAway, LedgerError, migrations
from zaiproxy.ledger.rows import GaugeSample, Origin, Rollups, requestRow
from zaiproxy.ledger.store import (
    INSERT_REQUEST,
    UPSERT_GAUGES,
    UPSERT_HOUR,
    UPSERT_MINUTE,
    Retention,
)
from zaiproxy.observe.record import Record

__all__ = ["PostgresStore", "isPostgresURL"]

#: How long opening a connection may take.
CONNECT_SECONDS = 5
#: How long one statement may run before the server cancels it.
STATEMENT_MILLISECONDS = 30_000


def isPostgresURL(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def _placeholders(sql: str) -> str:
    """
    The store's SQL is written with C{?} (SQLite's); psycopg takes C{%s}.
    """
    return sql.replace("%", "%%").replace("?", "%s")


class PortableConnection:
    """
    A psycopg connection that takes the reports' SQLite-style SQL and
    gives plain Python numbers (PostgreSQL's SUM of a BIGINT is NUMERIC).
    """

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Rows:
        cursor = self._connection.execute(_placeholders(sql), list(params))
        return _Rows(cursor)

    def close(self) -> None:
        self._connection.close()


class _Rows:
    """
    A cursor's rows with NUMERIC values as float, so the reports' sums and
    JSON work alike on both databases.
    """

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for row in self._cursor:
            yield _plain(row)

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cursor.fetchone()
        return None if row is None else _plain(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [_plain(row) for row in self._cursor.fetchall()]


def _plain(row: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(float(value) if isinstance(value, Decimal) else value for value in row)


class PostgresStore:
    """
    The ledger in a PostgreSQL database.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        # Shown in logs: the URL without its password.
        self.path = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
        self._connection: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.url,
            connect_timeout=CONNECT_SECONDS,
            options=f"-c statement_timeout={STATEMENT_MILLISECONDS}",
        )

    def open(self) -> int:
        """
        Connect and migrate; return the schema version.

        @raise LedgerError: with what went wrong (never the password).
        """
        try:
            connection = self._connect()
        except psycopg.OperationalError as e:
            raise LedgerAway(f"cannot reach the ledger {self.path}: {_firstLine(e)}") from None
        except psycopg.Error as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {_firstLine(e)}") from None
        try:
            version = _migrate(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return version

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def write(self, records: Sequence[Record], gauges: Sequence[GaugeSample], origin: Origin) -> None:
        """
        One batch, in one transaction, as L{SQLiteStore.write} does.
        """
        connection = self._connected()
        with connection.transaction(), connection.cursor() as cursor:
            rows = self._newRows(cursor, records, origin)
            rollups = Rollups(origin)
            rollups.add(record for record, _ in rows)
            for sql, values in (
                (INSERT_REQUEST, [row for _, row in rows]),
                (UPSERT_MINUTE, rollups.rows(rollups.minutes)),
                (UPSERT_HOUR, rollups.rows(rollups.hours)),
                (UPSERT_GAUGES, [g.row(origin) for g in gauges]),
            ):
                if values:
                    cursor.executemany(_placeholders(sql), values)

    def _connected(self) -> psycopg.Connection[Any]:
        """
        The writer's connection, made again if the last one broke (the
        server restarted, the network dropped it).
        """
        connection = self._connection
        if connection is None:
            raise LedgerError("the ledger is not open")
        if connection.closed or connection.broken:
            connection.close()
            self._connection = connection = self._connect()
        return connection

    def transient(self, error: BaseException) -> bool:
        """
        The server or the network away (a new connection may work), not a
        problem with the rows.
        """
        return isinstance(error, psycopg.OperationalError)

    @staticmethod
    def _newRows(
        cursor: psycopg.Cursor[Any], records: Sequence[Record], origin: Origin
    ) -> list[tuple[Record, tuple[Any, ...]]]:
        """
        The records whose id is not in the ledger yet (another instance's
        batch never collides: ids are random), counted once.
        """
        rows: dict[str, tuple[Record, tuple[Any, ...]]] = {}
        for record in records:
            row = requestRow(record, origin)
            rows.setdefault(row[0], (record, row))
        cursor.execute("SELECT request_id FROM requests WHERE request_id = ANY(%s)", [list(rows)])
        for (known,) in cursor.fetchall():
            del rows[known]
        return list(rows.values())

    def prune(self, now: float, retention: Retention) -> int:
        connection = self._connected()
        deleted = 0
        with connection.transaction(), connection.cursor() as cursor:
            for table, column, keep in (
                ("requests", "started_at", retention.requests),
                ("usage_minute", "bucket", retention.minutes),
                ("gauges_minute", "bucket", retention.hours),
                ("usage_hour", "bucket", retention.hours),
            ):
                cursor.execute(f"DELETE FROM {table} WHERE {column} < %s", [now - keep])
                deleted += max(cursor.rowcount, 0)
        return deleted

    def reader(self) -> PortableConnection:
        """
        A new connection for one question, read-only.
        """
        connection = self._connect()
        connection.read_only = True
        connection.autocommit = True
        return PortableConnection(connection)


def _migrate(connection: psycopg.Connection[Any]) -> int:
    """
    L{zaiproxy.ledger.migrations.migrate}, on PostgreSQL: each file and its
    version row in one transaction (PostgreSQL's DDL is transactional).
    An advisory lock keeps two instances starting at once from both
    applying a file.
    """
    try:
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(1601)")
            connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = (row[0] if row else None) or 0
            known = migrations()
            if current > len(known):
                raise LedgerError(
                    f"the ledger's schema is version {current}, newer than this zaiproxy knows "
                    f"({len(known)}): upgrade zaiproxy, or point LEDGER_URL at another database"
                )
            for version, sql in known[current:]:
                connection.execute(sql.encode())  # several statements, no parameters
                connection.execute("INSERT INTO schema_version (version) VALUES (%s)", [version])
                current = version
    except psycopg.Error as e:
        raise LedgerError(f"schema migration failed: {_firstLine(e)}") from None
    return current


def _firstLine(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
