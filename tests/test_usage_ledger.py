"""
The usage ledger end to end: the official SDKs call the proxy, the fake
Z.AI answers, and the rows the proxy keeps (read back through its own API)
say exactly what the upstream reported; the ledger outlives a restart and
a SIGKILL under load leaves an intact file missing at most one batch.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import openai
import pytest
import pytest_twisted
import treq
from support.clients import sleep
from support.processes import TWISTD, Collect, baseEnvironment, freePort, listening
from support.stack import UPSTREAM_KEY, Stack
from twisted.internet import defer, threads
from twisted.web.http_headers import Headers

from zaiproxy.fake import FakeZai, parseScenario
from zaiproxy.fake.testing import startFake
from zaiproxy.ledger.writer import BATCH_ROWS

T = TypeVar("T")

#: A client key file's line and the key itself.
ALICE_KEY = "alice-key-0123456789abcdef"


async def inThread(f: Callable[[], T]) -> T:
    return await threads.deferToThread(f)


def ledgerEnv(tmp_path: Path, keys: bool = False) -> dict[str, str]:
    env = {"LEDGER_ENABLED": "true", "LEDGER_URL": f"sqlite:///{tmp_path}/ledger.sqlite3"}
    if keys:
        env["PROXY_API_KEYS"] = f"alice:{ALICE_KEY}"
    return env


async def getJSON(stack: Stack, path: str) -> Any:
    response = await treq.get(stack.url(path), persistent=False)
    body = await response.content()
    assert response.code == 200, body
    return json.loads(body)


async def ledgerRows(reactor: Any, stack: Stack, count: int) -> list[dict[str, Any]]:
    """
    The newest rows once C{count} are written (the writer commits within
    a quarter second of a row's arrival).
    """
    for _ in range(50):
        found = await getJSON(stack, "/api/requests?limit=100")
        if len(found["rows"]) >= count:
            rows: list[dict[str, Any]] = found["rows"]
            return rows
        await sleep(reactor, 0.1)
    raise AssertionError(f"the ledger did not reach {count} rows")


def callAnthropic(stack: Stack, key: str, stream: bool) -> tuple[int, int, str]:
    """
    One Messages call; the usage the SDK read, and the proxy's request id.
    """
    with anthropic.Anthropic(base_url=stack.url(""), api_key=key, max_retries=0) as client:
        args: dict[str, Any] = {
            "model": "glm-4.7",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello there"}],
        }
        if stream:
            with client.messages.with_streaming_response.create(stream=True, **args) as raw:
                requestId = raw.headers["x-zaiproxy-request-id"]
                message = None
                for event in raw.parse():
                    if event.type == "message_delta":
                        message = event
                assert message is not None
                return message.usage.input_tokens or 0, message.usage.output_tokens, requestId
        response = client.messages.with_raw_response.create(**args)
        parsed = response.parse()
        return (
            parsed.usage.input_tokens,
            parsed.usage.output_tokens,
            response.headers["x-zaiproxy-request-id"],
        )


def callOpenAI(stack: Stack, key: str, stream: bool) -> tuple[int, int, str]:
    with openai.OpenAI(base_url=stack.url("/v1"), api_key=key, max_retries=0) as client:
        args: dict[str, Any] = {"model": "glm-4.7", "messages": [{"role": "user", "content": "hello there"}]}
        if stream:
            with client.chat.completions.with_streaming_response.create(
                stream=True, stream_options={"include_usage": True}, **args
            ) as raw:
                requestId = raw.headers["x-zaiproxy-request-id"]
                usage = [chunk.usage for chunk in raw.parse() if chunk.usage is not None]
                return usage[-1].prompt_tokens, usage[-1].completion_tokens, requestId
        response = client.chat.completions.with_raw_response.create(**args)
        parsed = response.parse()
        assert parsed.usage is not None
        return (
            parsed.usage.prompt_tokens,
            parsed.usage.completion_tokens,
            response.headers["x-zaiproxy-request-id"],
        )


@pytest.mark.parametrize("keys", [False, True], ids=["keys-off", "keys-on"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
@pytest_twisted.ensureDeferred
async def test_rowIsWhatTheUpstreamReported(
    reactor: Any, makeStack: Any, tmp_path: Path, dialect: str, stream: bool, keys: bool
) -> None:
    """
    One call, one row: the tokens the SDK read from Z.AI's answer, the
    request id the client got, the client's key name (never the key), the
    model, route, dialect, stream flag, status and attempts.
    """
    stack = await makeStack("events=3", **ledgerEnv(tmp_path, keys))
    key = ALICE_KEY if keys else "proxy-handles-auth"
    call = callAnthropic if dialect == "anthropic" else callOpenAI
    inputTokens, outputTokens, requestId = await inThread(lambda: call(stack, key, stream))
    [row] = await ledgerRows(reactor, stack, 1)
    assert row["request_id"] == requestId
    assert (row["input_tokens"], row["output_tokens"]) == (inputTokens, outputTokens)
    assert row["token_source"] == "reported"
    assert row["client"] == ("alice" if keys else "-")
    assert ALICE_KEY not in json.dumps(row) and UPSTREAM_KEY not in json.dumps(row)
    assert row["model"] == "glm-4.7"
    assert row["route"] == ("/v1/messages" if dialect == "anthropic" else "/v1/chat/completions")
    assert row["dialect"] == dialect
    assert row["stream"] is stream
    assert (row["status"], row["attempts"], row["zai_error"]) == (200, 1, None)
    assert row["zai_request_id"]
    assert row["bytes_in"] == len(stack.fake.received[0].body)
    assert row["bytes_out"] > 0 and row["ttfb_ms"] is not None
    assert (row["variant"], row["instance"]) == ("production", stack.proxy.instance)
    # Prometheus knows who too: the token counters carry the key's name.
    counted = sum(
        stack.sample(
            "zai_proxy_tokens_total",
            direction="output",
            model="glm-4.7",
            variant="production",
            pricing_tier=tier,
            client=row["client"],
        )
        or 0
        for tier in ("peak", "off_peak")
    )
    assert counted == outputTokens
    usage = await getJSON(stack, "/api/usage?group_by=client")
    assert usage["rows"] == [
        {
            "client": row["client"],
            "requests": 1,
            "errors": 0,
            "input_tokens": inputTokens,
            "output_tokens": outputTokens,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
            "cost_usd": row["cost_usd"],
        }
    ]


@pytest_twisted.ensureDeferred
async def test_errorsAreRowsToo(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    A Z.AI quota error is a row with its status and Z.AI's code, no tokens,
    and counts as an error in the sums.
    """
    stack = await makeStack("mode=error code=1310", **ledgerEnv(tmp_path))
    with pytest.raises(anthropic.RateLimitError) as raised:
        await inThread(lambda: callAnthropic(stack, "k", False))
    body = raised.value.body
    assert isinstance(body, dict)
    [row] = await ledgerRows(reactor, stack, 1)
    assert (row["status"], row["zai_error"], row["input_tokens"], row["token_source"]) == (
        429,
        "1310",
        0,
        None,
    )
    usage = await getJSON(stack, "/api/usage?group_by=status")
    assert [(r["status"], r["requests"], r["errors"]) for r in usage["rows"]] == [("4xx", 1, 1)]


@pytest_twisted.ensureDeferred
async def test_ledgerOutlivesARestart(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    Rows written before a stop are there after the next start, and the
    sums go on from them.
    """
    first = await makeStack("events=2", **ledgerEnv(tmp_path))
    before = await inThread(lambda: callOpenAI(first, "k", False))
    await ledgerRows(reactor, first, 1)
    await first.proxy.stopService()
    second = await makeStack("events=2", **ledgerEnv(tmp_path))
    after = await inThread(lambda: callOpenAI(second, "k", False))
    rows = await ledgerRows(reactor, second, 2)
    assert [row["request_id"] for row in rows] == [after[2], before[2]]
    totals = (await getJSON(second, "/api/usage"))["totals"]
    assert (totals["requests"], totals["output_tokens"]) == (2, before[1] + after[1])


@pytest_twisted.ensureDeferred
async def test_drainFlushesTheQueue(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    Stopping writes every queued row before the process may exit.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path))
    ids = [await inThread(lambda: callAnthropic(stack, "k", True)) for _ in range(3)]
    await stack.proxy.stopService()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        found = {row[0] for row in db.execute("SELECT request_id FROM requests")}
    assert found == {i[2] for i in ids}


async def _load(reactor: Any, port: int, done: list[int], stop: list[bool]) -> None:
    """
    One client sending requests back to back until told to stop; each
    answer read whole counts as done.
    """
    body = b'{"model":"glm-4.7","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
    while not stop:
        try:
            response = await treq.post(
                f"http://127.0.0.1:{port}/v1/messages",
                body,
                headers=Headers({b"content-type": [b"application/json"]}),
                persistent=False,
            )
            await response.content()
        except Exception:
            return
        if response.code == 200 and not stop:
            done.append(1)


@pytest_twisted.ensureDeferred
async def test_sigkillUnderLoadLeavesAnIntactLedger(reactor: Any, tmp_path: Path) -> None:
    """
    The real daemon, killed with SIGKILL while requests stream through:
    the file passes PRAGMA integrity_check and holds every request answered
    before the kill but at most one batch.
    """
    fake = FakeZai(reactor, apiKey=UPSTREAM_KEY, defaults=parseScenario("events=1"))
    upstream = await startFake(reactor, fake)
    port = freePort()
    collect = Collect()
    env = {
        **baseEnvironment(),
        **ledgerEnv(tmp_path),
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAI_TARGET_URL": upstream.url("/api/anthropic"),
        "RATE_LIMIT_STATE_FILE": "off",
        "RATE_LIMIT_MAX": "1000",
        "RATE_LIMIT_INITIAL": "1000",
    }
    process = reactor.spawnProcess(
        collect,
        TWISTD,
        [TWISTD, "-n", "--pidfile=", "zaiproxy", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=env,
        path=str(tmp_path),
    )
    done: list[int] = []
    stop: list[bool] = []
    try:
        await listening(reactor, port)
        clients = [defer.ensureDeferred(_load(reactor, port, done, stop)) for _ in range(8)]
        while len(done) < 300:
            await sleep(reactor, 0.05)
        answered = len(done)
        os.kill(process.pid, signal.SIGKILL)
        stop.append(True)
        await defer.gatherResults(clients)
        await collect.ended
    finally:
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        await upstream.stop()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        summed = db.execute("SELECT SUM(requests) FROM usage_minute").fetchone()[0]
    assert answered - BATCH_ROWS <= rows <= answered + 8
    # The rollups were committed with their rows, in the same transactions.
    assert summed == rows
