"""
Tests for L{zaiproxy.workers} and C{twistd zaiproxy --workers N}: the
refusals, the pieces in this process, and real processes sharing one port
in front of the fake Z.AI with a real Redis.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from support.processes import TWISTD, Collect, baseEnvironment, freePort, listening
from support.stack import UPSTREAM_KEY
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from zaiproxy.fake import FakeZai
from zaiproxy.fake.testing import startFake
from zaiproxy.workers import (
    Backoff,
    ParentWatch,
    ReusePortEndpoint,
    Supervisor,
    TCPAddress,
    WorkerCommand,
    adminListenFor,
    instanceName,
    workersProblem,
)

BODY = json.dumps(
    {"model": "glm-4.7", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
).encode()

# -- the pieces ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:8080", TCPAddress(8080)),
        ("tcp:8080:interface=127.0.0.1", TCPAddress(8080, "127.0.0.1")),
        ("tcp:port=8080:backlog=1024:interface=127.0.0.1", TCPAddress(8080, "127.0.0.1", 1024)),
        ("tcp:8080:interface=\\:\\:1", TCPAddress(8080, "::1")),
        ("tcp6:8080:backlog=7", TCPAddress(8080, "", 7, six=True)),
        ("unix:/run/zaiproxy.sock", None),
        ("systemd:domain=INET:index=0", None),
        ("tcp:http", None),
    ],
)
def test_tcpAddress(description: str, expected: TCPAddress | None) -> None:
    """
    TCP descriptions are read as Twisted reads them (positional or named,
    backslash escapes); anything else is not one.
    """
    address = TCPAddress.parse(description)
    assert address == expected
    if address is not None:
        assert TCPAddress.parse(address.description) == address


def test_adminListenFor() -> None:
    """
    Worker K serves its admin port on PORT+K, on the same interface.
    """
    given = ["tcp:9090:interface=127.0.0.1", "tcp:9190:interface=\\:\\:1"]
    assert adminListenFor(given, 0) == given
    assert adminListenFor(given, 2) == ["tcp:9092:interface=127.0.0.1", "tcp:9192:interface=\\:\\:1"]


@pytest.mark.parametrize(
    "configured, port, index, count, expected",
    [
        ("", 8080, 0, 1, "vm1:8080"),
        ("", None, 0, 1, "vm1"),
        ("", 0, 0, 1, "vm1"),
        ("", 8080, 1, 2, "vm1:8080/1"),
        ("edge-a", 8080, 0, 1, "edge-a"),
        ("edge-a", 8080, 2, 3, "edge-a/2"),
    ],
)
def test_instanceName(configured: str, port: int | None, index: int, count: int, expected: str) -> None:
    assert instanceName(configured, "vm1", port, index, count) == expected


def test_workersProblem() -> None:
    """
    One worker needs nothing; several need all of it.
    """
    ok = ("redis://r", ["tcp:8080"], ["tcp:9090"], "--listen", True)
    assert workersProblem(1, "", ["unix:/x"], [], "systemd", False) is None
    assert workersProblem(3, *ok) is None
    assert "needs REDIS_URL" in str(workersProblem(3, "", *ok[1:]))
    assert "cannot share sockets passed by systemd" in str(workersProblem(3, *ok[:3], "systemd", True))
    assert "with a fixed port, not 'tcp:0'" in str(workersProblem(3, "redis://r", ["tcp:0"], *ok[2:]))
    assert "needs --admin-listen" in str(workersProblem(3, *ok[:2], [], *ok[3:]))
    assert "not 'tcp:65534'" in str(workersProblem(3, *ok[:2], ["tcp:65534"], *ok[3:]))
    assert "needs twistd -n" in str(workersProblem(3, *ok[:4], False))


def test_backoff() -> None:
    assert [Backoff(1, 30).delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


@pytest_twisted.ensureDeferred
async def test_reusePort(reactor: Any) -> None:
    """
    Two endpoints bind the same port (each worker's); a port held without
    SO_REUSEPORT is refused with CannotListenError.
    """
    port = freePort()
    address = TCPAddress(port, "127.0.0.1")
    factory = Factory.forProtocol(Protocol)
    first = await ReusePortEndpoint(reactor, address).listen(factory)
    second = await ReusePortEndpoint(reactor, address).listen(factory)
    try:
        assert first.getHost().port == second.getHost().port == port  # type: ignore[attr-defined]
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen(1)
            taken = TCPAddress(held.getsockname()[1], "127.0.0.1")
            with pytest.raises(CannotListenError):
                await ReusePortEndpoint(reactor, taken).listen(factory)
    finally:
        await defer.maybeDeferred(first.stopListening)
        await defer.maybeDeferred(second.stopListening)


class StoppableClock(Clock):
    running = True
    stops = 0

    def stop(self) -> None:
        self.stops += 1
        self.running = False


def test_parentWatch(logEvents: list[dict[str, Any]]) -> None:
    """
    A worker stops its reactor once its parent pid is no longer the
    supervisor's.
    """
    clock = StoppableClock()
    parent = [4242]
    watch = ParentWatch(clock, 1, 4242, getppid=lambda: parent[0])
    watch.startService()
    clock.advance(1)
    clock.advance(1)
    assert clock.stops == 0
    parent[0] = 1
    clock.advance(1)
    clock.advance(1)
    assert clock.stops == 1
    watch.stopService()
    texts = [e["log_format"].format(**e) for e in logEvents if e.get("log_namespace") == "zaiproxy.workers"]
    assert texts == ["Worker 1: the supervisor (pid 4242) is gone; stopping"]


#: A stand-in worker: touches its marker file once its SIGTERM handling is
#: in place, then sleeps; "polite" exits on SIGTERM, "stubborn" ignores it.
STAND_IN = (
    "import pathlib, signal, sys, time\n"
    "polite = sys.argv[1] == 'polite'\n"
    "signal.signal(signal.SIGTERM, (lambda *a: sys.exit(0)) if polite else signal.SIG_IGN)\n"
    "pathlib.Path(sys.argv[2] + sys.argv[4]).touch()\n"
    "time.sleep(60)\n"
)


def standIns(tmp_path: Path, manner: str) -> WorkerCommand:
    return WorkerCommand(sys.executable, (manner, str(tmp_path / "ready-")), ("-c", STAND_IN))


async def until(reactor: Any, check: Any, what: str, seconds: float = 10.0) -> None:
    deadline = reactor.seconds() + seconds
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


def alive(pid: int) -> bool:
    """
    Whether C{pid} runs (a zombie, waiting for a parent that never reaps
    it, does not).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(pids: Any) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_supervisorRestartsAndStops(
    reactor: Any, tmp_path: Path, logEvents: list[dict[str, Any]]
) -> None:
    """
    A worker that dies is started again after the back-off; stopping sends
    SIGTERM to every worker and waits until they are gone.
    """
    supervisor = Supervisor(
        reactor, standIns(tmp_path, "polite"), 3, os.environ, 10.0, Backoff(first=0.2), forwardHangup=False
    )
    supervisor.startService()
    first = supervisor.pids()
    try:
        assert sorted(first) == [1, 2]
        await until(reactor, lambda: len(list(tmp_path.glob("ready-*"))) == 2, "both workers ready")
        os.kill(first[1], signal.SIGKILL)
        await until(reactor, lambda: supervisor.pids().get(1, first[1]) != first[1], "worker 1 restarted")
        assert supervisor.pids()[2] == first[2]
        started = reactor.seconds()
        await supervisor.stopService()
        assert reactor.seconds() - started < 5
    finally:
        kill([*first.values(), *supervisor.pids().values()])
    assert supervisor.pids() == {}
    assert not any(alive(pid) for pid in first.values())
    texts = [
        e.get("log_format", "").format(**e) for e in logEvents if e.get("log_namespace") == "zaiproxy.workers"
    ]
    assert any(
        t.startswith(f"Worker 1 (pid {first[1]}) was killed by SIGKILL after ")
        and t.endswith("again in 0.2 s")
        for t in texts
    ), texts


@pytest_twisted.ensureDeferred
async def test_supervisorKillsStubbornWorkers(
    reactor: Any, tmp_path: Path, logEvents: list[dict[str, Any]]
) -> None:
    """
    A worker still there after the stop timeout gets SIGKILL.
    """
    supervisor = Supervisor(reactor, standIns(tmp_path, "stubborn"), 2, os.environ, 0.5, forwardHangup=False)
    supervisor.startService()
    pid = supervisor.pids()[1]
    try:
        await until(reactor, lambda: (tmp_path / "ready-1").exists(), "the worker ready")
        started = reactor.seconds()
        await supervisor.stopService()
        assert 0.5 <= reactor.seconds() - started < 5
    finally:
        kill([pid])
    assert not alive(pid)
    texts = [
        e.get("log_format", "").format(**e) for e in logEvents if e.get("log_namespace") == "zaiproxy.workers"
    ]
    assert f"Worker 1 (pid {pid}) did not stop in 0.5 s: SIGKILL" in texts
    assert f"Worker 1 (pid {pid}) was killed by SIGKILL" in texts


# -- the real daemon ---------------------------------------------------------------


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, *args], env={**baseEnvironment(), **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "env, args, message",
    [
        (
            {},
            ["--admin-listen", "tcp:9090"],
            "zaiproxy: --workers 2 needs REDIS_URL: without a shared Redis each worker would offer Z.AI the "
            "whole rate limit (2 times what it accepts)",
        ),
        (
            {"REDIS_URL": "redis://127.0.0.1:1/0"},
            [],
            "zaiproxy: --workers 2 needs --admin-listen tcp:PORT: each worker keeps its own counters and "
            "serves them on PORT+K (K = 0..1); Prometheus scrapes each worker and sum() gives the totals",
        ),
        (
            {"REDIS_URL": "redis://127.0.0.1:1/0"},
            ["--admin-listen", "tcp:9090", "--listen", "unix:/tmp/zaiproxy-workers.sock"],
            "zaiproxy: --workers 2 needs --listen tcp:PORT[:interface=...] with a fixed port, not "
            "'unix:/tmp/zaiproxy-workers.sock': every worker binds that port with SO_REUSEPORT",
        ),
        (
            {"REDIS_URL": "redis://127.0.0.1:1/0"},
            ["--admin-listen", "unix:/tmp/zaiproxy-admin.sock"],
            "zaiproxy: --workers 2 needs --admin-listen tcp:PORT[:interface=...] with a fixed port",
        ),
    ],
)
def test_refused(tmp_path: Path, env: dict[str, str], args: list[str], message: str) -> None:
    """
    What --workers cannot work with stops start-up with one line, exit 2.
    """
    result = run(
        ["-n", "--pidfile=", "zaiproxy", "--workers", "2", *args], {"ZAI_API_KEY": "k", **env}, tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_refusedWhenLoggingElsewhere(tmp_path: Path) -> None:
    """
    The workers log to standard output: a twistd log file is refused.
    """
    env = {"ZAI_API_KEY": "k", "REDIS_URL": "redis://127.0.0.1:1/0"}
    args = ["-n", "--pidfile=", "--logfile", str(tmp_path / "log"), "zaiproxy", "--workers", "2"]
    result = run([*args, "--admin-listen", "tcp:9090"], env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "zaiproxy: --workers 2 needs twistd -n (--nodaemon) logging to standard output (no --logfile, "
        "--syslog or --logger)"
    ), result.stderr


def twoFreePorts() -> int:
    """
    A port whose next one is free too (worker 1's admin port).
    """
    for _ in range(50):
        port = freePort()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def records(collect: Collect) -> list[dict[str, Any]]:
    """
    The JSON lines of every worker (a line two processes wrote into at once
    is skipped).
    """
    found = []
    for line in collect.out.decode(errors="replace").splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


async def get(port: int, path: str) -> Any:
    response = await treq.get(f"http://127.0.0.1:{port}{path}", persistent=False)
    return await response.content()


async def health(port: int) -> Any:
    return json.loads(await get(port, "/health"))


async def requestsServed(port: int) -> float:
    text = (await get(port, "/metrics")).decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "zai_proxy_requests_total" and sample.labels["path"] == "/v1/messages"
    )


