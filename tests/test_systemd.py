"""
Tests for C{systemd/}: the units pass C{systemd-analyze}, agree with the
settings, and socket activation works with the real C{twistd} process: a
restart on a socket held by someone else (systemd, here the test) refuses
no connection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.processes import TWISTD, Collect, baseEnvironment, freePort, value
from support.stack import UPSTREAM_KEY
from twisted.internet import task
from twisted.internet.error import ConnectionRefusedError

from zaiproxy.config.settings import loadSettings
from zaiproxy.fake import FakeZai
from zaiproxy.fake.testing import RawClient, rawRequest, startFake
from zaiproxy.service import _CUT_SECONDS, _FLUSH_SECONDS

ROOT = Path(__file__).parent.parent
UNITS = ROOT / "systemd"
INSTALLED_TWISTD = "/opt/zaiproxy/bin/twistd"
ANALYZE = shutil.which("systemd-analyze")
needsAnalyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")

ANTHROPIC = [(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")]
BODY = b'{"model":"glm-4.7","messages":[{"role":"user","content":"hi"}]}'
#: Per step of the process tests; a hang fails the test instead of the run.
STEP = 30.0


#: The service's command line after the twistd path: settings from the same
#: file systemd reads, so SIGHUP can re-read them.
ARGUMENTS = "--nodaemon --pidfile= zaiproxy --listen tcp:8080 --config /etc/zaiproxy/zaiproxy.env"


def verifiable(tmp: Path) -> list[Path]:
    """
    Copies of both units in C{tmp}, with ExecStart pointing at the twistd
    that exists here instead of /opt/zaiproxy's; nothing else changes.
    """
    copies = []
    for unit in ("zaiproxy.service", "zaiproxy.socket"):
        text = (UNITS / unit).read_text()
        copy = tmp / unit
        copy.write_text(text.replace(INSTALLED_TWISTD, TWISTD))
        changed = [
            (a, b) for a, b in zip(text.splitlines(), copy.read_text().splitlines(), strict=True) if a != b
        ]
        if unit == "zaiproxy.service":
            assert changed == [
                (f"ExecStart={INSTALLED_TWISTD} {ARGUMENTS}", f"ExecStart={TWISTD} {ARGUMENTS}")
            ]
        else:
            assert changed == []
        copies.append(copy)
    return copies


def analyze(*args: str, cwd: Path) -> tuple[int, str]:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ.get("PATH", ""), "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    return result.returncode, result.stdout + result.stderr


@needsAnalyze
def test_verify(tmp_path: Path) -> None:
    """
    C{systemd-analyze verify} accepts both units without a single warning
    (it exits 0 on warnings, so its output must be empty too).
    """
    copies = verifiable(tmp_path)
    assert analyze("verify", *map(str, copies), cwd=tmp_path) == (0, "")


@needsAnalyze
def test_verifyWouldCatchAWarning(tmp_path: Path) -> None:
    """
    The check above can fail: a misspelt value is only a warning (exit 0),
    and it shows in the output.
    """
    service, socketUnit = verifiable(tmp_path)
    service.write_text(service.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    status, output = analyze("verify", str(service), str(socketUnit), cwd=tmp_path)
    assert status == 0
    assert "Failed to parse protect system value, ignoring: strictly" in output


@needsAnalyze
def test_sandboxExposure(tmp_path: Path) -> None:
    """
    C{systemd-analyze security} rates the service's sandbox "OK" (exposure
    at most 2.0 out of 10), where the offline review exists (systemd 250+).
    """
    service, _ = verifiable(tmp_path)
    _, output = analyze("security", "--offline=true", "--no-pager", str(service), cwd=tmp_path)
    if "--offline" in output and "unrecognized" in output:
        pytest.skip("this systemd-analyze has no offline security review")
    match = re.search(r"Overall exposure level for zaiproxy\.service: ([0-9.]+) (\w+)", output)
    assert match, output
    assert float(match.group(1)) <= 2.0, output


def test_unitsAgreeWithTheSettings() -> None:
    """
    The units and the settings tell the same story: the env file the
    README installs, the state directory of the default state file, a stop
    timeout longer than the whole drain, the port, the socket's service.
    """
    service, socketUnit = UNITS / "zaiproxy.service", UNITS / "zaiproxy.socket"
    # Under the unit, systemd sets STATE_DIRECTORY from StateDirectory=.
    stateDirectory = "/var/lib/" + value(service, "StateDirectory")
    defaults, _ = loadSettings({"ZAI_API_KEY": "k", "STATE_DIRECTORY": stateDirectory})
    assert value(service, "EnvironmentFile") == "/etc/zaiproxy/zaiproxy.env"
    assert defaults.rateLimitStateFile is not None
    assert defaults.rateLimitStateFile == stateDirectory + "/ceiling.json"
    assert (
        float(value(service, "TimeoutStopSec"))
        > defaults.drainGrace + defaults.drainTimeout + _CUT_SECONDS + _FLUSH_SECONDS
    )
    assert value(service, "ExecStart") == f"{INSTALLED_TWISTD} {ARGUMENTS}"
    assert value(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(socketUnit, "ListenStream") == "8080"
    assert value(socketUnit, "Service") == "zaiproxy.service"
    assert value(socketUnit, "FileDescriptorName") == "zaiproxy"
    hardening = {
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "User": "zaiproxy",
        "Group": "zaiproxy",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes",
        "UMask": "0077",
    }
    assert {key: value(service, key) for key in hardening} == hardening
    assert value(service, "WantedBy") == "multi-user.target"
    assert value(socketUnit, "WantedBy") == "sockets.target"


# -- the real process --------------------------------------------------------


def heldSocket() -> socket.socket:
    """
    A listening socket the test holds, as systemd holds zaiproxy.socket.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def spawn(
    reactor: Any, held: socket.socket, upstream: str, listenPID: str | None, listen: str
) -> tuple[Any, Collect]:
    """
    Start C{twistd zaiproxy} with C{held} as descriptor 3. C{listenPID}
    C{"$$"} sets LISTEN_PID to the process's own pid, as systemd does;
    L{None} sets no LISTEN_* variable at all.
    """
    env = {
        **baseEnvironment(),
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAI_TARGET_URL": upstream,
        "RATE_LIMIT_STATE_FILE": "off",
        "LOG_FORMAT": "json",
        "DRAIN_TIMEOUT": "5",
        "DRAIN_GRACE": "0",
    }
    if listenPID is not None:
        env.update(LISTEN_FDS="1", LISTEN_FDNAMES="zaiproxy")
    command = f'LISTEN_PID={listenPID} exec "$0" "$@"' if listenPID else 'exec "$0" "$@"'
    collect = Collect()
    process = reactor.spawnProcess(
        collect,
        "/bin/sh",
        ["/bin/sh", "-c", command, TWISTD, "-n", "--pidfile=", "zaiproxy", "--listen", listen],
        env=env,
        childFDs={0: "w", 1: "r", 2: "r", 3: held.fileno()},
    )
    return process, collect


