"""
Tests for L{zaiproxy.config.reload}: what a reload changes live, what it reports
as needing a restart, that a bad file changes nothing; and a real SIGHUP
to a real C{twistd zaiproxy} process.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq
from support.processes import TWISTD, Collect, baseEnvironment, freePort
from support.stack import UPSTREAM_KEY
from twisted.internet import task
from twisted.logger import LogLevel

from zaiproxy.config.settings import loadSettings
from zaiproxy.fake import FakeZai, parseScenario
from zaiproxy.fake.testing import RawResponse, RunningFake, portOf, rawRequest, startFake
from zaiproxy.observe.logs import buildObserver
from zaiproxy.service import ProxyService

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-fedcba9876543210"
ADMIN = "admin-token-77aa"
MESSAGES = json.dumps(
    {"model": "glm-4.7", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
).encode()


class Files:
    """
    A config file and a key file in a temporary directory.
    """

    def __init__(self, directory: Any, upstream: RunningFake) -> None:
        self.config = str(directory / "zaiproxy.env")
        self.keys = str(directory / "keys")
        self.base = {
            "ZAI_TARGET_URL": upstream.url("/api/anthropic"),
            "ZAI_OPENAI_TARGET_URL": upstream.url("/api/coding/paas/v4"),
            "RATE_LIMIT_STATE_FILE": "off",
            "DRAIN_TIMEOUT": "2",
            "DRAIN_GRACE": "0",
            "PROXY_API_KEYS_FILE": self.keys,
        }

    def write(self, keys: str | None = None, **settings: str) -> None:
        if keys is not None:
            with open(self.keys, "w") as f:
                f.write(keys)
            os.chmod(self.keys, 0o600)
        with open(self.config, "w") as f:
            for name, value in {**self.base, **settings}.items():
                f.write(f"{name}={value}\n")


@pytest_twisted.async_yield_fixture
async def upstream(reactor: Any) -> AsyncIterator[RunningFake]:
    running = await startFake(reactor, FakeZai(reactor, apiKey=UPSTREAM_KEY, defaults=parseScenario("")))
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def running(
    reactor: Any, upstream: RunningFake, tmp_path: Any
) -> AsyncIterator[tuple[ProxyService, Files, Any]]:
    """
    A proxy started from a config file (the environment holds only the
    upstream key), with our own observer to watch the log level.
    """
    files = Files(tmp_path, upstream)
    files.write(
        f"alice:{ALICE}\n",
        RATE_LIMIT_MIN="1",
        RATE_LIMIT_MAX="100",
        RATE_LIMIT_INITIAL="10",
        LOG_LEVEL="info",
    )
    environ = {"ZAI_API_KEY": UPSTREAM_KEY}
    settings, _ = loadSettings(environ, files.config)
    stream = io.StringIO()
    observer = buildObserver(stream, "text", settings.logLevel)
    proxy = ProxyService(
        reactor, settings, ["tcp:0:interface=127.0.0.1"], observer, configPath=files.config, environ=environ
    )
    proxy.startService()
    yield proxy, files, observer
    if proxy.running:
        await proxy.stopService()


async def call(
    reactor: Any, proxy: ProxyService, key: str | None, path: bytes = b"/v1/messages"
) -> RawResponse:
    headers = [(b"x-api-key", key.encode())] if key else []
    client = await rawRequest(reactor, portOf(proxy.ports[0]), b"POST", path, headers, MESSAGES)
    await client.closed.addErrback(lambda f: None)
    return client.response()


def messages(
    events: list[dict[str, Any]], namespace: str = "zaiproxy.config.reload.Reloader"
) -> list[tuple[str, str]]:
    from twisted.logger import formatEvent

    return [(e["log_level"].name, formatEvent(e)) for e in events if e.get("log_namespace") == namespace]


@pytest_twisted.ensureDeferred
async def test_reloadAppliesLive(reactor: Any, running: Any, logEvents: list[dict[str, Any]]) -> None:
    """
    Client keys, the admin token, the rate-limit bounds and the log level
    change at once; a changed MAX_WORKERS is reported as needing a restart
    and left as it was.
    """
    proxy, files, observer = running
    assert (await call(reactor, proxy, ALICE)).status == 200
    assert (await call(reactor, proxy, BOB)).status == 401
    assert proxy.limiter.rate == 10.0
    files.write(
        f"bob:{BOB}\n",
        RATE_LIMIT_MIN="2",
        RATE_LIMIT_MAX="5",
        RATE_LIMIT_INITIAL="3",
        LOG_LEVEL="debug",
        ADMIN_TOKEN=ADMIN,
        MAX_WORKERS="7",
    )
    assert proxy.reload() is True
    assert (await call(reactor, proxy, ALICE)).status == 401
    assert (await call(reactor, proxy, BOB)).status == 200
    assert (await call(reactor, proxy, None, b"/metrics")).status == 401
    limiter = proxy.limiter
    assert (limiter.settings.initial, limiter.settings.minimum, limiter.settings.maximum) == (3.0, 2.0, 5.0)
    assert (limiter.rate, limiter.ceiling) == (5.0, 5.0)
    assert observer.level is LogLevel.debug
    assert proxy.settings.maxWorkers == 10
    assert proxy.settings.rateLimitMax == 5.0
    assert [k.name for k in proxy.credentials.clientKeys.keys] == ["bob"]
    assert messages(logEvents)[-2:] == [
        (
            "info",
            "Reloaded configuration: client keys 1 (alice) -> 1 (bob); ADMIN_TOKEN changed; "
            "RATE_LIMIT_INITIAL 10 -> 3; RATE_LIMIT_MIN 1 -> 2; RATE_LIMIT_MAX 100 -> 5; "
            "LOG_LEVEL info -> debug",
        ),
        ("warn", "Reload: MAX_WORKERS changed; this needs a restart to take effect"),
    ]
    health = proxy.health.document()["reload"]
    assert health["result"] == "ok" and health["restart_needed"] == ["MAX_WORKERS"]
    assert health["last_at"].endswith("Z")
    sample = proxy.metrics.registry.get_sample_value
    assert sample("zai_proxy_config_reloads_total", {"result": "ok", "variant": "production"}) == 1
    assert sample(
        "zai_proxy_config_last_reload_timestamp_seconds", {"variant": "production"}
    ) == pytest.approx(reactor.seconds(), abs=5)
    assert sample("zai_proxy_client_keys", {"variant": "production"}) == 1
    # Reloading the same files again changes nothing, but still says what
    # waits for a restart.
    assert proxy.reload() is True
    assert messages(logEvents)[-2:] == [
        ("info", "Reloaded configuration: no changes"),
        ("warn", "Reload: MAX_WORKERS changed; this needs a restart to take effect"),
    ]
    text = repr(logEvents)
    for secret in (ALICE, BOB, ADMIN):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_reloadSeesFileGivenToSystemdToo(reactor: Any, upstream: RunningFake, tmp_path: Any) -> None:
    """
    The shipped unit gives the config file to systemd (EnvironmentFile=,
    so its values are in the environment) and to --config: a reload still
    sees edits to it. A variable the environment sets to something else
    (the unit's Environment=) keeps winning.
    """
    files = Files(tmp_path, upstream)
    files.write(f"alice:{ALICE}\n", RATE_LIMIT_MIN="1", RATE_LIMIT_MAX="100", LOG_LEVEL="info")
    from zaiproxy.config.envfile import readEnvironmentFile

    environ = {**readEnvironmentFile(files.config), "ZAI_API_KEY": UPSTREAM_KEY, "RATE_LIMIT_MIN": "2"}
    settings, _ = loadSettings(environ, files.config)
    assert settings.rateLimitMin == 2.0
    observer = buildObserver(io.StringIO(), "text", settings.logLevel)
    proxy = ProxyService(
        reactor, settings, ["tcp:0:interface=127.0.0.1"], observer, configPath=files.config, environ=environ
    )
    proxy.startService()
    try:
        files.write(f"bob:{BOB}\n", RATE_LIMIT_MIN="3", RATE_LIMIT_MAX="50", LOG_LEVEL="debug")
        assert proxy.reload() is True
        assert (proxy.settings.rateLimitMin, proxy.settings.rateLimitMax) == (2.0, 50.0)
        assert observer.level is LogLevel.debug
        assert (await call(reactor, proxy, BOB)).status == 200
        assert (await call(reactor, proxy, ALICE)).status == 401
    finally:
        await proxy.stopService()


@pytest.mark.parametrize(
    "keys, settings, reason",
    [
        (f"alice:{ALICE}\nbob {BOB}\n", {}, "{keys} line 2: expected name:key"),
        (
            f"alice:{ALICE}\ncarol:{ALICE}\n",
            {},
            "{keys} line 2: the key of 'carol' is the same as at {keys} line 1",
        ),
        (
            None,
            {"MAX_WORKERS": "ten"},
            "MAX_WORKERS='ten' is not valid: expected a whole number greater than 0",
        ),
        (
            None,
            {"RATE_LIMIT_MIN": "9", "RATE_LIMIT_MAX": "5", "RATE_LIMIT_INITIAL": "5"},
            "RATE_LIMIT_MIN=9 must not exceed RATE_LIMIT_MAX=5",
        ),
        (
            None,
            {"PROXY_API_KEYS_FILE": "/nonexistent/keys"},
            "cannot read key file /nonexistent/keys: No such file or directory",
        ),
        (None, {"ADMIN_TOKEN": "two words"}, "ADMIN_TOKEN=(hidden) is not valid"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalidFileKeepsRunningConfiguration(
    reactor: Any,
    running: Any,
    logEvents: list[dict[str, Any]],
    keys: str | None,
    settings: dict[str, str],
    reason: str,
) -> None:
    """
    A file that does not load changes nothing; one error line says why,
    without a secret.
    """
    proxy, files, observer = running
    before = proxy.settings
    files.write(keys, LOG_LEVEL="debug", **settings)
    assert proxy.reload() is False
    assert proxy.settings is before
    assert observer.level is LogLevel.info
    assert (await call(reactor, proxy, ALICE)).status == 200
    logged = messages(logEvents)
    assert len(logged) == 1
    level, text = logged[0]
    assert level == "error"
    assert text.startswith(
        "Reload failed; keeping the running configuration: " + reason.format(keys=files.keys)
    )
    assert ALICE not in repr(logEvents)
    assert proxy.health.document()["reload"]["result"] == "failed"
    sample = proxy.metrics.registry.get_sample_value
    assert sample("zai_proxy_config_reloads_total", {"result": "failed", "variant": "production"}) == 1
    assert sample("zai_proxy_config_last_reload_timestamp_seconds", {"variant": "production"}) == 0


def test_limiterBoundsKeepLearnedCeiling(reactor: Any) -> None:
    """
    A learned ceiling is only clamped into the new bounds; a rate below the
    new minimum rises to it.
    """
    from zaiproxy.limits.limiter import LimiterSettings, RateLimiter

    limiter = RateLimiter(
        reactor,
        LimiterSettings(
            initial=10,
            minimum=1,
            maximum=50,
            window=30,
            alpha=0.3,
            margin=0.02,
            probeInterval=10,
            maxWorkers=4,
            maxQueue=4,
            queueTimeout=1,
            stateFile=None,
            stateMaxAge=60,
        ),
    )
    limiter._learned = True
    limiter.ceiling = 20.0
    limiter._setRate(3.0)
    limiter.setBounds(10, 5, 100)
    assert (limiter.rate, limiter.ceiling, limiter.admission.rate) == (5.0, 20.0, 5.0)
    limiter.setBounds(10, 5, 8)
    assert (limiter.rate, limiter.ceiling) == (5.0, 8.0)
    limiter.reset()
    assert (limiter.rate, limiter.ceiling) == (10.0, 8.0)
    limiter.stop()


# -- a real SIGHUP ------------------------------------------------------------------


async def until(reactor: Any, condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await condition():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not reached")


@pytest_twisted.ensureDeferred
async def test_sighupReloadsRealProcess(reactor: Any, upstream: RunningFake, tmp_path: Any) -> None:
    """
    C{twistd -n zaiproxy --config FILE}, sent SIGHUP after the key file
    changed, takes the new keys; sent SIGHUP with a broken key file, it
    logs why and keeps serving with the keys it had; SIGTERM still exits 0.
    """
    port = freePort()
    files = Files(tmp_path, upstream)
    files.write(f"alice:{ALICE}\n", LOG_FORMAT="json")
    collect = Collect()
    env = {**baseEnvironment(), "ZAI_API_KEY": UPSTREAM_KEY}
    process = reactor.spawnProcess(
        collect,
        TWISTD,
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "zaiproxy",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--config",
            files.config,
        ],
        env=env,
        path=str(tmp_path),
    )

    async def status(key: str) -> int:
        keyHeader: dict[bytes | str, bytes | str] = {"x-api-key": key}
        response = await treq.post(
            f"http://127.0.0.1:{port}/v1/messages",
            data=MESSAGES,
            headers=keyHeader,
            persistent=False,
        )
        await response.content()
        return int(response.code)

    async def ready() -> bool:
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/readyz", persistent=False)
            await response.content()
            return True
        except Exception:
            return False

    def logged(start: str) -> list[dict[str, Any]]:
        return [r for r in collect.records() if r["message"].startswith(start)]

    try:
        await until(reactor, ready)
        assert await status(ALICE) == 200
        assert await status(BOB) == 401
        files.write(f"alice:{ALICE}\nbob:{BOB}\n", LOG_FORMAT="json", MAX_WORKERS="3")
        process.signalProcess("HUP")

        async def bobAccepted() -> bool:
            return await status(BOB) == 200

        await until(reactor, bobAccepted)
        assert await status(ALICE) == 200
        files.write(f"alice:{ALICE}\nbob {BOB}\n", LOG_FORMAT="json")
        process.signalProcess("HUP")

        async def failureLogged() -> bool:
            return bool(logged("Reload failed"))

        await until(reactor, failureLogged)
        assert await status(BOB) == 200
        process.signalProcess("TERM")
        exitCode = await collect.ended
    finally:
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
    output = collect.out.decode() + collect.err.decode()
    assert exitCode == (0, None), output[-3000:]
    assert [r["level"] for r in logged("SIGHUP: reloading")] == ["info", "info"]
    assert [r["message"] for r in logged("Reloaded configuration")] == [
        "Reloaded configuration: client keys 1 (alice) -> 2 (alice, bob)"
    ]
    assert [r["message"] for r in logged("Reload: ")] == [
        "Reload: MAX_WORKERS changed; this needs a restart to take effect"
    ]
    assert [(r["level"], r["message"]) for r in logged("Reload failed")] == [
        ("error", f"Reload failed; keeping the running configuration: {files.keys} line 2: expected name:key")
    ]
    for secret in (ALICE, BOB, UPSTREAM_KEY):
        assert secret not in output