async def post(port: int) -> int:
    headers: dict[str | bytes, list[str | bytes]] = {
        "content-type": ["application/json"],
        "anthropic-version": ["2023-06-01"],
    }
    response = await treq.post(
        f"http://127.0.0.1:{port}/v1/messages", BODY, headers=headers, persistent=False
    )
    await response.content()
    return int(response.code)


async def postMany(reactor: Any, port: int, count: int, together: int = 20) -> list[int]:
    """
    C{count} requests, each on a connection of its own (so the kernel
    chooses a worker for each), C{together} at a time.
    """
    codes: list[int] = []
    for start in range(0, count, together):
        batch = [defer.ensureDeferred(post(port)) for _ in range(min(together, count - start))]
        codes.extend(await defer.gatherResults(batch))
    return codes


def workerEnv(fakeURL: str, redisURL: str) -> dict[str, str]:
    return {
        **baseEnvironment(),
        "ZAI_API_KEY": UPSTREAM_KEY,
        "ZAI_TARGET_URL": fakeURL,
        "RATE_LIMIT_STATE_FILE": "off",
        "RATE_LIMIT_MAX": "1000",
        "RATE_LIMIT_INITIAL": "1000",
        "MAX_WORKERS": "200",
        "LOG_FORMAT": "json",
        "DRAIN_TIMEOUT": "5",
        "REDIS_URL": redisURL,
    }


