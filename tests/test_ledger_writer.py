"""
Tests for L{zaiproxy.ledger.writer}: the real writer thread, a real SQLite
file, the global reactor.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from zaiproxy.ledger.rows import GaugeSample, Origin
from zaiproxy.ledger.store import Retention, SQLiteStore
from zaiproxy.ledger.writer import LedgerWriter
from zaiproxy.observe.record import Record

T0 = 1_796_000_000.0
ORIGIN = Origin("production", "host-1")
#: Long enough that nothing written here is pruned.
RETENTION = Retention(86400, 86400, 86400)


def record(i: int) -> Record:
    return Record(
        method="POST", route="/v1/messages", status=200, startedAt=T0 + i, duration=0.5, requestId=f"req-{i}"
    )


def clock() -> float:
    return T0 + 60


def rows(path: Path) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT request_id FROM requests ORDER BY request_id").fetchall()
    finally:
        connection.close()


def writerThreads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "zaiproxy-ledger"]


@pytest_twisted.ensureDeferred
async def test_stopFlushes(reactor: Any, tmp_path: Path) -> None:
    """
    Rows queued before C{stop} are written when it fires (one batch), the
    gauges too, and the writer's thread is gone.
    """
    path = tmp_path / "ledger.sqlite3"
    written: list[int] = []
    writer = LedgerWriter(
        reactor, SQLiteStore(str(path)), ORIGIN, RETENTION, onWritten=written.append, wallClock=clock
    )
    assert writer.open() == 1
    writer.add(record(1))
    writer.add(record(2))
    writer.addGauges(GaugeSample(1_795_999_980, 1, 10, 1.0, 2.0, 0, 0, None))
    writer.add(record(3))
    assert writer.queued == 4
    writer.start()
    await writer.stop()
    assert rows(path) == [("req-1",), ("req-2",), ("req-3",)]
    assert written == [3]
    assert writer.queued == 0
    assert writerThreads() == []
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("SELECT bucket, concurrent_max FROM gauges_minute").fetchall() == [
            (1_795_999_980, 1)
        ]
        assert connection.execute("SELECT SUM(requests) FROM usage_minute").fetchone() == (3,)
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_stopTwice(reactor: Any, tmp_path: Path) -> None:
    """
    C{stop} again gives the same (fired) L{Deferred}.
    """
    writer = LedgerWriter(
        reactor, SQLiteStore(str(tmp_path / "l.sqlite3")), ORIGIN, RETENTION, wallClock=clock
    )
    writer.open()
    writer.start()
    stopped = writer.stop()
    assert writer.stop() is stopped
    await stopped
    assert writerThreads() == []


@pytest_twisted.ensureDeferred
async def test_fullQueueDrops(reactor: Any, tmp_path: Path) -> None:
    """
    When the queue is full, C{add} drops the row at once and says so,
    once per row dropped; gauge samples count against the same queue.
    """
    dropped: list[tuple[int, str]] = []
    writer = LedgerWriter(
        reactor,
        SQLiteStore(str(tmp_path / "l.sqlite3")),
        ORIGIN,
        RETENTION,
        capacity=2,
        onDropped=lambda n, why: dropped.append((n, why)),
        wallClock=clock,
    )
    writer.add(record(1))
    writer.add(record(2))
    assert dropped == []
    writer.add(record(3))
    writer.addGauges(GaugeSample(0, 0, 0, 0.0, 0.0, 0, 0, None))
    writer.add(record(4))
    assert dropped == [(1, "queue_full")] * 3
    assert writer.queued == 2
    await writer.stop()


class FailingOnce(SQLiteStore):
    """
    A store whose first C{write} fails.
    """

    failed = False

    def write(self, records: Sequence[Record], gauges: Sequence[GaugeSample], origin: Origin) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("disk full")
        super().write(records, gauges, origin)


@pytest_twisted.ensureDeferred
async def test_writeError(reactor: Any, tmp_path: Path, logEvents: list[dict[str, Any]]) -> None:
    """
    A batch that cannot be written is counted as dropped (on the reactor
    thread) and logged; the writer goes on with the next batch.
    """
    path = tmp_path / "ledger.sqlite3"
    dropped: Deferred[tuple[int, str, bool]] = Deferred()
    written: Deferred[int] = Deferred()
    writer = LedgerWriter(
        reactor,
        FailingOnce(str(path)),
        ORIGIN,
        RETENTION,
        onDropped=lambda n, why: dropped.callback(
            (n, why, threading.current_thread() is threading.main_thread())
        ),
        onWritten=lambda n: reactor.callFromThread(written.callback, n),
        wallClock=clock,
    )
    writer.open()
    writer.add(record(1))
    writer.add(record(2))
    writer.start()
    try:
        assert await dropped == (2, "write_error", True)
        writer.add(record(3))
        assert await written == 1
    finally:
        await writer.stop()
    assert rows(path) == [("req-3",)]
    assert writerThreads() == []
    failures = [e for e in logEvents if e.get("log_failure") is not None]
    assert [e["log_format"] for e in failures] == ["writing {n} ledger row(s) failed; they are lost"]
    assert failures[0]["n"] == 2
    assert failures[0]["log_failure"].check(OSError)


@pytest_twisted.ensureDeferred
async def test_prunesAtStart(reactor: Any, tmp_path: Path) -> None:
    """
    The writer prunes by the retention as it starts, by its wall clock.
    """
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteStore(str(path))
    store.open()
    store.write([record(-3600), record(0)], [], ORIGIN)
    store.close()
    writer = LedgerWriter(
        reactor, SQLiteStore(str(path)), ORIGIN, Retention(600, 86400, 86400), wallClock=clock
    )
    writer.open()
    writer.start()
    await writer.stop()
    assert rows(path) == [("req-0",)]


@pytest_twisted.ensureDeferred
async def test_stopWithoutStart(reactor: Any, tmp_path: Path) -> None:
    """
    A writer that never started stops at once, closing its store.
    """
    store = SQLiteStore(str(tmp_path / "l.sqlite3"))
    writer = LedgerWriter(reactor, store, ORIGIN, RETENTION, wallClock=clock)
    writer.open()
    stopped = writer.stop()
    assert stopped.called
    await stopped
    assert writerThreads() == []


@pytest_twisted.ensureDeferred
async def test_stopWithoutStartCountsWhatWasQueued(reactor: Any, tmp_path: Path) -> None:
    """
    Rows queued to a writer that never started are reported lost, not
    dropped in silence.
    """
    dropped: list[tuple[int, str]] = []
    store = SQLiteStore(str(tmp_path / "l.sqlite3"))
    writer = LedgerWriter(
        reactor, store, ORIGIN, RETENTION, wallClock=clock, onDropped=lambda n, why: dropped.append((n, why))
    )
    writer.open()
    writer.add(record(0))
    writer.add(record(1))
    await writer.stop()
    assert dropped == [(2, "write_error")]


class AwayTwice(SQLiteStore):
    """
    A store whose database is away (locked) for its first two writes.
    """

    tries = 0

    def write(self, records: Sequence[Record], gauges: Sequence[GaugeSample], origin: Origin) -> None:
        self.tries += 1
        if self.tries <= 2:
            raise sqlite3.OperationalError("database is locked")
        super().write(records, gauges, origin)


@pytest_twisted.ensureDeferred
async def test_databaseAwayKeepsRowsAndRetries(reactor: Any, tmp_path: Path) -> None:
    """
    While the database is away the batch goes back to the queue and is
    tried again, longer apart; once it answers every row is written and
    none was dropped.
    """
    path = tmp_path / "ledger.sqlite3"
    dropped: list[tuple[int, str]] = []
    written: Deferred[int] = Deferred()
    store = AwayTwice(str(path))
    writer = LedgerWriter(
        reactor,
        store,
        ORIGIN,
        RETENTION,
        onDropped=lambda n, why: dropped.append((n, why)),
        onWritten=lambda n: reactor.callFromThread(written.callback, n),
        wallClock=clock,
        retryBase=0.05,
    )
    writer.open()
    writer.add(record(1))
    writer.add(record(2))
    writer.start()
    try:
        assert await written == 2
    finally:
        await writer.stop()
    assert (store.tries, dropped) == (3, [])
    assert rows(path) == [("req-1",), ("req-2",)]


class AlwaysAway(SQLiteStore):
    def write(self, records: Sequence[Record], gauges: Sequence[GaugeSample], origin: Origin) -> None:
        raise sqlite3.OperationalError("disk I/O error")


@pytest_twisted.ensureDeferred
async def test_stopWhileTheDatabaseIsAway(reactor: Any, tmp_path: Path) -> None:
    """
    Stopping while the database is away ends at once: what waited is
    counted as lost, and the drain does not hang on retries.
    """
    dropped: list[tuple[int, str]] = []
    writer = LedgerWriter(
        reactor,
        AlwaysAway(str(tmp_path / "l.sqlite3")),
        ORIGIN,
        RETENTION,
        onDropped=lambda n, why: dropped.append((n, why)),
        wallClock=clock,
        retryBase=60.0,
    )
    writer.open()
    for i in range(3):
        writer.add(record(i))
    writer.start()
    # Its first try has failed by now, and it waits a minute for the next.
    await deferLater(reactor, 0.5, lambda: None)
    assert writer.queued == 3
    started = time.monotonic()
    await writer.stop()
    assert time.monotonic() - started < 2.0
    assert sum(n for n, why in dropped if why == "write_error") == 3
    assert writerThreads() == []
