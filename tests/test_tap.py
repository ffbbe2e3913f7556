"""
Tests for L{zaiproxy.tap} and the twistd plugin, through the real C{twistd}
executable of the installed package.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from typing import Any

import pytest
import pytest_twisted
import treq
from support.processes import TWISTD, Collect, baseEnvironment, freePort, listening
from support.stack import UPSTREAM_KEY
from twisted.internet import task

from zaiproxy.config.settings import settingSpecs
from zaiproxy.fake import FakeZai, parseScenario
from zaiproxy.fake.testing import rawRequest, startFake


def run(args: list[str], env: dict[str, str], cwd: str) -> subprocess.CompletedProcess[str]:
    """
    Run twistd to completion (only for commands that exit at once).
    """
    return subprocess.run(
        [TWISTD, *args],
        env={**baseEnvironment(), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pluginListed(tmp_path: Any) -> None:
    """
    From any directory, C{twistd --help} lists both plugins.
    """
    result = run(["--help"], {}, str(tmp_path))
    assert result.returncode == 0
    assert "zaiproxy           Streaming reverse proxy" in result.stdout
    assert "zaiproxy-fake" in result.stdout


def test_help(tmp_path: Any) -> None:
    """
    C{twistd zaiproxy --help} documents both options and every setting.
    """
    result = run(["zaiproxy", "--help"], {}, str(tmp_path))
    assert result.returncode == 0
    assert "--listen=" in result.stdout and "--config=" in result.stdout
    assert "--admin-listen=" in result.stdout
    assert "[default: tcp:8080]" in result.stdout
    for spec in settingSpecs():
        assert spec.env in result.stdout
    # No stray gaps: option texts are reflowed, empty defaults say so.
    options = result.stdout.split("Options:\n", 1)[1].split("\n\n", 1)[0]
    for line in options.splitlines():
        assert not re.search(r"\S {2,}\S", line[23:]), line
    assert "(default )" not in result.stdout
    assert "  MODEL_LABELS (default: empty)\n" in result.stdout


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({}, [], "zaiproxy: ZAI_API_KEY is required but not set"),
        (
            {"ZAI_API_KEY": "k", "MAX_WORKERS": "ten"},
            [],
            "zaiproxy: MAX_WORKERS='ten' is not valid: expected a whole number greater than 0",
        ),
        (
            {"ZAI_API_KEY": "k", "TOKEN_COUNTING_ENABLED": "off-ish"},
            [],
            "zaiproxy: TOKEN_COUNTING_ENABLED='off-ish' is not valid: expected true/false, 1/0, yes/no or "
            "on/off",
        ),
        (
            {"ZAI_API_KEY": "k"},
            ["--listen", "tcp:notaport"],
            "zaiproxy: --listen 'tcp:notaport' is not a valid endpoint: 'notaport' is not a number "
            "(expected e.g. tcp:8080:interface=127.0.0.1 or unix:/run/zaiproxy.sock)",
        ),
        (
            {"ZAI_API_KEY": "k"},
            ["--listen", "notaport"],
            "zaiproxy: --listen 'notaport' is not a valid endpoint: Unknown endpoint type: 'notaport' (",
        ),
        (
            {"ZAI_API_KEY": "k"},
            ["--listen", "systemd:domain=INET:index=0"],
            "zaiproxy: invalid --listen: systemd passed no such socket (is zaiproxy.socket active?)",
        ),
        (
            {"ZAI_API_KEY": "k"},
            ["--listen", "systemd:domain=INET:name=zaiproxy"],
            "zaiproxy: invalid --listen: systemd passed no such socket (is zaiproxy.socket active?)",
        ),
        (
            {"ZAI_API_KEY": "k"},
            ["--config", "/nonexistent/zaiproxy.env"],
            "zaiproxy: cannot read config file /nonexistent/zaiproxy.env: No such file or directory",
        ),
        (
            {"ZAI_API_KEY": "k", "PROXY_API_KEYS_FILE": "/nonexistent/keys"},
            [],
            "zaiproxy: cannot read key file /nonexistent/keys: No such file or directory",
        ),
        (
            {
                "ZAI_API_KEY": "k",
                "PROXY_API_KEYS": "alice:alice-key-0123456789abcdef,alice:other-key-0123456789abcdef",
            },
            [],
            "zaiproxy: PROXY_API_KEYS=(hidden) is not valid: entry 2: the name 'alice' is already used at "
            "entry 1",
        ),
        (
            {"ZAI_API_KEY": "k"},
            ["--admin-listen", "tcp:9000:interface=127.0.0.1", "--admin-listen", "tcp:x"],
            "zaiproxy: --admin-listen 'tcp:x' is not a valid endpoint: 'x' is not a number (",
        ),
    ],
)
def test_badSettingsExit(tmp_path: Any, env: dict[str, str], args: list[str], message: str) -> None:
    """
    Bad settings stop start-up with one line on stderr and a non-zero exit,
    no traceback, and nothing started.
    """
    result = run(["-n", "--pidfile=", "zaiproxy", *args], env, str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message)
    assert "Traceback" not in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_sigtermDrainsRealProcess(reactor: Any, tmp_path: Any) -> None:
    """
    The real twistd process, sent SIGTERM mid-stream: it stops accepting,
    lets the stream finish with its last bytes on the wire, logs JSON lines
    through it all, and exits 0.
    """
    fake = FakeZai(reactor, apiKey=UPSTREAM_KEY, defaults=parseScenario("events=6 interval=0.25"))
    upstream = await startFake(reactor, fake)
    port = freePort()
    collect = Collect()
    env = {
        **baseEnvironment(),
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAI_TARGET_URL": upstream.url("/api/anthropic"),
        "RATE_LIMIT_STATE_FILE": "off",
        "LOG_FORMAT": "json",
        "DRAIN_TIMEOUT": "10",
        "DRAIN_GRACE": "1",
    }
    process = reactor.spawnProcess(
        collect,
        TWISTD,
        [TWISTD, "-n", "--pidfile=", "zaiproxy", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=env,
        path=str(tmp_path),
    )
    try:
        await listening(reactor, port)
        client = await rawRequest(
            reactor,
            port,
            b"POST",
            b"/v1/messages",
            [],
            b'{"model":"glm-4.7","stream":true,"messages":[{"role":"user","content":"hi"}]}',
        )
        await client.when(lambda c: b"content_block_delta" in c.raw)
        process.signalProcess("TERM")
        # During DRAIN_GRACE the port stays open and /readyz says 503, so a
        # load balancer sees the drain instead of a refused connection.
        probes = []
        for _ in range(50):
            response = await treq.get(f"http://127.0.0.1:{port}/readyz", persistent=False)
            probes.append((response.code, await response.content()))
            if response.code == 503:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert probes[-1] == (503, b'{"status":"draining"}'), probes
        exitCode = await collect.ended
        await client.closed.addErrback(lambda f: None)
    finally:
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        await upstream.stop()
    assert exitCode == (0, None), collect.out.decode()[-3000:] + collect.err.decode()
    assert client.raw.endswith(b"0\r\n\r\n")
    assert client.raw.count(b"event: content_block_delta") == 6
    assert b"event: message_stop" in client.raw
    records = [json.loads(line) for line in collect.out.decode().splitlines()]
    messages = [r["message"] for r in records]
    assert any(m.startswith("Draining: 1 request(s) in flight") for m in messages)
    assert "Draining: /readyz answers 503; listeners close in 1 s" in messages
    access = [r for r in records if r["namespace"] == "zaiproxy.access"]
    # Probes of the local endpoints are not logged (they would flood the log).
    assert [(r["method"], r["route"], r["status"], r["model"]) for r in access] == [
        ("POST", "/v1/messages", 200, "glm-4.7")
    ]
    assert messages[-1] == "Server Shut Down."
    assert UPSTREAM_KEY not in collect.out.decode() + collect.err.decode()


def test_freezeStartupHeap() -> None:
    """
    What start-up loaded is taken out of the collector (makeService calls
    this last): a full collection then walks none of it.
    """
    import gc

    from zaiproxy.tap import freezeStartupHeap

    alive = [[i] for i in range(1000)]  # lists are always tracked
    try:
        freezeStartupHeap()
        assert gc.get_freeze_count() >= len(alive)
        assert not any(obj is alive[0] for obj in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(obj is alive[0] for obj in gc.get_objects())


@pytest.mark.parametrize("option", ["--listen", "--admin-listen"])
def test_portInUseIsOneLine(tmp_path: Any, option: str) -> None:
    """
    A port already taken stops start-up with one log line naming the address
    and the listen option's value, and exit status 1; no traceback.
    """
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    description = f"tcp:{port}:interface=127.0.0.1"
    args = ["--listen", "tcp:0:interface=127.0.0.1", option, description]
    if option == "--listen":
        args = args[2:]
    try:
        result = run(["-n", "--pidfile=", "zaiproxy", *args], {"ZAI_API_KEY": "k"}, str(tmp_path))
    finally:
        taken.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    failures = [line for line in result.stdout.splitlines() if "#critical]" in line or "#error]" in line]
    assert len(failures) == 1, result.stdout
    assert failures[0].endswith(
        f"[zaiproxy.service.ProxyService#critical] Cannot listen on 127.0.0.1:{port} ({description}): "
        "Address already in use"
    )
