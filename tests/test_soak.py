"""
The soak: the real daemon (C{twistd zaiproxy}) in front of the real fake
daemon (C{twistd zaiproxy-fake}), a few thousand mixed good and faulty
requests at bounded concurrency, then proof that nothing leaked: the proxy
still answers, its file descriptors are back at the baseline, its memory
has not grown by more than 10%, and no key reached any log line.

Both daemons run as subprocesses so that /proc shows the proxy alone and
its logs are exactly what an operator would read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from support.clients import chatBody, ended, events, messagesBody, sleep
from support.processes import TWISTD, baseEnvironment, freePort
from twisted.internet import defer

from zaiproxy.fake.testing import RawClient, rawRequest

#: A key no other test uses, so a match in the logs can only come from here.
SOAK_KEY = "zai-soak-SECRET-0c5e2d91b7"
#: What clients send as their own keys; the proxy drops them, never logs them.
CLIENT_KEY = "client-soak-SECRET-4a8f"

ANTHROPIC = [
    (b"content-type", b"application/json"),
    (b"anthropic-version", b"2023-06-01"),
    (b"x-api-key", CLIENT_KEY.encode()),
]
OPENAI = [(b"content-type", b"application/json"), (b"authorization", b"Bearer " + CLIENT_KEY.encode())]

#: Idle upstream connections the proxy may keep (UPSTREAM_POOL_SIZE below).
POOL_SIZE = 32
CONCURRENCY = 32
WARMUP = 400
SOAK = 3000

# TCP states in /proc/net/tcp.
_CLOSE_WAIT = "08"
_LISTEN = "0A"


def scenario(spec: str) -> tuple[bytes, bytes]:
    return (b"x-fake-scenario", spec.encode())


# -- the request mix ---------------------------------------------------------------
#
# Each kind sends one request and returns a short description of what went
# wrong, or "" when the answer was exactly as expected.

Kind = Callable[[Any, int], Awaitable[str]]


async def _send(
    reactor: Any, port: int, path: bytes, headers: Any, body: bytes, method: bytes = b"POST"
) -> RawClient:
    client = await rawRequest(reactor, port, method, path, headers, body)
    await ended(client)
    return client


def _status(client: RawClient) -> int:
    try:
        return client.response().status
    except Exception:
        return -1


def _jsonError(client: RawClient, status: int, where: tuple[str, ...], value: str) -> str:
    if _status(client) != status:
        return f"status {_status(client)}"
    document: Any = json.loads(client.response().body)
    for key in where:
        document = document[key]
    return "" if document == value else f"error {document!r}"


async def anthropicJSON(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/messages", ANTHROPIC, messagesBody(stream=False))
    if _status(client) != 200:
        return f"status {_status(client)}"
    body = json.loads(client.response().body)
    return "" if body["type"] == "message" and body["usage"]["output_tokens"] > 0 else "body"


async def openaiJSON(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/chat/completions", OPENAI, chatBody(stream=False))
    if _status(client) != 200:
        return f"status {_status(client)}"
    body = json.loads(client.response().body)
    return "" if body["object"] == "chat.completion" else "body"


async def anthropicStream(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/messages", ANTHROPIC, messagesBody())
    if _status(client) != 200 or not client.raw.endswith(b"0\r\n\r\n"):
        return f"status {_status(client)}"
    names = [name for name, _ in events(client.response().body)]
    return "" if names[-1] == "message_stop" and names.count("content_block_delta") == 5 else "events"


async def openaiStream(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/chat/completions", OPENAI, chatBody())
    if _status(client) != 200 or not client.raw.endswith(b"0\r\n\r\n"):
        return f"status {_status(client)}"
    return "" if client.response().body.endswith(b"data: [DONE]\n\n") else "end"


async def leaveMidStream(reactor: Any, port: int) -> str:
    client = await rawRequest(
        reactor,
        port,
        b"POST",
        b"/v1/messages",
        [*ANTHROPIC, scenario("events=40 interval=0.01")],
        messagesBody(),
    )
    try:
        await client.when(lambda c: b"event: content_block_delta" in c.raw)
    except ConnectionError:
        return "closed before the first delta"
    client.connection.abortConnection()
    await ended(client)
    return ""


async def malformedJSON(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/messages", ANTHROPIC, b'{"model":"glm-4.7","messages":[')
    return _jsonError(client, 400, ("error", "type"), "1210")


async def oversizeBody(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/chat/completions", OPENAI, b"x" * 70_000)
    return _jsonError(
        client, 413, ("error", "message"), "request body of 70000 bytes exceeds the limit of 65536 bytes"
    )


async def traversal(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/%2e%2e/admin/reset-rate-limit", ANTHROPIC, b"", b"GET")
    return _jsonError(client, 400, ("error", "message"), "request path must not contain . or .. segments")


async def upstreamReset(reactor: Any, port: int) -> str:
    client = await _send(
        reactor, port, b"/v1/chat/completions", [*OPENAI, scenario("mode=reset")], chatBody()
    )
    return _jsonError(
        client, 502, ("error", "message"), "the upstream closed the connection before responding"
    )


async def upstreamResetMidStream(reactor: Any, port: int) -> str:
    client = await _send(
        reactor, port, b"/v1/messages", [*ANTHROPIC, scenario("mode=reset-mid after=2")], messagesBody()
    )
    if _status(client) != 200 or not client.raw.endswith(b"0\r\n\r\n"):
        return f"status {_status(client)}"
    return "" if events(client.response().body)[-1][0] == "error" else "no error event"


async def upstreamError(reactor: Any, port: int) -> str:
    client = await _send(
        reactor, port, b"/v1/messages", [*ANTHROPIC, scenario("mode=error code=1214")], messagesBody()
    )
    return _jsonError(client, 400, ("error", "type"), "1214")


async def upstream500(reactor: Any, port: int) -> str:
    client = await _send(
        reactor, port, b"/v1/chat/completions", [*OPENAI, scenario("mode=error code=500")], chatBody()
    )
    return _jsonError(client, 500, ("error", "code"), "500")


async def models(reactor: Any, port: int) -> str:
    client = await _send(reactor, port, b"/v1/models", ANTHROPIC, b"", b"GET")
    return (
        "" if _status(client) == 200 and b'"data"' in client.response().body else f"status {_status(client)}"
    )


#: The mix: (kind, weight, the status its access-log line records); mostly
#: good traffic, every fault often.
MIX: list[tuple[Kind, int, int]] = [
    (anthropicJSON, 4, 200),
    (openaiJSON, 4, 200),
    (anthropicStream, 4, 200),
    (openaiStream, 4, 200),
    (models, 1, 200),
    (leaveMidStream, 2, 499),
    (malformedJSON, 1, 400),
    (oversizeBody, 1, 413),
    (traversal, 1, 400),
    (upstreamReset, 1, 502),
    (upstreamResetMidStream, 1, 200),
    (upstreamError, 1, 400),
    (upstream500, 1, 500),
]
_SCHEDULE = [(kind, status) for kind, weight, status in MIX for _ in range(weight)]


def expectedStatuses(count: int) -> Counter[int]:
    """
    The statuses the access log records for the first C{count} requests.
    """
    return Counter(_SCHEDULE[i % len(_SCHEDULE)][1] for i in range(count))


async def run(reactor: Any, port: int, count: int, offset: int = 0) -> Counter[str]:
    """
    Send C{count} requests of the mix, C{CONCURRENCY} at a time; count the
    failures by kind and reason.
    """
    failures: Counter[str] = Counter()
    semaphore = defer.DeferredSemaphore(CONCURRENCY)

    async def one(i: int) -> None:
        kind = _SCHEDULE[(i + offset) % len(_SCHEDULE)][0]
        try:
            problem = await kind(reactor, port)
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            failures[f"{kind.__name__}: {problem}"] += 1

    def start(i: int) -> defer.Deferred[None]:
        return defer.ensureDeferred(one(i))

    await defer.gatherResults([semaphore.run(start, i) for i in range(count)], consumeErrors=True)
    return failures


# -- the proxy process, seen from /proc -------------------------------------------------


def _tcpSockets() -> dict[str, tuple[int, int, str]]:
    """
    Every TCP socket of this network namespace: inode -> (local port,
    remote port, state).
    """
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            found[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    return found


def descriptors(pid: int, upstreamPort: int) -> tuple[int, int, list[str]]:
    """
    The proxy's open descriptors, split into (idle-able upstream
    connections, everything else), and the states of sockets stuck in
    CLOSE_WAIT (a connection the far end closed that the proxy never did).
    """
    sockets = _tcpSockets()
    upstream = other = 0
    stuck = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        inode = target[len("socket:[") : -1] if target.startswith("socket:[") else None
        info = sockets.get(inode) if inode is not None else None
        if info is not None and info[2] == _CLOSE_WAIT:
            stuck.append(f"fd {fd}: ports {info[0]}->{info[1]}")
        if info is not None and info[1] == upstreamPort:
            upstream += 1
        else:
            other += 1
    return upstream, other, stuck


def rssKiB(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def waitUntil(reactor: Any, condition: Callable[[], bool], limit: float, step: float = 0.1) -> bool:
    waited = 0.0
    while not condition():
        if waited >= limit:
            return False
        await sleep(reactor, step)
        waited += step
    return True


async def ready(reactor: Any, port: int, path: bytes) -> bool:
    try:
        client = await rawRequest(reactor, port, b"GET", path)
        await ended(client)
        return _status(client) in (200, 404)
    except Exception:
        return False


async def waitReady(reactor: Any, process: subprocess.Popen[bytes], port: int, path: bytes) -> None:
    for _ in range(150):
        assert process.poll() is None, "the daemon exited at start-up"
        if await ready(reactor, port, path):
            return
        await sleep(reactor, 0.1)
    raise AssertionError("the daemon did not start")


async def stop(reactor: Any, process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        if not await waitUntil(reactor, lambda: process.poll() is not None, 10):
            process.kill()
            process.wait(5)


@pytest_twisted.ensureDeferred
async def test_soak(reactor: Any, tmp_path: Path) -> None:
    """
    Thousands of mixed requests leave the proxy as they found it.
    """
    base = baseEnvironment()
    fakePort = proxyPort = freePort()
    while proxyPort == fakePort:
        proxyPort = freePort()
    logs = {name: open(tmp_path / name, "wb") for name in ("fake.out", "fake.err", "proxy.out", "proxy.err")}
    fake = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "zaiproxy-fake",
            "--listen",
            f"tcp:{fakePort}:interface=127.0.0.1",
            "--api-key",
            SOAK_KEY,
            "--scenario",
            "events=5",
        ],
        env=base,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=logs["fake.out"],
        stderr=logs["fake.err"],
    )
    proxy = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "zaiproxy", "--listen", f"tcp:{proxyPort}:interface=127.0.0.1"],
        env={
            **base,
            "ZAI_API_KEY": SOAK_KEY,
            "ZAI_TARGET_URL": f"http://127.0.0.1:{fakePort}/api/anthropic",
            "ZAI_OPENAI_TARGET_URL": f"http://127.0.0.1:{fakePort}/api/coding/paas/v4",
            "LOG_FORMAT": "json",
            "RATE_LIMIT_STATE_FILE": "off",
            "RATE_LIMIT_INITIAL": "5000",
            "RATE_LIMIT_MAX": "5000",
            "MAX_WORKERS": "200",
            "MAX_RETRIES": "0",
            "MAX_REQUEST_BYTES": "64KiB",
            "UPSTREAM_POOL_SIZE": str(POOL_SIZE),
            "DRAIN_TIMEOUT": "2",
            "DRAIN_GRACE": "0",
        },
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=logs["proxy.out"],
        stderr=logs["proxy.err"],
    )
    try:
        await waitReady(reactor, fake, fakePort, b"/")
        await waitReady(reactor, proxy, proxyPort, b"/readyz")

        # Warm up: every kind of request, enough to fill the upstream pool,
        # load the tokenizer and grow the allocator's arenas.
        assert await run(reactor, proxyPort, WARMUP) == Counter()
        await sleep(reactor, 0.5)
        poolBefore, fdsBefore, stuck = descriptors(proxy.pid, fakePort)
        assert stuck == []
        rssBefore = rssKiB(proxy.pid)

        started = reactor.seconds()
        failures = await run(reactor, proxyPort, SOAK, offset=WARMUP)
        elapsed = reactor.seconds() - started
        assert failures == Counter(), f"after {elapsed:.1f} s: {failures}"

        # Still answering, exactly.
        assert await anthropicStream(reactor, proxyPort) == ""
        assert await openaiJSON(reactor, proxyPort) == ""

        # Descriptors: everything but the upstream pool returns to the exact
        # baseline (client connections, listeners, files, the epoll fd); the
        # pool may hold a different number of idle connections than after
        # the warm-up, but never more than UPSTREAM_POOL_SIZE, and none of
        # them half-closed.
        settledFds = await waitUntil(reactor, lambda: descriptors(proxy.pid, fakePort)[1] == fdsBefore, 5)
        poolAfter, fdsAfter, stuck = descriptors(proxy.pid, fakePort)
        assert settledFds, f"non-upstream descriptors: {fdsBefore} before, {fdsAfter} after"
        assert 0 < poolBefore <= POOL_SIZE and 0 < poolAfter <= POOL_SIZE, (poolBefore, poolAfter)
        assert stuck == []

        rssAfter = rssKiB(proxy.pid)
        assert rssAfter <= rssBefore * 1.10, f"RSS grew from {rssBefore} KiB to {rssAfter} KiB"
    finally:
        await stop(reactor, proxy)
        await stop(reactor, fake)
        for f in logs.values():
            f.close()

    assert proxy.returncode == 0
    output = {name: (tmp_path / name).read_text() for name in logs}
    for name, text in output.items():
        assert SOAK_KEY not in text, f"the upstream key is in {name}"
        assert CLIENT_KEY not in text, f"a client key is in {name}"
    assert output["proxy.err"] == ""
    records = [json.loads(line) for line in output["proxy.out"].splitlines()]
    access = Counter(r["status"] for r in records if r["namespace"] == "zaiproxy.access")
    # One access line per request, with its status (the probes of /readyz
    # are not logged; the two checks at the end answered 200).
    assert access == expectedStatuses(WARMUP + SOAK) + Counter({200: 2})
    assert [r for r in records if r["level"] in ("error", "critical")] == []