async def answered(reactor: Any, client: RawClient) -> tuple[int, str]:
    await client.closed.addErrback(lambda f: None).addTimeout(STEP, reactor)
    response = client.response()
    return response.status, json.loads(response.body)["type"]


async def stopped(reactor: Any, process: Any, collect: Collect) -> tuple[int | None, int | None]:
    process.signalProcess("TERM")
    return await collect.ended.addTimeout(STEP, reactor)


def messages(collect: Collect) -> list[str]:
    return [json.loads(line)["message"] for line in collect.out.decode().splitlines()]


@pytest_twisted.ensureDeferred
async def test_restartRefusesNoConnection(reactor: Any) -> None:
    """
    Started with a socket passed the systemd way, twistd serves on it and
    not on --listen; stopped, it leaves the socket listening, so a client
    arriving before the next start is queued, and the next process on the
    same socket answers it.
    """
    fake = FakeZai(reactor, apiKey=UPSTREAM_KEY)
    upstream = await startFake(reactor, fake)
    held = heldSocket()
    port = held.getsockname()[1]
    other = freePort()
    listen = f"tcp:{other}:interface=127.0.0.1"
    running: list[Any] = []
    waiting: RawClient | None = None
    try:
        first, firstLog = spawn(reactor, held, upstream.url("/api/anthropic"), "$$", listen)
        running.append(first)
        # No readiness poll: until the proxy accepts, the kernel queues.
        client = await rawRequest(reactor, port, b"POST", b"/v1/messages", ANTHROPIC, BODY)
        assert await answered(reactor, client) == (200, "message")
        with pytest.raises(ConnectionRefusedError):
            await rawRequest(reactor, other, b"GET", b"/health")
        assert await stopped(reactor, first, firstLog) == (0, None)

        waiting = await rawRequest(reactor, port, b"POST", b"/v1/messages", ANTHROPIC, BODY)
        await task.deferLater(reactor, 0.5, lambda: None)
        assert (waiting.raw, waiting.lostReason) == (b"", None)
        assert len(fake.received) == 1

        second, secondLog = spawn(reactor, held, upstream.url("/api/anthropic"), "$$", listen)
        running.append(second)
        assert await answered(reactor, waiting) == (200, "message")
        assert len(fake.received) == 2
        assert await stopped(reactor, second, secondLog) == (0, None)
    finally:
        for process in running:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGKILL)
        held.close()
        if waiting is not None:
            await waiting.closed.addErrback(lambda f: None)
        await upstream.stop()
    for log in (firstLog, secondLog):
        lines = messages(log)
        assert (
            "Socket activation: listening on 1 socket(s) passed by systemd (LISTEN_FDS=1) instead of "
            f"--listen {listen}" in lines
        )
        assert (
            f"Z.AI proxy listening on 127.0.0.1:{port} (systemd:domain=INET:index=0 (fd 3, zaiproxy)); "
            "metrics at /metrics" in lines
        )
        assert not any(f"listening on 127.0.0.1:{other}" in line for line in lines)
        assert log.err.decode() == ""


