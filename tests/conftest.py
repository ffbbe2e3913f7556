"""
Shared fixtures: the global reactor, an in-memory Z.AI for tests on a
clock, a guard that fails any test leaving
delayed calls or open sockets behind, and one that fails any test whose log
holds a Twisted warning or an unhandled error (pytest-twisted polices
neither; trial would).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
import pytest_twisted

# Fail a test whose log holds a complaint of Twisted's own (see the module).
from support.stack import UPSTREAM_KEY, Stack
from twisted.internet import task
from twisted.logger import ILogObserver
from twistedcomplaints import twistedComplaints  # noqa: F401

#: Modules whose tests run real processes (twistd, pytest, a benchmark).
_PROCESS_MODULES = frozenset(
    [
        "test_activation",
        "test_bench",
        "test_readme",
        "test_reload",
        "test_soak",
        "test_systemd",
        "test_tap",
        "test_twistedcomplaints",
        "test_workers",
    ]
)


#: Fixtures that bring the real reactor: real sockets, the wall clock.
_REAL_FIXTURES = frozenset(
    ["reactor", "makeStack", "stack", "http", "postgresURL", "postgresServer", "redisURL", "redisServer"]
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: over real sockets or processes, on the wall clock (set by conftest); "
        "-m 'not integration' runs the in-memory logic tests alone",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """
    Mark the tests that use the real reactor (real sockets, real time) or
    start processes: every other test runs in memory, on a clock of its own.
    """
    for item in items:
        function = getattr(item, "function", None)
        # What the test asks for itself: the autouse cleanReactor fixture
        # brings the reactor to every test.
        asked = set(inspect.signature(function).parameters) if function is not None else set()
        module = getattr(item, "module", None)
        name = module.__name__ if module is not None else ""
        if asked & _REAL_FIXTURES or name in _PROCESS_MODULES:
            item.add_marker(pytest.mark.integration)


#: How long a test may take, after it returns, to finish closing its sockets.
_SETTLE_SECONDS = 3.0


@pytest.fixture
def reactor() -> Any:
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor as globalReactor

    return globalReactor


def _selectables(reactor: Any) -> set[Any]:
    return set(reactor.getReaders()) | set(reactor.getWriters())


def _describe(things: Any) -> str:
    return "\n  ".join(sorted(repr(t) for t in things))


@pytest_twisted.async_yield_fixture(autouse=True)
async def cleanReactor(reactor: Any) -> AsyncIterator[None]:
    """
    Fail a test that leaves a delayed call or an open connection or port.

    Closing a socket takes a reactor turn or two, so the check waits a little
    for sockets to go; a delayed call still pending afterwards is a leak.
    """
    before = _selectables(reactor)
    callsBefore = {id(c) for c in reactor.getDelayedCalls()}
    yield
    waited = 0.0
    while waited < _SETTLE_SECONDS:
        leftSockets = _selectables(reactor) - before
        leftCalls = [c for c in reactor.getDelayedCalls() if c.active() and id(c) not in callsBefore]
        if not leftSockets and not leftCalls:
            return
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02
    leftSockets = _selectables(reactor) - before
    leftCalls = [c for c in reactor.getDelayedCalls() if c.active() and id(c) not in callsBefore]
    for c in leftCalls:
        c.cancel()
    for s in leftSockets:
        abort = getattr(s, "abortConnection", None) or getattr(s, "loseConnection", None)
        if abort is not None:
            abort()
        else:
            stop = getattr(s, "stopListening", None)
            if stop is not None:
                stop()
    pytest.fail(
        "test left the reactor dirty:\n  "
        + _describe(leftSockets)
        + ("\n  " if leftSockets and leftCalls else "")
        + _describe(leftCalls)
    )


# ---------------------------------------------------------------------------
# A running stack: the fake Z.AI on a loopback port and the proxy in front.

from treq.client import HTTPClient  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from zaiproxy.config.settings import loadSettings  # noqa: E402
from zaiproxy.fake import FakeZai, parseScenario  # noqa: E402
from zaiproxy.fake.testing import startFake  # noqa: E402
from zaiproxy.service import ProxyService  # noqa: E402


@pytest_twisted.async_yield_fixture
async def makeStack(reactor: Any) -> AsyncIterator[Any]:
    """
    A factory of stacks: C{await makeStack("events=3", UPSTREAM_IDLE_TIMEOUT="1")};
    C{configPath} and C{adminListen} are the C{--config} and C{--admin-listen}
    options.
    Everything it started is stopped at the end of the test.
    """
    made: list[Stack] = []

    async def make(
        scenario: str = "",
        fakeKey: str | None = UPSTREAM_KEY,
        fakeClock: Any = None,
        limiterClock: Any = None,
        configPath: str | None = None,
        adminListen: list[str] | None = None,
        **env: str,
    ) -> Stack:
        fake = FakeZai(fakeClock or reactor, apiKey=fakeKey, defaults=parseScenario(scenario))
        upstream = await startFake(reactor, fake)
        environ = {
            "ZAI_API_KEY": UPSTREAM_KEY,
            "ZAI_TARGET_URL": upstream.url("/api/anthropic"),
            "ZAI_OPENAI_TARGET_URL": upstream.url("/api/coding/paas/v4"),
            "RATE_LIMIT_STATE_FILE": "off",
            "DRAIN_TIMEOUT": "2",
            "DRAIN_GRACE": "0",
            # Generous limits: tests about the limiter set their own.
            "RATE_LIMIT_MAX": "1000",
            "RATE_LIMIT_INITIAL": "1000",
            "MAX_WORKERS": "200",
            # The default ledger is the user's; a ledger test names its own.
            "LEDGER_ENABLED": "false",
            **env,
        }
        settings, _ = loadSettings(environ, configPath)
        proxy = ProxyService(
            reactor,
            settings,
            ["tcp:0:interface=127.0.0.1"],
            limiterClock=limiterClock,
            adminListen=adminListen,
            configPath=configPath,
            environ=environ,
        )
        proxy.startService()
        stack = Stack(fake, upstream, proxy)
        made.append(stack)
        return stack

    yield make
    for stack in reversed(made):
        if stack.proxy.running:
            await stack.proxy.stopService()
        await stack.upstream.stop()


@pytest_twisted.async_yield_fixture
async def stack(makeStack: Any) -> AsyncIterator[Stack]:
    """
    A stack with the fake's default scenario.
    """
    yield await makeStack()


@pytest_twisted.async_yield_fixture
async def http(reactor: Any) -> AsyncIterator[HTTPClient]:
    """
    A treq client for tests, on its own pool, closed at the end.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


