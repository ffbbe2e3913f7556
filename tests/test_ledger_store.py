"""
Tests for L{zaiproxy.ledger.store}.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zaiproxy.dialects import Dialect
from zaiproxy.dialects.usage import Usage
from zaiproxy.ledger.migrations import LedgerError
from zaiproxy.ledger.rows import ROLLUP_KEYS, ROLLUP_SUMS, GaugeSample, Origin
from zaiproxy.ledger.store import Retention, SQLiteStore, sqlitePath
from zaiproxy.observe.record import Billed, Record

T0 = 1_796_000_000.0
ORIGIN = Origin("production", "host-1")


def record(
    i: int,
    status: int = 200,
    usage: Usage | None = None,
    costs: dict[str, float] | None = None,
    requestId: str | None = None,
    **fields: Any,
) -> Record:
    """
    A finished Messages request of alice's started at C{T0 + i}.
    """
    billed = None if usage is None else Billed(usage, "reported", "glm-4.7", None, "standard", costs or {})
    return Record(
        method="POST",
        route="/v1/messages",
        status=status,
        startedAt=T0 + i,
        duration=0.5,
        requestId=requestId or f"req-{i}",
        keyName="alice",
        dialect=Dialect.anthropic,
        model="glm-4.7",
        billed=billed,
        **fields,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """
    An open store in a new file.
    """
    opened = SQLiteStore(str(tmp_path / "ledger.sqlite3"))
    assert opened.open() == 1
    yield opened
    opened.close()


def query(store: SQLiteStore, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """
    Rows read through a connection of the test's own.
    """
    connection = sqlite3.connect(store.path)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def rollup(store: SQLiteStore, table: str) -> list[dict[str, Any]]:
    """
    Each row of a rollup table, keys and sums by name, in key order.
    """
    columns = (*ROLLUP_KEYS, *ROLLUP_SUMS)
    rows = query(store, f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(ROLLUP_KEYS)}")
    return [dict(zip(columns, row, strict=True)) for row in rows]


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/zaiproxy/ledger.sqlite3", "/var/lib/zaiproxy/ledger.sqlite3"),
        ("sqlite:////var/lib/ledger.sqlite3", "/var/lib/ledger.sqlite3"),
        ("sqlite:///ledger.sqlite3", "/ledger.sqlite3"),
    ],
)
def test_sqlitePath(url: str, path: str) -> None:
    """
    A C{sqlite:///} URL names an absolute file.
    """
    assert sqlitePath(url) == path


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgresql://db/ledger",
            r"expected sqlite:///path/to/ledger\.sqlite3, not 'postgresql://db/ledger'",
        ),
        ("sqlite:/var/ledger", r"expected sqlite:///path/to/ledger\.sqlite3, not 'sqlite:/var/ledger'"),
        (
            "/var/lib/ledger.sqlite3",
            r"expected sqlite:///path/to/ledger\.sqlite3, not '/var/lib/ledger\.sqlite3'",
        ),
        ("sqlite://relative/ledger", r"a sqlite URL needs a path after three slashes"),
        ("sqlite:///", r"a sqlite URL needs a path after three slashes"),
        ("sqlite:////", r"a sqlite URL needs a path after three slashes"),
    ],
)
def test_sqlitePathRefused(url: str, message: str) -> None:
    """
    Anything but C{sqlite:///} and a path is refused with what is expected.
    """
    with pytest.raises(ValueError, match=message):
        sqlitePath(url)


def test_openCreatesTheFolder(tmp_path: Path) -> None:
    """
    Opening creates the missing folders and the file, in WAL mode, at
    schema version 1.
    """
    path = tmp_path / "a" / "b" / "ledger.sqlite3"
    store = SQLiteStore(str(path))
    try:
        assert store.open() == 1
    finally:
        store.close()
    assert path.is_file()
    assert query(store, "PRAGMA journal_mode") == [("wal",)]
    assert query(store, "SELECT version FROM schema_version") == [(1,)]


def test_openUnusable(tmp_path: Path) -> None:
    """
    A path that cannot be a database (a folder) is a L{LedgerError} naming
    the path.
    """
    (tmp_path / "taken").mkdir()
    store = SQLiteStore(str(tmp_path / "taken"))
    with pytest.raises(LedgerError, match=rf"\Acannot open the ledger {tmp_path}/taken: "):
        store.open()


def test_openNewerSchema(tmp_path: Path) -> None:
    """
    A file of a newer schema is refused when opened.
    """
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteStore(str(path))
    store.open()
    store.close()
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("INSERT INTO schema_version VALUES (9)")
    connection.close()
    with pytest.raises(LedgerError, match=r"schema is version 9, newer than this zaiproxy knows \(1\)"):
        SQLiteStore(str(path)).open()


def test_notOpen(tmp_path: Path) -> None:
    """
    Writing or pruning a store that is not open is a L{LedgerError};
    closing it twice is harmless.
    """
    store = SQLiteStore(str(tmp_path / "ledger.sqlite3"))
    with pytest.raises(LedgerError, match="the ledger is not open"):
        store.write([record(0)], [], ORIGIN)
    with pytest.raises(LedgerError, match="the ledger is not open"):
        store.prune(T0, Retention(1, 1, 1))
    store.close()
    store.close()


def test_writeAndReadBack(store: SQLiteStore) -> None:
    """
    A batch's rows are in the file, exactly, after C{write}.
    """
    store.write(
        [
            record(
                0,
                usage=Usage(100, 10, 5, 1),
                costs={"input": 0.25, "output": 0.5},
                ttfb=0.125,
                client="10.0.0.1",
                requestBytes=300,
                responseBytes=400,
                attempts=1,
                zaiRequestId="zai-0",
                stream=True,
            ),
            record(61, status=429, errorType="queue_full"),
        ],
        [],
        ORIGIN,
    )
    assert query(store, "SELECT * FROM requests ORDER BY started_at") == [
        (
            "req-0",
            1_796_000_000.0,
            1_796_000_000.5,
            1_795_999_980,
            "alice",
            "10.0.0.1",
            "glm-4.7",
            "/v1/messages",
            "anthropic",
            1,
            200,
            None,
            None,
            100,
            10,
            5,
            1,
            "reported",
            0.75,
            500.0,
            125.0,
            0.0,
            1,
            300,
            400,
            "zai-0",
            "production",
            "host-1",
        ),
        (
            "req-61",
            1_796_000_061.0,
            1_796_000_061.5,
            1_796_000_040,
            "alice",
            "-",
            "glm-4.7",
            "/v1/messages",
            "anthropic",
            0,
            429,
            "queue_full",
            None,
            0,
            0,
            0,
            0,
            None,
            0.0,
            500.0,
            None,
            0.0,
            0,
            0,
            0,
            None,
            "production",
            "host-1",
        ),
    ]
    minutes = rollup(store, "usage_minute")
    assert [
        (m["bucket"], m["status_class"], m["requests"], m["errors"], m["rejections"]) for m in minutes
    ] == [
        (1_795_999_980, 2, 1, 0, 0),
        (1_796_000_040, 4, 1, 1, 1),
    ]
    hours = rollup(store, "usage_hour")
    assert [(h["bucket"], h["status_class"], h["requests"], h["input_tokens"]) for h in hours] == [
        (1_795_996_800, 2, 1, 100),
        (1_795_996_800, 4, 1, 0),
    ]


def test_duplicateRequestIdIgnored(store: SQLiteStore) -> None:
    """
    A row whose request id is already in the file is skipped, not an
    error; the first one stays.
    """
    store.write([record(0, status=200)], [], ORIGIN)
    store.write([record(5, status=500, requestId="req-0")], [], ORIGIN)
    assert query(store, "SELECT request_id, started_at, status FROM requests") == [
        ("req-0", 1_796_000_000.0, 200)
    ]
    # Counted once in the rollups too, so every span's sums agree.
    for table in ("usage_minute", "usage_hour"):
        assert query(store, f"SELECT SUM(requests), SUM(errors) FROM {table}") == [(1, 0)]


def test_duplicateRequestIdInOneBatch(store: SQLiteStore) -> None:
    """
    The same id twice in one batch: the first is kept, counted once.
    """
    store.write([record(0), record(1, requestId="req-0")], [], ORIGIN)
    assert query(store, "SELECT COUNT(*) FROM requests") == [(1,)]
    assert query(store, "SELECT SUM(requests) FROM usage_minute") == [(1,)]


def test_rollupsAddAcrossBatches(store: SQLiteStore) -> None:
    """
    Two batches of the same minute add into one row of each rollup.
    """
    store.write(
        [record(0, usage=Usage(100, 10, 1, 2), costs={"input": 0.25, "output": 0.5}, retries=("429",))],
        [],
        ORIGIN,
    )
    store.write(
        [record(30, usage=Usage(50, 5, 3, 4), costs={"input": 0.125, "cache_read": 0.0625})],
        [],
        ORIGIN,
    )
    expected = {
        "variant": "production",
        "instance": "host-1",
        "client": "alice",
        "model": "glm-4.7",
        "route": "/v1/messages",
        "status_class": 2,
        "requests": 2,
        "errors": 0,
        "input_tokens": 150,
        "output_tokens": 15,
        "cache_read_tokens": 4,
        "cache_write_tokens": 6,
        "cost_usd": 0.9375,
        "cost_input": 0.375,
        "cost_output": 0.5,
        "cost_cache_read": 0.0625,
        "cost_cache_write": 0.0,
        "duration_ms": 1000,
        "bytes_in": 0,
        "bytes_out": 0,
        "upstream_errors": 0,
        "retries": 1,
        "rejections": 0,
        **{f"lat_{i}": 2 if i == 2 else 0 for i in range(12)},
    }
    assert rollup(store, "usage_minute") == [{"bucket": 1_795_999_980, **expected}]
    assert rollup(store, "usage_hour") == [{"bucket": 1_795_996_800, **expected}]


def test_gaugesReplaced(store: SQLiteStore) -> None:
    """
    A second sample of the same minute replaces the first.
    """
    store.write([], [GaugeSample(1_795_999_980, 3, 10, 1.5, 4.0, 1, 0, None)], ORIGIN)
    store.write([], [GaugeSample(1_795_999_980, 7, 12, 2.5, 5.0, 0, 2, '{"used": 1}')], ORIGIN)
    store.write([], [GaugeSample(1_796_000_040, 1, 12, 2.5, 5.0, 0, 0, None)], ORIGIN)
    assert query(store, "SELECT * FROM gauges_minute ORDER BY bucket") == [
        (1_795_999_980, "production", "host-1", 7, 12, 2.5, 5.0, 0, 2, '{"used": 1}'),
        (1_796_000_040, "production", "host-1", 1, 12, 2.5, 5.0, 0, 0, None),
    ]


def test_failedBatchWritesNothing(store: SQLiteStore) -> None:
    """
    A batch that fails part way (a row breaks a constraint) is rolled back
    whole: neither its good rows nor its rollups are kept, and the store
    takes the next batch.
    """
    broken = Record(method="POST", route=None, status=200, startedAt=T0 + 1, duration=0.5, requestId="bad")  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store.write([record(0), broken], [], ORIGIN)
    assert query(store, "SELECT COUNT(*) FROM requests") == [(0,)]
    assert query(store, "SELECT COUNT(*) FROM usage_minute") == [(0,)]
    store.write([record(2)], [], ORIGIN)
    assert query(store, "SELECT request_id FROM requests") == [("req-2",)]


def test_prune(store: SQLiteStore) -> None:
    """
    Each table loses the rows older than its own retention; the count of
    rows deleted is returned.
    """
    hour = 1_795_996_800
    store.write(
        [record(-3600 * 3), record(-120), record(0)],
        [
            GaugeSample(hour - 3 * 3600, 1, 1, 1.0, 1.0, 0, 0, None),
            GaugeSample(hour, 1, 1, 1.0, 1.0, 0, 0, None),
        ],
        ORIGIN,
    )
    # Rows: requests at T0-10800, T0-120, T0; minutes at 21:53, 00:51,
    # 00:53; hours at 21:00 and 00:00; gauges at 21:00 and 00:00.
    now = T0 + 60
    deleted = store.prune(now, Retention(requests=100, minutes=3600, hours=4 * 3600))
    # requests: before T0-40 (two); minutes: before 23:54:20 (one);
    # hours and gauges: before 20:54:20 (none).
    assert deleted == 3
    assert query(store, "SELECT request_id FROM requests") == [("req-0",)]
    assert query(store, "SELECT bucket FROM usage_minute ORDER BY bucket") == [
        (1_795_999_860,),
        (1_795_999_980,),
    ]
    assert query(store, "SELECT bucket FROM gauges_minute ORDER BY bucket") == [(hour - 3 * 3600,), (hour,)]
    assert query(store, "SELECT bucket FROM usage_hour ORDER BY bucket") == [(hour - 3 * 3600,), (hour,)]
    assert store.prune(now, Retention(requests=100, minutes=3600, hours=4 * 3600)) == 0


def test_readerIsReadOnly(store: SQLiteStore) -> None:
    """
    A reader connection sees what was written but cannot write.
    """
    store.write([record(0)], [], ORIGIN)
    reader = store.reader()
    try:
        assert reader.execute("SELECT request_id FROM requests").fetchall() == [("req-0",)]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("INSERT INTO schema_version (version) VALUES (5)")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("DELETE FROM requests")
    finally:
        reader.close()
    assert query(store, "SELECT COUNT(*) FROM requests") == [(1,)]


def test_readerOfAPathToQuote(tmp_path: Path) -> None:
    """
    A reader opens a file whose path holds characters a URI must escape.
    """
    store = SQLiteStore(str(tmp_path / "odd ?#% name.sqlite3"))
    store.open()
    try:
        store.write([record(0)], [], ORIGIN)
        reader = store.reader()
        try:
            assert reader.execute("SELECT COUNT(*) FROM requests").fetchone() == (1,)
        finally:
            reader.close()
    finally:
        store.close()