@pytest.mark.parametrize("listenPID", ["1", None], ids=["otherPID", "noListenFDs"])
@pytest_twisted.ensureDeferred
async def test_listenWithoutActivation(reactor: Any, listenPID: str | None) -> None:
    """
    Without LISTEN_FDS, or with LISTEN_FDS meant for another process
    (LISTEN_PID is not ours), the proxy listens on --listen, and the socket
    at descriptor 3 stays unserved.
    """
    fake = FakeZai(reactor, apiKey=UPSTREAM_KEY)
    upstream = await startFake(reactor, fake)
    held = heldSocket()
    other = freePort()
    listen = f"tcp:{other}:interface=127.0.0.1"
    ignored: RawClient | None = None
    process, log = spawn(reactor, held, upstream.url("/api/anthropic"), listenPID, listen)
    try:
        for _ in range(100):
            try:
                client = await rawRequest(reactor, other, b"POST", b"/v1/messages", ANTHROPIC, BODY)
                break
            except ConnectionRefusedError:
                await task.deferLater(reactor, 0.1, lambda: None)
        assert await answered(reactor, client) == (200, "message")
        ignored = await rawRequest(reactor, held.getsockname()[1], b"GET", b"/health")
        await task.deferLater(reactor, 0.3, lambda: None)
        assert ignored.raw == b""
        assert await stopped(reactor, process, log) == (0, None)
    finally:
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        held.close()
        if ignored is not None:
            await ignored.closed.addErrback(lambda f: None)
        await upstream.stop()
    lines = messages(log)
    assert f"Z.AI proxy listening on 127.0.0.1:{other} ({listen}); metrics at /metrics" in lines
    assert not any(line.startswith("Socket activation") for line in lines)
    assert log.err.decode() == ""


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed"
)
@pytest_twisted.ensureDeferred
async def test_systemdSocketActivate(reactor: Any) -> None:
    """
    systemd's own socket-passing tool (the protocol of zaiproxy.socket,
    names included) binds ListenStream-style on every address; the proxy
    adopts that socket with its real address family and answers on it.
    """
    fake = FakeZai(reactor, apiKey=UPSTREAM_KEY)
    upstream = await startFake(reactor, fake)
    port = freePort()
    env = baseEnvironment()
    settings = {
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAI_TARGET_URL": upstream.url("/api/anthropic"),
        "RATE_LIMIT_STATE_FILE": "off",
        "LOG_FORMAT": "json",
        **env,
    }
    tool = shutil.which("systemd-socket-activate")
    args = [tool, "-l", str(port), "--fdname=zaiproxy"]
    args += [f"--setenv={name}={value}" for name, value in settings.items()]
    args += [TWISTD, "-n", "--pidfile=", "zaiproxy", "--listen", "tcp:0:interface=127.0.0.1"]
    collect = Collect()
    process = reactor.spawnProcess(collect, tool, args, env=env)
    try:
        for _ in range(100):
            try:
                client = await rawRequest(reactor, port, b"POST", b"/v1/messages", ANTHROPIC, BODY)
                break
            except ConnectionRefusedError:
                await task.deferLater(reactor, 0.1, lambda: None)
        assert await answered(reactor, client) == (200, "message")
        assert await stopped(reactor, process, collect) == (0, None)
    finally:
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        await upstream.stop()
    # The tool says on stderr what it bound: [::] where IPv6 exists.
    bound = re.search(r"Listening on (\S+) as 3\.", collect.err.decode())
    assert bound, collect.err.decode()
    domain, where = (
        ("INET6", f":::{port}") if bound.group(1).startswith("[::]") else ("INET", f"0.0.0.0:{port}")
    )
    assert bound.group(1) in (f"[::]:{port}", f"0.0.0.0:{port}")
    assert (
        f"Z.AI proxy listening on {where} (systemd:domain={domain}:index=0 (fd 3, zaiproxy)); metrics at "
        "/metrics" in messages(collect)
    )