@pytest_twisted.ensureDeferred
async def test_workersShareOnePort(reactor: Any, tmp_path: Path, redisURL: str) -> None:
    """
    Two workers on one port: the kernel gives each a share of 200
    connections, and their counters add up to exactly 200; worker 1, killed,
    is started again while the port keeps answering; SIGHUP reaches both;
    SIGTERM to worker 0 (and to worker 1 as well) stops them all.
    """
    upstream = await startFake(reactor, FakeZai(reactor, apiKey=UPSTREAM_KEY))
    port, admin = freePort(), twoFreePorts()
    collect = Collect()
    argv = [
        TWISTD,
        "-n",
        "--pidfile=",
        "zaiproxy",
        "--workers",
        "2",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
    ]
    argv += ["--admin-listen", f"tcp:{admin}:interface=127.0.0.1"]
    env = workerEnv(upstream.url("/api/anthropic"), redisURL)
    process = reactor.spawnProcess(collect, TWISTD, argv, env=env, path=str(tmp_path))
    pids = {process.pid}
    try:
        await listening(reactor, admin)
        await listening(reactor, admin + 1)
        first = (await health(admin + 1))["worker"]
        pids.add(first["pid"])
        assert (first["index"], first["supervisor_pid"]) == (1, process.pid)
        assert (await health(admin))["worker"]["worker_pids"] == {"1": first["pid"]}

        codes = await postMany(reactor, port, 200)
        assert codes == [200] * 200
        served = [await requestsServed(admin), await requestsServed(admin + 1)]
        assert all(n > 0 for n in served) and sum(served) == 200, served

        host = socket.gethostname()
        names = {r.get("instance") for r in records(collect) if r["message"].startswith("Worker ")}
        assert {f"{host}:{port}/0", f"{host}:{port}/1"} <= names

        os.kill(first["pid"], signal.SIGKILL)
        assert await postMany(reactor, port, 20) == [200] * 20
        await until(
            reactor, lambda: any("was killed by SIGKILL" in r["message"] for r in records(collect)), "restart"
        )
        again = await waitForWorker(reactor, admin + 1, first["pid"])
        pids.add(again)
        assert (await health(admin))["worker"]["worker_pids"] == {"1": again}
        assert await postMany(reactor, port, 20) == [200] * 20

        process.signalProcess("HUP")
        await until(reactor, lambda: len(reloads(collect)) == 2, "both workers reloaded")

        # As systemd stops a unit (KillMode=control-group): every process at
        # once, then the supervisor signals its workers again.
        process.signalProcess("TERM")
        os.kill(again, signal.SIGTERM)
        assert await collect.ended == (0, None), collect.out.decode()[-3000:] + collect.err.decode()
        assert not any(alive(pid) for pid in pids)
        output = collect.out.decode() + collect.err.decode()
        assert "Traceback" not in output and "ReactorNotRunning" not in output
        assert output.count("Worker 1: received SIGTERM; stopping") == 1
    finally:
        kill(pids)
        await upstream.stop()
    assert UPSTREAM_KEY not in collect.out.decode() + collect.err.decode()


