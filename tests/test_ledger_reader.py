"""
Tests for L{zaiproxy.ledger.reader}: questions answered on the reader's
own threads, over read-only connections.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from zaiproxy.ledger.reader import LedgerReader
from zaiproxy.ledger.rows import Origin
from zaiproxy.ledger.store import SQLiteStore
from zaiproxy.observe.record import Record


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """
    A ledger holding one row.
    """
    opened = SQLiteStore(str(tmp_path / "ledger.sqlite3"))
    opened.open()
    opened.write(
        [
            Record(
                method="POST",
                route="/v1/messages",
                status=200,
                startedAt=1_796_000_000,
                duration=0.5,
                requestId="r1",
            )
        ],
        [],
        Origin("production", "host-1"),
    )
    yield opened
    opened.close()


def readerThreads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "zaiproxy-ledger-reader" in t.name]


def count(connection: sqlite3.Connection, table: str) -> tuple[int, str, sqlite3.Connection]:
    """
    A question: the table's row count, the thread that counted, and the
    connection it was given.
    """
    (found,) = connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return found, threading.current_thread().name, connection


@pytest_twisted.ensureDeferred
async def test_askRunsOnAReaderThread(reactor: Any, store: SQLiteStore) -> None:
    """
    The question runs on a thread of the reader's pool with its
    arguments, and its answer comes back; the connection is closed after.
    """
    reader = LedgerReader(reactor, store)
    reader.start()
    try:
        found, thread, connection = await reader.ask(count, "requests")
    finally:
        reader.stop()
    assert found == 1
    assert "zaiproxy-ledger-reader" in thread
    assert thread != threading.current_thread().name
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        connection.execute("SELECT 1")


def insert(connection: sqlite3.Connection) -> None:
    connection.execute("INSERT INTO schema_version (version) VALUES (7)")


@pytest_twisted.ensureDeferred
async def test_askIsReadOnly(reactor: Any, store: SQLiteStore) -> None:
    """
    A question that writes fails (its L{Deferred} with the error), and
    the reader answers the next one.
    """
    reader = LedgerReader(reactor, store)
    reader.start()
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await reader.ask(insert)
        found, _, _ = await reader.ask(count, "schema_version")
    finally:
        reader.stop()
    assert found == 1


@pytest_twisted.ensureDeferred
async def test_stopEndsTheThreads(reactor: Any, store: SQLiteStore) -> None:
    """
    After C{stop}, none of the pool's threads is left.
    """
    before = set(threading.enumerate())
    reader = LedgerReader(reactor, store, threads=2)
    reader.start()
    results = [reader.ask(count, "requests") for _ in range(4)]
    found = [(await d)[0] for d in results]
    assert readerThreads() != []
    reader.stop()
    assert found == [1, 1, 1, 1]
    assert readerThreads() == []
    assert set(threading.enumerate()) <= before
