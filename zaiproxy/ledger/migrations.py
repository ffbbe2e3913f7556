# -*- test-case-name: tests.test_ledger_migrations -*-
"""
The ledger's schema, versioned: numbered SQL files in C{schema/}
(C{001_ledger.sql}, C{002_...}), each applied once, in order, at start, in
one transaction with the new version number (as Synapse keeps its schema
deltas, rather than an ORM's migration tool).

The files are portable SQL, so the same ones will run on PostgreSQL.
"""

from __future__ import annotations

import re
import sqlite3
from importlib import resources

__all__ = ["LedgerAway", "LedgerError", "migrate", "migrations"]

_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql\Z")


class LedgerError(Exception):
    """
    The ledger cannot be used (its file, its schema); the message says why.
    """


class LedgerAway(LedgerError):
    """
    The ledger's database cannot be reached now (it may be later): the
    proxy starts anyway, and rows wait in the queue.
    """


def migrations() -> list[tuple[int, str]]:
    """
    Every schema file as (version, SQL), in order; versions run 1, 2, ...
    with no gap, so a missing file is caught here rather than in the field.
    """
    found = []
    for entry in resources.files("zaiproxy.ledger").joinpath("schema").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    if [version for version, _ in found] != list(range(1, len(found) + 1)):
        raise LedgerError(f"schema files are not numbered 1..N: {[v for v, _ in found]}")
    return found


def migrate(connection: sqlite3.Connection) -> int:
    """
    Bring a SQLite ledger to the newest schema; return its version.

    @raise LedgerError: the file was written by a newer zaiproxy (its
        schema is past what this one knows), or a migration failed.
    """
    connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    current = row[0] or 0
    known = migrations()
    if current > len(known):
        raise LedgerError(
            f"the ledger's schema is version {current}, newer than this zaiproxy knows ({len(known)}): "
            "upgrade zaiproxy, or point LEDGER_URL at another file"
        )
    for version, sql in known[current:]:
        try:
            connection.executescript(
                f"BEGIN;\n{sql}\nINSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;"
            )
        except sqlite3.Error as e:
            connection.rollback()
            raise LedgerError(f"schema migration {version:03d} failed: {e}") from None
        current = version
    return current