def reloads(collect: Collect) -> list[dict[str, Any]]:
    return [r for r in records(collect) if r["message"].startswith("Reloaded configuration")]


async def waitForWorker(reactor: Any, admin: int, old: int) -> int:
    """
    The pid of the worker answering on C{admin} once it is not C{old}.
    """
    deadline = reactor.seconds() + 15
    while reactor.seconds() < deadline:
        try:
            pid = int((await health(admin))["worker"]["pid"])
            if pid != old:
                return pid
        except Exception:
            pass
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"no new worker answered on {admin}")


@pytest_twisted.ensureDeferred
async def test_workersStopWithoutSupervisor(reactor: Any, tmp_path: Path, redisURL: str) -> None:
    """
    Worker 0 killed outright: the others notice within a second or two and
    stop themselves.
    """
    upstream = await startFake(reactor, FakeZai(reactor, apiKey=UPSTREAM_KEY))
    port, admin = freePort(), twoFreePorts()
    collect = Collect()
    argv = [
        TWISTD,
        "-n",
        "--pidfile=",
        "zaiproxy",
        "--workers",
        "2",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
    ]
    argv += ["--admin-listen", f"tcp:{admin}:interface=127.0.0.1"]
    process = reactor.spawnProcess(
        collect, TWISTD, argv, env=workerEnv(upstream.url("/api/anthropic"), redisURL), path=str(tmp_path)
    )
    pids = {process.pid}
    try:
        await listening(reactor, admin + 1)
        worker = int((await health(admin + 1))["worker"]["pid"])
        pids.add(worker)
        process.signalProcess("KILL")
        await collect.ended
        await until(reactor, lambda: not alive(worker), "worker 1 stopped", seconds=10)
    finally:
        kill(pids)
        await upstream.stop()
