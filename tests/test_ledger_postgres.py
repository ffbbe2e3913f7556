"""
The ledger on a real PostgreSQL (started by the C{postgresServer}
fixture): the same schema files and the same answers as on SQLite, and two
proxies sharing one database each showing the sum of both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
import treq
from support.clients import ANTHROPIC, sleep
from support.postgres import RunningPostgres
from support.stack import Stack
from twisted.web.http_headers import Headers

from zaiproxy.dialects import Dialect
from zaiproxy.dialects.usage import Usage
from zaiproxy.ledger import reports
from zaiproxy.ledger.migrations import LedgerError
from zaiproxy.ledger.postgres import PostgresStore
from zaiproxy.ledger.queries import RequestsQuery, UsageQuery
from zaiproxy.ledger.rows import GaugeSample, Origin
from zaiproxy.ledger.store import LedgerStore, Retention, SQLiteStore
from zaiproxy.ledger.writer import LedgerWriter
from zaiproxy.observe.record import Billed, Record

ORIGIN = Origin("production", "host-1")
T0 = 1_796_000_000.0


def records() -> list[Record]:
    made = []
    for i in range(40):
        status = (200, 200, 429, 500, 499)[i % 5]
        usage = Usage(100 + i, 10 + i, i % 3, 0)
        billed = Billed(usage, "reported", "glm-4.7", None, "peak", {"input": 1e-4 * i, "output": 2e-4})
        records_ = Record(
            method="POST",
            route=("/v1/messages", "/v1/chat/completions")[i % 2],
            status=status,
            startedAt=T0 - 4 * 86400 + i * 9000.0,
            duration=0.05 * i,
            ttfb=0.01,
            dialect=Dialect.anthropic,
            model=("glm-4.7", "glm-4.6")[i % 2],
            keyName=("alice", "bob", None)[i % 3],
            requestId=f"req-{i:03d}",
            retries=("429",) * (i % 2),
            billed=billed if status == 200 else None,
        )
        made.append(records_)
    return made


GAUGES = [
    GaugeSample(int(T0 // 60) * 60 - 60 * k, k, 10, 5.0, 9.0, 1, 0, '{"gate_open": true}') for k in range(3)
]

QUESTIONS: list[Any] = [
    UsageQuery(T0 - 3600 * 5, T0),
    UsageQuery(T0 - 86400 * 2, T0, ("client", "status")),
    UsageQuery(T0 - 86400 * 5, T0, ("model", "day")),
    UsageQuery(T0 - 86400 * 5, T0, ("client", "route", "hour"), client="alice"),
    UsageQuery(T0 - 86400 * 5, T0, ("minute",), variant="canary"),
]


@pytest.mark.parametrize("question", range(len(QUESTIONS)))
def test_sameAnswersAsSQLite(postgresURL: str, tmp_path: Path, question: int) -> None:
    """
    The same batches written to both databases give the same answers to
    every kind of question.
    """
    stores: list[LedgerStore] = [SQLiteStore(str(tmp_path / "l.sqlite3")), PostgresStore(postgresURL)]
    answers = []
    for store in stores:
        assert store.open() == 1
        store.write(records()[:25], GAUGES, ORIGIN)
        store.write(records()[25:], [], ORIGIN)
        reading = store.reader()
        try:
            answers.append(
                (
                    reports.usage(reading, QUESTIONS[question]),
                    reports.requests(reading, RequestsQuery(T0 - 86400 * 5, T0, status="2xx", limit=7)),
                    reports.series(reading, T0 - 86400 * 5, T0, 3600, None),
                )
            )
        finally:
            reading.close()
            store.close()
    assert answers[0] == answers[1]
    usage, page, _ = answers[1]
    assert page["next"] is not None and len(page["rows"]) == 7
    assert json.loads(json.dumps(usage)) == usage


def test_migrationsAndPruning(postgresURL: str) -> None:
    """
    Opening twice applies the schema once; pruning deletes by retention; a
    newer schema is refused with a clear message.
    """
    store = PostgresStore(postgresURL)
    assert store.open() == 1
    store.write(records(), GAUGES, ORIGIN)
    store.close()
    assert store.open() == 1
    deleted = store.prune(T0, Retention(requests=86400, minutes=86400, hours=10 * 86400))
    with psycopg.connect(postgresURL) as connection:
        left = connection.execute("SELECT COUNT(*) FROM requests").fetchone()
        connection.execute("INSERT INTO schema_version (version) VALUES (99)")
    # Rows start 9,000 s apart from four days back: 29 are past a day.
    assert left is not None and left[0] == 11 and deleted >= 29
    store.close()
    with pytest.raises(LedgerError, match="schema is version 99, newer than this zaiproxy knows"):
        PostgresStore(postgresURL).open()


def test_passwordNeverShown() -> None:
    """
    An unreachable database is one clear error, without the password.
    """
    store = PostgresStore("postgresql://ledger:s3cret-pass@127.0.0.1:9/zaiproxy")
    assert store.path == "postgresql://ledger:***@127.0.0.1:9/zaiproxy"
    with pytest.raises(LedgerError) as raised:
        store.open()
    assert "cannot reach the ledger postgresql://ledger:***@127.0.0.1:9/zaiproxy" in str(raised.value)
    assert "s3cret" not in str(raised.value)


async def message(stack: Stack) -> None:
    response = await treq.post(
        stack.url("/v1/messages"),
        b'{"model":"glm-4.7","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}',
        headers=Headers({k: [v] for k, v in ANTHROPIC}),
        persistent=False,
    )
    await response.content()
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_twoProxiesOneLedger(reactor: Any, makeStack: Any, postgresURL: str) -> None:
    """
    Two proxies writing to one PostgreSQL ledger: each one's /api/usage
    shows both one's and the other's requests, by instance.
    """
    env = {"LEDGER_ENABLED": "true", "LEDGER_URL": postgresURL}
    first = await makeStack("events=1", INSTANCE_NAME="vm-a", **env)
    second = await makeStack("events=1", INSTANCE_NAME="vm-b", DEPLOYMENT_VARIANT="canary", **env)
    for stack, count in ((first, 2), (second, 3)):
        for _ in range(count):
            await message(stack)
    for _ in range(50):
        response = await treq.get(second.url("/api/requests?limit=100"), persistent=False)
        rows = json.loads(await response.content())["rows"]
        if len(rows) == 5:
            break
        await sleep(reactor, 0.1)
    assert sorted((row["instance"], row["variant"]) for row in rows) == [
        ("vm-a", "production"),
        ("vm-a", "production"),
        ("vm-b", "canary"),
        ("vm-b", "canary"),
        ("vm-b", "canary"),
    ]
    for stack in (first, second):
        response = await treq.get(stack.url("/api/usage?group_by=model"), persistent=False)
        usage = json.loads(await response.content())
        assert usage["totals"]["requests"] == 5
        response = await treq.get(stack.url("/api/usage?variant=canary"), persistent=False)
        assert json.loads(await response.content())["totals"]["requests"] == 3
        response = await treq.get(stack.url("/api/config"), persistent=False)
        assert json.loads(await response.content())["variants"] == ["canary", "production"]


@pytest_twisted.ensureDeferred
async def test_databaseAwayAndBack(reactor: Any, postgresServer: RunningPostgres) -> None:
    """
    The server stops mid-run: rows wait in the queue and are retried; once
    it is back every row is written and none was dropped.
    """
    url = postgresServer.newDatabase()
    dropped: list[tuple[int, str]] = []
    written: list[int] = []
    writer = LedgerWriter(
        reactor,
        PostgresStore(url),
        ORIGIN,
        Retention(10 * 86400, 10 * 86400, 10 * 86400),
        onDropped=lambda n, why: dropped.append((n, why)),
        onWritten=written.append,
        wallClock=lambda: T0,
        retryBase=0.1,
    )
    writer.open()
    writer.start()
    try:
        everything = records()
        for record in everything[:10]:
            writer.add(record)
        while sum(written) < 10:
            await sleep(reactor, 0.05)
        postgresServer.halt()
        for record in everything[10:]:
            writer.add(record)
        await sleep(reactor, 1.0)
        assert sum(written) == 10 and writer.queued == 30
        postgresServer.resume()
        for _ in range(100):
            if sum(written) == 40:
                break
            await sleep(reactor, 0.1)
    finally:
        await writer.stop()
    assert (sum(written), dropped) == (40, [])
    with psycopg.connect(url) as connection:
        counted = connection.execute(
            "SELECT COUNT(*), (SELECT SUM(requests) FROM usage_minute) FROM requests"
        )
        assert counted.fetchone() == (40, 40)


@pytest_twisted.ensureDeferred
async def test_awayAtStart(reactor: Any, postgresServer: RunningPostgres) -> None:
    """
    A database that cannot be reached at start does not stop the proxy:
    rows wait, and are written once it answers.
    """
    url = postgresServer.newDatabase()
    postgresServer.halt()
    written: list[int] = []
    try:
        writer = LedgerWriter(
            reactor,
            PostgresStore(url),
            ORIGIN,
            Retention(10 * 86400, 10 * 86400, 10 * 86400),
            onWritten=written.append,
            wallClock=lambda: T0,
            retryBase=0.1,
        )
        assert writer.open() == 0
        assert writer.away is not None and "cannot reach the ledger" in writer.away
        writer.start()
        for record in records()[:5]:
            writer.add(record)
        await sleep(reactor, 0.5)
        assert written == []
    finally:
        postgresServer.resume()
    try:
        for _ in range(100):
            if sum(written) == 5:
                break
            await sleep(reactor, 0.1)
    finally:
        await writer.stop()
    assert (sum(written), writer.schema) == (5, 1)
    assert not writer.away
