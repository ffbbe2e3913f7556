"""
Tests for L{zaiproxy.ledger.migrations}.
"""

from __future__ import annotations

import importlib.resources
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from zaiproxy.ledger import migrations as migrationsModule
from zaiproxy.ledger.migrations import LedgerError, migrate, migrations

TABLES = ["gauges_minute", "requests", "schema_version", "usage_hour", "usage_minute"]


@pytest.fixture
def connection(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """
    A new SQLite file, opened as the store opens it (autocommit).
    """
    opened = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    yield opened
    opened.close()


def tables(connection: sqlite3.Connection) -> list[str]:
    return [
        row[0]
        for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    ]


def versions(connection: sqlite3.Connection) -> list[int]:
    return [row[0] for row in connection.execute("SELECT version FROM schema_version ORDER BY version")]


def test_migrationsAreNumbered() -> None:
    """
    The packaged schema files are version 1 alone, for now, and it
    creates the requests table.
    """
    found = migrations()
    assert [version for version, _ in found] == [1]
    assert "CREATE TABLE requests (" in found[0][1]


def test_freshFile(connection: sqlite3.Connection) -> None:
    """
    A new file is brought to version 1: its tables and indexes exist, and
    the version is recorded once.
    """
    assert migrate(connection) == 1
    assert tables(connection) == TABLES
    assert versions(connection) == [1]
    indexes = connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    assert indexes == [("requests_by_id",), ("requests_by_start",)]
    assert not connection.in_transaction


def test_migrateAgainIsANoOp(connection: sqlite3.Connection) -> None:
    """
    Migrating a file already at the newest version changes nothing and
    keeps its rows.
    """
    migrate(connection)
    connection.execute("INSERT INTO gauges_minute VALUES (60, 'v', 'i', 1, 2, 3.0, 4.0, 5, 6, NULL)")
    assert migrate(connection) == 1
    assert versions(connection) == [1]
    assert connection.execute("SELECT COUNT(*) FROM gauges_minute").fetchone() == (1,)


def test_newerSchemaRefused(connection: sqlite3.Connection) -> None:
    """
    A file written by a newer zaiproxy (a version past the known ones)
    is refused with a message that says what to do, and left unchanged.
    """
    migrate(connection)
    connection.execute("INSERT INTO schema_version (version) VALUES (2)")
    with pytest.raises(LedgerError) as raised:
        migrate(connection)
    assert str(raised.value) == (
        "the ledger's schema is version 2, newer than this zaiproxy knows (1): "
        "upgrade zaiproxy, or point LEDGER_URL at another file"
    )
    assert versions(connection) == [1, 2]


def test_failedMigrationRollsBack(connection: sqlite3.Connection) -> None:
    """
    A migration that fails (here: a table of its name already exists) is
    a L{LedgerError} naming it, and none of it is kept: no version is
    recorded and none of its tables is created.
    """
    connection.execute("CREATE TABLE usage_hour (x INTEGER)")
    with pytest.raises(
        LedgerError, match=r"\Aschema migration 001 failed: table usage_hour already exists\Z"
    ):
        migrate(connection)
    assert versions(connection) == []
    assert tables(connection) == ["schema_version", "usage_hour"]
    assert not connection.in_transaction


def test_laterMigrationsApplyInOrder(connection: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A file at version 1 gets only the migrations after it, each recorded.
    """
    migrate(connection)
    known = migrations()
    monkeypatch.setattr(
        migrationsModule,
        "migrations",
        lambda: [*known, (2, "CREATE TABLE two (x INTEGER);"), (3, "ALTER TABLE two ADD COLUMN y TEXT;")],
    )
    assert migrate(connection) == 3
    assert versions(connection) == [1, 2, 3]
    assert [row[1] for row in connection.execute("PRAGMA table_info(two)")] == ["x", "y"]


def test_gapInSchemaFilesRefused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """
    Schema files must be numbered 1..N with no gap.
    """
    schema = tmp_path / "schema"
    schema.mkdir()
    (schema / "001_a.sql").write_text("SELECT 1;")
    (schema / "003_c.sql").write_text("SELECT 1;")
    (schema / "README").write_text("not a migration")

    class Files:
        def joinpath(self, name: str) -> Path:
            assert name == "schema"
            return schema

    monkeypatch.setattr(importlib.resources, "files", lambda package: Files())
    with pytest.raises(LedgerError, match=r"\Aschema files are not numbered 1\.\.N: \[1, 3\]\Z"):
        migrations()
