"""
Tests for L{zaiproxy.limits.redislink}: parsing C{REDIS_URL}, and a link
to a real Redis whose every call ends in time.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from support.processes import freePort
from support.redis import RunningRedis

from zaiproxy.limits.redislink import RedisAddress, RedisAway, RedisLink, RedisRefused, Script


def test_addressFromURL() -> None:
    address = RedisAddress.fromURL("redis://:s%40cret@cache.internal:6380/2")
    assert (address.host, address.port, address.db, address.password) == ("cache.internal", 6380, 2, "s@cret")
    assert address.masked == "redis://:***@cache.internal:6380/2"
    assert "s@cret" not in repr(address)
    assert RedisAddress.fromURL("redis://localhost") == RedisAddress("localhost", 6379, 0, None)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://localhost", "expected redis://"),
        ("redis://", "expected redis://"),
        ("redis://host:99999", "port"),
        ("redis://host/zero", "database"),
    ],
)
def test_badAddress(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RedisAddress.fromURL(url)


def test_scriptsShipWithThePackage() -> None:
    script = Script.named("acquire")
    assert "redis.call('TIME')" in script.text
    assert len(script.sha) == 40


@pytest_twisted.ensureDeferred
async def test_runLoadsAScriptRedisForgot(reactor: Any, redisServer: RunningRedis, redisURL: str) -> None:
    """
    EVALSHA first; a Redis that does not know the script (fresh, or
    restarted) gets it with SCRIPT LOAD, and the call still answers.
    """
    link = RedisLink(reactor, RedisAddress.fromURL(redisURL), 1.0)
    link.open()
    try:
        redisServer.command("SCRIPT", "FLUSH")
        result = await link.run(Script.named("seed"), ["test:state"], ["rate", "3.5"])
        assert [item.decode() if isinstance(item, bytes) else item for item in result] == ["rate", "3.5"]
        assert link.connected
        with pytest.raises(RedisRefused):
            await link.command("hget", "test:state")
    finally:
        await link.close()


@pytest_twisted.ensureDeferred
async def test_callsEndInTimeWithoutRedis(reactor: Any) -> None:
    """
    Nothing listens: each call fails with L{RedisAway} within the timeout
    (txredisapi alone would wait for a connection for ever).
    """
    link = RedisLink(reactor, RedisAddress("127.0.0.1", freePort(), 0, None), 0.2)
    link.open()
    try:
        started = time.monotonic()
        with pytest.raises(RedisAway):
            await link.command("ping")
        assert time.monotonic() - started < 1.0
        assert not link.connected
    finally:
        await link.close()
