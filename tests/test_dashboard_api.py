"""
The dashboard's API over real sockets: every parameter, bad input, both
formats, the gate, and C{/api/usage/me} seeing only its own client.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from support.clients import ANTHROPIC, sleep
from support.stack import Stack
from twisted.web.http_headers import Headers

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
TOKEN = "admin-token-0123456789"


def ledgerEnv(tmp_path: Path, **more: str) -> dict[str, str]:
    return {
        "LEDGER_ENABLED": "true",
        "LEDGER_URL": f"sqlite:///{tmp_path}/ledger.sqlite3",
        "DASHBOARD_INTERVAL": "0.2",
        **more,
    }


async def get(stack: Stack, path: str, **headers: str) -> tuple[int, bytes, Any]:
    response = await treq.get(
        stack.url(path),
        headers=Headers({k.replace("_", "-"): [v] for k, v in headers.items()}),
        persistent=False,
    )
    return response.code, await response.content(), response.headers


async def getJSON(stack: Stack, path: str, **headers: str) -> Any:
    code, body, _ = await get(stack, path, **headers)
    assert code == 200, body
    return json.loads(body)


async def message(stack: Stack, key: str | None = None, body: bytes | None = None) -> None:
    headers = dict(ANTHROPIC)
    if key is not None:
        headers[b"x-api-key"] = key.encode()
    response = await treq.post(
        stack.url("/v1/messages"),
        body or b'{"model":"glm-4.7","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}',
        headers=Headers({k: [v] for k, v in headers.items()}),
        persistent=False,
    )
    await response.content()
    assert response.code == 200


async def written(reactor: Any, stack: Stack, count: int, **headers: str) -> list[dict[str, Any]]:
    for _ in range(50):
        rows: list[dict[str, Any]] = (await getJSON(stack, "/api/requests?limit=1000", **headers))["rows"]
        if len(rows) >= count:
            return rows
        await sleep(reactor, 0.1)
    raise AssertionError("rows were not written")


def bad(message: str) -> tuple[int, str]:
    return 400, message


@pytest_twisted.ensureDeferred
async def test_usageParameters(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    group_by, from/to as ISO or Unix seconds, variant, and CSV with the
    same columns as JSON.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path))
    for _ in range(3):
        await message(stack)
    rows = await written(reactor, stack, 3)
    output = sum(row["output_tokens"] for row in rows)
    everything = await getJSON(stack, "/api/usage?group_by=model,route,status,client")
    assert everything["group_by"] == ["model", "route", "status", "client"]
    [row] = everything["rows"]
    assert (row["model"], row["route"], row["status"], row["client"]) == (
        "glm-4.7",
        "/v1/messages",
        "2xx",
        "-",
    )
    assert (row["requests"], row["output_tokens"]) == (3, output)
    assert everything["totals"]["output_tokens"] == output
    now = reactor.seconds()
    byNumbers = await getJSON(stack, f"/api/usage?from={now - 60:.0f}&to={now + 60:.0f}")
    assert byNumbers["resolution"] == "request"
    assert byNumbers["totals"]["requests"] == 3
    earlier = await getJSON(stack, "/api/usage?from=2020-01-01T00:00:00Z&to=2020-01-02")
    assert (earlier["rows"], earlier["totals"]["requests"]) == ([], 0)
    assert (await getJSON(stack, "/api/usage?variant=canary"))["totals"]["requests"] == 0
    assert (await getJSON(stack, "/api/usage?variant=production"))["totals"]["requests"] == 3
    daily = await getJSON(stack, "/api/usage?group_by=day,hour,minute")
    assert len(daily["rows"]) in (1, 2)  # the three requests may straddle a minute
    code, body, headers = await get(stack, "/api/usage?group_by=client&format=csv")
    assert code == 200 and headers.getRawHeaders(b"content-type") == [b"text/csv; charset=utf-8"]
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0] == ["client", *list(row)[4:]]
    assert table[1][:2] == ["-", "3"] and int(table[1][4]) == output


@pytest.mark.parametrize(
    "query, expected",
    [
        ("group_by=user", "group_by='user' is not one of client, model, route, status, day, hour, minute"),
        ("from=yesterday", "from='yesterday' is not a time"),
        ("from=10&to=5", "from must be before to"),
        ("format=xml", "format='xml' is not json or csv"),
        ("from=1&from=2", "from is given 2 times; give it once"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_badUsageParameters(makeStack: Any, tmp_path: Path, query: str, expected: str) -> None:
    """
    A malformed parameter is a 400 whose message names it.
    """
    stack = await makeStack(**ledgerEnv(tmp_path))
    code, body, _ = await get(stack, "/api/usage?" + query)
    assert code == 400
    assert json.loads(body)["error"]["message"].startswith(expected)


@pytest_twisted.ensureDeferred
async def test_requestsPages(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    Newest first, a page at a time with a cursor, filtered by status,
    client and model, or looked up by id.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path, PROXY_API_KEYS=f"alice:{ALICE},bob:{BOB}"))
    for key in (ALICE, BOB, ALICE):
        await message(stack, key)
    rows = await written(reactor, stack, 3)
    assert [row["client"] for row in rows] == ["alice", "bob", "alice"]
    first = await getJSON(stack, "/api/requests?limit=2")
    assert [r["request_id"] for r in first["rows"]] == [r["request_id"] for r in rows[:2]]
    second = await getJSON(stack, f"/api/requests?limit=2&cursor={first['next']}")
    assert [r["request_id"] for r in second["rows"]] == [rows[2]["request_id"]]
    assert second["next"] is None
    alice = await getJSON(stack, "/api/requests?client=alice")
    assert [r["request_id"] for r in alice["rows"]] == [rows[0]["request_id"], rows[2]["request_id"]]
    assert (await getJSON(stack, "/api/requests?status=5xx"))["rows"] == []
    assert len((await getJSON(stack, "/api/requests?status=200&model=glm-4.7"))["rows"]) == 3
    one = await getJSON(stack, f"/api/requests?request_id={rows[1]['request_id']}")
    assert one["rows"] == [rows[1]]
    for query, expected in [
        ("limit=0", "limit='0' is not a whole number from 1 to 1000"),
        ("status=teapot", "status='teapot' is not a status (429) or a class (5xx)"),
        ("cursor=%%%", "cursor is not one this API gave out"),
    ]:
        code, body, _ = await get(stack, "/api/requests?" + query)
        assert (code, json.loads(body)["error"]["message"]) == (400, expected)


@pytest_twisted.ensureDeferred
async def test_usageMeIsOnlyMine(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    /api/usage/me answers a client key, with that key's usage alone.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path, PROXY_API_KEYS=f"alice:{ALICE},bob:{BOB}"))
    await message(stack, ALICE)
    await message(stack, BOB)
    await message(stack, BOB)
    rows = await written(reactor, stack, 3)
    bobOutput = sum(r["output_tokens"] for r in rows if r["client"] == "bob")
    mine = await getJSON(stack, "/api/usage/me", authorization=f"Bearer {BOB}")
    assert [(r["client"], r["requests"], r["output_tokens"]) for r in mine["rows"]] == [("bob", 2, bobOutput)]
    viaHeader = await getJSON(stack, "/api/usage/me?group_by=model", x_api_key=ALICE)
    assert [(r["client"], r["model"], r["requests"]) for r in viaHeader["rows"]] == [("alice", "glm-4.7", 1)]
    code, body, headers = await get(stack, "/api/usage/me")
    assert code == 401 and headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="zaiproxy"']
    code, _, _ = await get(stack, "/api/usage/me", x_api_key="not-a-key-of-ours")
    assert code == 401
    code, body, _ = await get(stack, "/api/usage/me?from=never", x_api_key=ALICE)
    assert code == 400 and b"from='never' is not a time" in body


@pytest_twisted.ensureDeferred
async def test_usageMeWithoutClientKeys(makeStack: Any, tmp_path: Path) -> None:
    """
    With client keys off there is no 'me': 404, saying why.
    """
    stack = await makeStack(**ledgerEnv(tmp_path))
    code, body, _ = await get(stack, "/api/usage/me")
    assert code == 404 and b"client keys are off" in body


@pytest_twisted.ensureDeferred
async def test_adminTokenGate(makeStack: Any, tmp_path: Path) -> None:
    """
    With ADMIN_TOKEN set, every API endpoint but /api/usage/me needs it.
    """
    stack = await makeStack(**ledgerEnv(tmp_path, ADMIN_TOKEN=TOKEN))
    for path in ("/api/usage", "/api/requests", "/api/metrics", "/api/status", "/api/config"):
        code, _, _ = await get(stack, path)
        assert code == 401, path
        code, _, _ = await get(stack, path, authorization="Bearer wrong")
        assert code == 401, path
        code, body, _ = await get(stack, path, authorization=f"Bearer {TOKEN}")
        assert code == 200, (path, body)


@pytest_twisted.ensureDeferred
async def test_liveAndLongRangeMetrics(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    /api/metrics: short ranges from the live points, long ones from the
    ledger's rollups, with the Go dashboard's field names; /api/status and
    /api/config as the Go dashboard had them.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path))
    await message(stack)
    await message(stack)
    await written(reactor, stack, 2)
    await sleep(reactor, 0.5)
    live = await getJSON(stack, "/api/metrics?range=5m")
    assert sum(point["requests_2xx"] for point in live) == 2
    assert {point["interval_seconds"] for point in live} == {0.2}
    assert live[-1]["max_workers"] == 200
    long = await getJSON(stack, "/api/metrics?range=24h&variant=production")
    assert sum(point["requests_2xx"] for point in long) == 2
    assert {point["interval_seconds"] for point in long} == {60}
    assert (await getJSON(stack, "/api/metrics?range=7d&variant=canary")) == []
    code, body, _ = await get(stack, "/api/metrics?range=2y")
    assert code == 400 and b"range='2y' is not one of 5m, 15m, 1h, 6h, 24h, 7d, 30d" in body
    status = await getJSON(stack, "/api/status")
    assert status["production"]["healthy"] is True
    assert status["production"]["concurrent"] == 0
    assert await getJSON(stack, "/api/status?variant=canary") == {}
    config = await getJSON(stack, "/api/config")
    assert (config["scrape_interval"], config["variants"], config["ledger"]) == (0.2, ["production"], True)
    assert (config["login"], config["client_keys"], config["instance"]) == (
        False,
        False,
        stack.proxy.instance,
    )


@pytest_twisted.ensureDeferred
async def test_ledgerOff(makeStack: Any) -> None:
    """
    With the ledger off the ledger's endpoints say so; the live ones work.
    """
    stack = await makeStack()
    code, body, _ = await get(stack, "/api/usage")
    assert code == 503 and b"LEDGER_ENABLED=false" in body
    assert (await getJSON(stack, "/api/config"))["ledger"] is False
    assert isinstance(await getJSON(stack, "/api/metrics?range=30d"), list)


@pytest_twisted.ensureDeferred
async def test_methodAndUnknownPaths(makeStack: Any, tmp_path: Path) -> None:
    """
    The API answers GET; Z.AI's own paths under /api/ are still forwarded.
    """
    stack = await makeStack(**ledgerEnv(tmp_path))
    response = await treq.post(stack.url("/api/usage"), b"", persistent=False)
    assert response.code == 405 and response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    await response.content()
    code, _, _ = await get(stack, "/api/usage/other")
    assert code == 404
    await message(stack)
    assert stack.fake.received[-1].uri == b"/api/anthropic/v1/messages"


@pytest_twisted.ensureDeferred
async def test_eventsStream(reactor: Any, makeStack: Any, tmp_path: Path) -> None:
    """
    /api/events: the connected event, then a metrics event per interval
    carrying the requests that finished in it.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path))
    response = await treq.get(stack.url("/api/events"), persistent=False, unbuffered=True)
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    received = bytearray()
    done = treq.collect(response, received.extend)
    await message(stack)
    for _ in range(50):
        if b'"requests_2xx":1' in received:
            break
        await sleep(reactor, 0.05)
    frames = [
        json.loads(f[len(b"data: ") :]) for f in bytes(received).split(b"\n\n") if f.startswith(b"data:")
    ]
    assert frames[0] == {"type": "connected", "scrape_interval": 0.2, "variants": ["production"]}
    assert {frame["type"] for frame in frames[1:]} == {"metrics"}
    assert sum(frame["data"]["requests_2xx"] for frame in frames[1:]) == 1
    assert len(stack.proxy.usageViews.events) == 1
    await stack.proxy.stopService()
    await done
    assert len(stack.proxy.usageViews.events) == 0


@pytest_twisted.ensureDeferred
async def test_withAnAdminPort(makeStack: Any, tmp_path: Path) -> None:
    """
    With --admin-listen, the dashboard and its API move there with /admin/*;
    /api/usage/me stays with the proxied routes' clients.
    """
    env = ledgerEnv(tmp_path, PROXY_API_KEYS=f"alice:{ALICE}")
    stack = await makeStack(adminListen=["tcp:0:interface=127.0.0.1"], **env)
    admin = stack.proxy.adminPorts[0].getHost().port
    for path in ("/api/usage", "/dashboard", "/api/events"):
        code, _, _ = await get(stack, path)
        assert code == 404, path
    response = await treq.get(f"http://127.0.0.1:{admin}/api/usage", persistent=False)
    assert response.code == 200 and json.loads(await response.content())["totals"]["requests"] == 0
    response = await treq.get(f"http://127.0.0.1:{admin}/dashboard", persistent=False)
    assert response.code == 200 and b"dashboard.js" in await response.content()
    mine = await getJSON(stack, "/api/usage/me", x_api_key=ALICE)
    assert mine["totals"]["requests"] == 0