_counters: dict[tuple[tuple[str, str], ...], tuple[Any, list[str]]] = {}


@pytest.fixture(autouse=True)
def loadCounterOnce(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Every in-process proxy gets the real token counter, loaded once per
    environment rather than per L{ProxyService}: reading and checking
    cl100k_base takes 0.3 s, and the suite builds hundreds of proxies.
    (The counter keeps no state; L{tests.test_tokens} tests the loading.)
    """
    from zaiproxy import service
    from zaiproxy.usage import tokens

    def load(environ: Any) -> tuple[Any, list[str]]:
        key = tuple(sorted(environ.items()))
        if key not in _counters:
            _counters[key] = tokens.loadCounter(environ)
        counter, problems = _counters[key]
        return counter, list(problems)

    monkeypatch.setattr(service, "loadCounter", load)


@pytest.fixture(autouse=True)
def logEvents() -> Iterator[list[dict[str, Any]]]:
    """
    Every log event of the test; none may contain the upstream key.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict[str, Any]] = []
    # Any callable taking an event is an observer; the annotation wants the interface.
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)
    for event in events:
        text = formatEvent(event) + repr(sorted(event.items(), key=lambda kv: kv[0]))
        failure = event.get("log_failure")
        if failure is not None:
            text += failure.getTraceback()
        assert UPSTREAM_KEY not in text, f"the upstream key was logged: {formatEvent(event)}"


# ---------------------------------------------------------------------------
# A real PostgreSQL server, once per session, and a database per test.

from support.postgres import RunningPostgres, postgresBin, startPostgres  # noqa: E402


@pytest.fixture(scope="session")
def postgresServer() -> Iterator[RunningPostgres]:
    if postgresBin() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed here (.ci/run installs it: apt-get install postgresql)")
    server = startPostgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgresURL(postgresServer: RunningPostgres) -> str:
    """
    The URL of a fresh, empty database on the session's server.
    """
    return postgresServer.newDatabase()


from support.redis import RunningRedis, redisBin, startRedis  # noqa: E402


@pytest.fixture(scope="session")
def redisServer() -> Iterator[RunningRedis]:
    if redisBin() is None and not os.environ.get("CI"):
        pytest.skip("Redis is not installed here (.ci/run installs it: apt-get install redis-server)")
    server = startRedis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redisURL(redisServer: RunningRedis) -> str:
    """
    The URL of an emptied database on the session's server (restarted if
    a test left it stopped).
    """
    if redisServer.process is None:
        redisServer.resume()
    return redisServer.newDatabase()
