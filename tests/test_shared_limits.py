"""
Tests for L{zaiproxy.limits.shared}: proxies that share one Z.AI key's
limits through a real Redis (started by the C{redisServer} fixture), in
front of the shipped fake Z.AI, over real sockets; some proxies are real
twistd processes, so one can be killed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.clients import LOAD_BODY, SocketLoad, messagesBody, sleep
from support.processes import TWISTD, Collect, baseEnvironment, freePort, listening
from support.redis import RunningRedis
from support.stack import UPSTREAM_KEY, Stack
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.web.http_headers import Headers

from zaiproxy.fake import FakeZai
from zaiproxy.fake.testing import RunningFake, startFake
from zaiproxy.limits.redislink import RedisAddress, RedisLink
from zaiproxy.limits.shared import ACQUIRE, RENEW, SEED, WINDOW, Mode, SharedKeys


def sharedEnv(redisURL: str, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redisURL, "RATE_LIMIT_WINDOW": "1", **extra}


async def post(http: HTTPClient, url: str, scenario: str = "", stream: bool = False) -> tuple[int, bytes]:
    headers: dict[str, list[str]] = {"content-type": ["application/json"]}
    if scenario:
        headers["x-fake-scenario"] = [scenario]
    response = await http.post(url, data=messagesBody(stream=stream), headers=Headers(headers))
    return response.code, await response.content()


async def until(reactor: Any, check: Any, what: str, seconds: float = 10.0) -> None:
    deadline = reactor.seconds() + seconds
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await sleep(reactor, 0.05)


def modes(*stacks: Stack) -> list[Mode]:
    return [s.proxy.sharedLimits.mode if s.proxy.sharedLimits else Mode.ALONE for s in stacks]


def leasesTaken(server: RunningRedis, redisURL: str) -> int:
    db = redisURL.rsplit("/", 1)[1]
    reply = server.command("SELECT", db, "ZCARD", SharedKeys.forKey(UPSTREAM_KEY).leases)
    return int(reply.strip().lstrip(b":"))


@pytest_twisted.ensureDeferred
async def test_quotaHeldByOneIsHeldByAll(
    reactor: Any, makeStack: Any, http: HTTPClient, redisURL: str
) -> None:
    """
    Z.AI tells proxy A the quota is gone (1308): the next request through
    proxy B is answered 429 by B itself, with Z.AI's code, and never
    reaches Z.AI; B's /health says it shares the limits.
    """
    a = await makeStack(**sharedEnv(redisURL, INSTANCE_NAME="a"))
    b = await makeStack(
        **sharedEnv(redisURL, INSTANCE_NAME="b", ZAI_TARGET_URL=a.upstream.url("/api/anthropic"))
    )
    await until(reactor, lambda: modes(a, b) == [Mode.SHARED] * 2, "both proxies share")
    code, _ = await post(http, a.url("/v1/messages"), "mode=error code=1308 resetIn=3600")
    assert code == 429
    calls = len(a.fake.received)
    code, body = await post(http, b.url("/v1/messages"))
    assert code == 429, body
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert b"1308" in body
    assert len(a.fake.received) == calls
    assert len(b.fake.received) == 0
    response = await http.get(b.url("/health"))
    section = json.loads(await response.content())["shared_limits"]
    assert section["mode"] == "shared" and section["instance"] == "b"
    assert section["redis"].startswith("redis://127.0.0.1:")
    # An operator resets the limits on A: B lifts its hold within a window.
    response = await http.post(a.url("/admin/reset-rate-limit"))
    assert response.code == 200
    await response.content()
    await until(reactor, lambda: b.proxy.limiter.quotaHeld() is None, "B lifts the hold", 5.0)
    code, _ = await post(http, b.url("/v1/messages"))
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_redisOutageFailsNoRequest(
    reactor: Any, makeStack: Any, http: HTTPClient, redisServer: RunningRedis, redisURL: str
) -> None:
    """
    Redis stops under load: no client request fails for it; both proxies
    go on alone (/health and the metric say so) at their share, and rejoin
    once Redis is back.
    """
    env = sharedEnv(redisURL, REDIS_TIMEOUT="200ms", RATE_LIMIT_MAX="200", RATE_LIMIT_INITIAL="100")
    a = await makeStack(**env, INSTANCE_NAME="a")
    b = await makeStack(**env, INSTANCE_NAME="b", ZAI_TARGET_URL=a.upstream.url("/api/anthropic"))
    await until(reactor, lambda: modes(a, b) == [Mode.SHARED] * 2, "both proxies share")
    # Both have reported a window, so each knows there are two.
    await until(
        reactor,
        lambda: all(s.proxy.sharedLimits and s.proxy.sharedLimits.alive == 2 for s in (a, b)),
        "2 seen",
    )
    loads = [SocketLoad(reactor, s.url("/v1/messages"), 20) for s in (a, b)]
    for load in loads:
        load.start()
    try:
        await sleep(reactor, 0.5)
        redisServer.halt()
        await until(reactor, lambda: modes(a, b) == [Mode.ALONE] * 2, "both proxies go alone")
        assert a.sample("zai_proxy_shared_limits_up", variant="production") == 0
        response = await http.get(a.url("/health"))
        section = json.loads(await response.content())["shared_limits"]
        assert section["degraded"] is True and section["share"] == 2
        # At its share of the shared rate (100 req/s between two).
        assert a.proxy.limiter.rate <= 50.0
        await sleep(reactor, 1.0)
        redisServer.resume()
        await until(reactor, lambda: modes(a, b) == [Mode.SHARED] * 2, "both proxies rejoin")
        await sleep(reactor, 0.5)
    finally:
        for load in loads:
            await load.stop()
    assert a.sample("zai_proxy_shared_limits_up", variant="production") == 1
    answers = [load.answers for load in loads]
    assert all(set(answer) == {200} for answer in answers), answers
    assert sum(sum(answer.values()) for answer in answers) >= 60


async def startProxy(reactor: Any, folder: Path, env: dict[str, str]) -> tuple[Any, Collect, int]:
    port = freePort()
    collect = Collect()
    process = reactor.spawnProcess(
        collect,
        TWISTD,
        [TWISTD, "-n", "--pidfile=", "zaiproxy", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env={**baseEnvironment(), "ZAI_API_KEY": UPSTREAM_KEY, "RATE_LIMIT_STATE_FILE": "off", **env},
        path=str(folder),
    )
    await listening(reactor, port)
    return process, collect, port


async def stopProxy(process: Any, collect: Collect) -> None:
    if not collect.ended.called:
        process.signalProcess("TERM")
    await collect.ended


@pytest_twisted.ensureDeferred
async def test_deadProxysSlotsComeBack(
    reactor: Any,
    makeStack: Any,
    http: HTTPClient,
    redisServer: RunningRedis,
    redisURL: str,
    tmp_path: Path,
) -> None:
    """
    A proxy process holding every concurrency slot (MAX_WORKERS=2, two
    long streams) is killed: the other proxy's request waits for the slots
    and is admitted once the dead proxy's leases expire (REDIS_LEASE=2s),
    not before and not much later.
    """
    env = sharedEnv(
        redisURL, MAX_WORKERS="2", REDIS_LEASE="2s", RATE_LIMIT_MAX="100", RATE_LIMIT_INITIAL="100"
    )
    b = await makeStack(**env, INSTANCE_NAME="b")
    upstream = b.upstream.url("/api/anthropic")
    process, collect, port = await startProxy(
        reactor, tmp_path, {**env, "INSTANCE_NAME": "a", "ZAI_TARGET_URL": upstream}
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/messages"
        streams = [
            defer.ensureDeferred(post(http, url, "events=400 interval=0.05", stream=True)) for _ in range(2)
        ]
        for stream in streams:
            stream.addErrback(lambda failure: None)
        await until(reactor, lambda: leasesTaken(redisServer, redisURL) == 2, "A holds both slots")
        os.kill(process.pid, signal.SIGKILL)
        await collect.ended
        killed = time.monotonic()
        code, _ = await post(http, b.url("/v1/messages"))
        waited = time.monotonic() - killed
    finally:
        await stopProxy(process, collect)
    assert code == 200
    # A renewed its leases every 2/3 s: at the kill they had 4/3 to 2 s left.
    assert 1.0 <= waited <= 3.0, waited
    # B gave its slot back once its call ended (batched: within 10 ms).
    await until(reactor, lambda: leasesTaken(redisServer, redisURL) == 0, "B's slot returned", 1.0)


async def healthOf(http: HTTPClient, port: int) -> Any:
    response = await http.get(f"http://127.0.0.1:{port}/health")
    return json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_sharedProxiesHoldTheCapacityUnsharedOvershoot(
    reactor: Any, http: HTTPClient, redisURL: str, tmp_path: Path
) -> None:
    """
    Two proxy processes in front of one fake Z.AI with a hidden capacity
    C, offered 3C between them, each told Z.AI's limit (RATE_LIMIT_MAX=C,
    as an operator who knows the plan would): sharing through Redis, from
    the tenth window on Z.AI accepts between 0.75C and C a second and
    refuses under 5% of the calls, and both proxies show the one learned
    state. Two proxies that do not share (the same run, their own fake)
    each offer the whole limit: Z.AI gets more than it takes and refuses
    more.
    """
    capacity = 10
    limits = {
        "RATE_LIMIT_WINDOW": "1",
        "RATE_LIMIT_MAX": str(capacity),
        "RATE_LIMIT_INITIAL": str(capacity),
        "MAX_RETRIES": "0",
        "MAX_QUEUE": "20",
        "QUEUE_TIMEOUT": "2",
    }
    runs: dict[str, tuple[FakeZai, RunningFake, list[tuple[Any, Collect, int]]]] = {}
    for name, extra in (("shared", {"REDIS_URL": redisURL}), ("alone", {})):
        fake = FakeZai(reactor, apiKey=UPSTREAM_KEY)
        fake.capacity = capacity
        upstream = await startFake(reactor, fake)
        env = {**limits, **extra, "ZAI_TARGET_URL": upstream.url("/api/anthropic")}
        folder = tmp_path / name
        folder.mkdir()
        proxies = [
            await startProxy(reactor, folder, {**env, "INSTANCE_NAME": f"{name}-{i}"}) for i in range(2)
        ]
        runs[name] = (fake, upstream, proxies)
    loads = [
        SocketLoad(reactor, f"http://127.0.0.1:{port}/v1/messages", 1.5 * capacity, LOAD_BODY)
        for _, _, proxies in runs.values()
        for _, _, port in proxies
    ]
    counts = lambda: {name: (len(fake.received), fake.refused) for name, (fake, _, _) in runs.items()}  # noqa: E731
    try:
        for load in loads:
            load.start()
        start = counts()
        await sleep(reactor, 10.0)
        tenth = counts()
        await sleep(reactor, 6.0)
        end = counts()
        sharedHealth = [await healthOf(http, port) for _, _, port in runs["shared"][2]]
    finally:
        for load in loads:
            await load.stop()
        for _, upstream, proxies in runs.values():
            for process, collect, _ in proxies:
                await stopProxy(process, collect)
            await upstream.stop()
    calls = end["shared"][0] - tenth["shared"][0]
    refused = end["shared"][1] - tenth["shared"][1]
    seen = {"start": start, "tenth": tenth, "end": end}
    assert 0.75 * capacity <= (calls - refused) / 6.0 <= capacity, seen
    assert refused / calls < 0.05, seen
    assert [h["shared_limits"]["mode"] for h in sharedHealth] == ["shared", "shared"]
    # One learned ceiling (a judgement may reach the other proxy a window later).
    ceilings = [h["rate_limit"]["ceiling"] for h in sharedHealth]
    assert ceilings[0] == pytest.approx(ceilings[1], rel=0.05), ceilings
    # Unshared, each offers Z.AI the whole limit: Z.AI refuses far more.
    assert end["alone"][1] - start["alone"][1] > 3 * (end["shared"][1] - start["shared"][1]) + 10, seen


# -- the scripts, on a real Redis ------------------------------------------------


def texts(reply: Any) -> Any:
    if isinstance(reply, list):
        return [texts(item) for item in reply]
    return reply.decode() if isinstance(reply, bytes) else reply


async def acquire(
    link: RedisLink,
    keys: SharedKeys,
    wanted: int,
    first: int = 0,
    lease: float = 10.0,
    returned: tuple[str, ...] = (),
) -> Any:
    reply = await link.run(
        ACQUIRE,
        [keys.state, keys.bucket, keys.leases, keys.quota],
        [wanted, "p:", first, lease, 1.0, 1, *returned],
    )
    return texts(reply)


@pytest_twisted.async_yield_fixture
async def link(reactor: Any, redisURL: str) -> AsyncIterator[RedisLink]:
    opened = RedisLink(reactor, RedisAddress.fromURL(redisURL), 2.0)
    opened.open()
    yield opened
    await opened.close()


@pytest_twisted.ensureDeferred
async def test_acquirePacesOnRedisClock(link: RedisLink) -> None:
    """
    At 4 calls a second the bucket lets a quarter second's calls go early
    (two of the five asked for), says when the next token is due, and
    gives nothing more until then; each call granted holds a lease.
    """
    keys = SharedKeys.forKey("k")
    await link.run(SEED, [keys.state], ["rate", "4", "limit", "10"])
    granted, wait, quota, taken, limit = await acquire(link, keys, 5)
    assert (granted, quota, taken, limit) == (2, None, 2, 10)
    assert float(wait) == pytest.approx(0.25, abs=0.01)
    granted, wait, _, taken, _ = await acquire(link, keys, 5, first=2)
    assert (granted, taken) == (0, 2)
    assert 0.2 <= float(wait) <= 0.25
    assert sorted(texts(await link.command("zrange", keys.leases, 0, -1))) == ["p:0", "p:1"]


@pytest_twisted.ensureDeferred
async def test_leasesCapConcurrencyAndExpire(reactor: Any, link: RedisLink) -> None:
    """
    Two slots: a third call is refused (-1: no slot, not a token wait);
    a lease not renewed expires and its slot is free again; a renewed one
    stays.
    """
    keys = SharedKeys.forKey("k")
    await link.run(SEED, [keys.state], ["rate", "1000", "limit", "2"])
    assert (await acquire(link, keys, 5, lease=0.5))[0] == 2
    granted, wait, _, taken, _ = await acquire(link, keys, 1, first=2, lease=0.5)
    assert (granted, float(wait), taken) == (0, -1.0, 2)
    await sleep(reactor, 0.3)
    # Only the lease still held is renewed.
    assert int(await link.run(RENEW, [keys.leases], [0.5, "p:0", "p:gone"])) == 1
    await sleep(reactor, 0.3)
    granted, _, _, taken, _ = await acquire(link, keys, 5, first=3, lease=0.5)
    assert (granted, taken) == (1, 2)
    assert sorted(texts(await link.command("zrange", keys.leases, 0, -1))) == ["p:0", "p:3"]
    # A lease given back with the next question frees its slot for it.
    granted, _, _, taken, _ = await acquire(link, keys, 5, first=4, lease=0.5, returned=("p:0",))
    assert (granted, taken) == (1, 2)
    assert sorted(texts(await link.command("zrange", keys.leases, 0, -1))) == ["p:3", "p:4"]


@pytest_twisted.ensureDeferred
async def test_quotaKeyAnswersFirst(link: RedisLink) -> None:
    keys = SharedKeys.forKey("k")
    await link.command("set", keys.quota, '{"code": "1308"}', "px", 10000)
    granted, _, quota, _, _ = await acquire(link, keys, 3)
    assert (granted, quota) == (0, '{"code": "1308"}')
    assert int(await link.command("zcard", keys.leases)) == 0


@pytest_twisted.ensureDeferred
async def test_windowIsJudgedOnceWithEveryonesOutcomes(reactor: Any, link: RedisLink) -> None:
    """
    Two proxies report into the same window (numbered on Redis's clock);
    in the next window the first to report gets the totals of both (and
    the others nothing), and each sees both alive.
    """
    keys = SharedKeys.forKey("k")
    span = 1.0

    async def report(name: str, successes: int, frequency: int, at: int, accepted: float) -> Any:
        args = [keys.prefix, span, name, successes, frequency, 1, at, 1, 0, repr(accepted)]
        return texts(await link.run(WINDOW, [keys.state, keys.instances, keys.quota], args))

    now = float(texts(await link.command("time"))[0])
    await sleep(reactor, math.ceil(now) - now + 0.1 if math.ceil(now) - now < 0.3 else 0.0)
    first = await report("a", 10, 1, 5, 2.5)
    await report("b", 20, 2, 3, 4.0)
    index = math.floor(float(first[3]) / span)
    await sleep(reactor, (index + 1) * span - float(first[3]) + 0.05)
    judged = await report("b", 0, 0, -1, 0.0)
    late = await report("a", 0, 0, -1, 0.0)
    totals = dict(zip(judged[0][::2], judged[0][1::2], strict=True))
    assert {
        k: totals[k] for k in ("successes", "frequency", "concurrency", "concurrency_at", "reporters")
    } == {
        "successes": "30",
        "frequency": "3",
        "concurrency": "2",
        "concurrency_at": "3",
        "reporters": "2",
    }
    assert float(totals["accepted"]) == 6.5 and totals["rate_waits"] == "2"
    assert late[0] is None
    assert (judged[4], late[4]) == (0, 0)
    assert (judged[2], late[2]) == (2, 2)


@pytest_twisted.ensureDeferred
async def test_startUpSaysWhereLimitsAreShared(
    reactor: Any, makeStack: Any, logEvents: list[dict[str, Any]], redisServer: RunningRedis
) -> None:
    """
    The start-up lines say whether the limits are shared, through which
    Redis and as which instance, with the password masked everywhere
    (Redis here has none, so the proxy goes alone at once and says so).
    """
    from twisted.logger import formatEvent

    url = f"redis://:hunter2-secret@127.0.0.1:{redisServer.port}/3"
    stack = await makeStack(REDIS_URL=url, INSTANCE_NAME="vm-a:8080")
    await until(reactor, lambda: modes(stack) == [Mode.ALONE], "the proxy goes alone")
    said = [formatEvent(e) for e in logEvents]
    masked = f"redis://:***@127.0.0.1:{redisServer.port}/3"
    assert f"Shared limits: through {masked} as vm-a:8080 (REDIS_TIMEOUT=0.25 s, REDIS_LEASE=15 s)" in said
    assert any(line.startswith(f"Shared limits: Redis at {masked} is away") for line in said), said
    assert any(
        line.startswith(f"Redis at {masked} refused this proxy: Redis error: could not auth") for line in said
    )
    assert "hunter2" not in repr(logEvents)
    assert "hunter2" not in repr(stack.proxy.sharedLimits.snapshot() if stack.proxy.sharedLimits else None)


@pytest_twisted.ensureDeferred
async def test_startUpSaysLimitsAreNotShared(
    reactor: Any, makeStack: Any, logEvents: list[dict[str, Any]]
) -> None:
    from twisted.logger import formatEvent

    await makeStack(INSTANCE_NAME="vm-a:8080")
    said = [formatEvent(e) for e in logEvents]
    assert "Shared limits: off (REDIS_URL unset); this process paces Z.AI alone as vm-a:8080" in said
