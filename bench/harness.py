"""
The benchmark harness: start the fake upstream, the proxy and the raw
relay, put load on them, and read what they cost from /proc.

Pure measurement: everything here returns data (the attrs classes below);
L{bench.report} turns it into Markdown. The setup follows the
perf-baselines reference: when the machine has two CPUs or more, the
system under test is pinned to one and the fake, the load and every client
to another, so the proxy's CPU time is its own; on one CPU nothing is
pinned and the figures say less. Loopback only.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO

import attrs

from bench.load import API_KEY, BenchError, Load, LoadResult, Plan, onCpu, runLoad

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
#: The twistd of the interpreter running the bench (the venv's, normally).
TWISTD = str(Path(sys.executable).parent / "twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

#: The paths of the same endpoint, direct to the fake and through the proxy.
#: The static answer of C{--fake nginx}: a Messages answer with Z.AI's usage.
NGINX_BODY = (
    '{"id":"msg_bench","type":"message","role":"assistant","model":"glm-4.7",'
    '"content":[{"type":"text","text":"hello from a static upstream"}],'
    '"stop_reason":"end_turn","stop_sequence":null,'
    '"usage":{"input_tokens":12,"output_tokens":7}}'
)
NGINX_CONF = """
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location / {{ return 200 '{body}'; }}
    }}
}}
"""
DIRECT_PATH = "/api/anthropic/v1/messages"
PROXY_PATH = "/v1/messages"

#: The proxy's admission limits, set out of the way: the benchmark measures
#: what relaying costs, and the rate limiter's defaults admit 10 to 50 model
#: calls a second, as they should in front of Z.AI. Admission still runs.
LIMITS_ENV = {
    "RATE_LIMIT_STATE_FILE": "off",
    "RATE_LIMIT_INITIAL": "100000",
    "RATE_LIMIT_MAX": "100000",
    "MAX_WORKERS": "1000",
}

#: Settings of every proxy the bench starts: text logs, and a stop that
#: does not wait for a load balancer that is not there.
PROXY_ENV = {"LOG_FORMAT": "text", "DRAIN_TIMEOUT": "1s", "DRAIN_GRACE": "0", **LIMITS_ENV}

#: A run disturbed above this share of a CPU is measured again.
DISTURBED = 0.05


#: Prefixes of the caller's environment a bench proxy does not inherit: the
#: bench sets its own upstream, logging, limits and ledger.
DROP_ENV = (
    "ZAI_",
    "LOG_",
    "MAX_",
    "UPSTREAM_",
    "RATE_LIMIT_",
    "QUOTA_",
    "QUEUE_",
    "DRAIN_",
    "LEDGER_",
    "DASHBOARD_",
)


@attrs.frozen
class Cpus:
    """
    Where the system under test (C{sut}) and the load run; C{None} when the
    machine has too few CPUs to keep them apart.
    """

    sut: int | None
    load: int | None

    @classmethod
    def choose(cls) -> Cpus:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(available[0], available[1])

    @property
    def pinned(self) -> bool:
        return self.sut is not None

    def all(self) -> tuple[int, ...]:
        return tuple(c for c in (self.sut, self.load) if c is not None)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ----------------------------------------------------------------


class Child:
    """
    One process the bench started, its output in a log file; L{stop} is
    safe to call twice.
    """

    def __init__(self, name: str, argv: list[str], logPath: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.logPath = logPath
        self._log: IO[bytes] = open(logPath, "ab")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.logPath.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@attrs.frozen
class Server:
    """
    A started process and the loopback port it serves on.
    """

    child: Child
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def waitReady(child: Child, port: int, path: str, headers: dict[str, str], timeout: float = 30.0) -> None:
    """
    Poll until C{GET path} answers 200 (any answer when C{path} is empty);
    fail early if the process died.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited with status {child.proc.returncode}:\n{child.tail()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path or "/", headers=headers)
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 200 or not path:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{child.name} not ready on port {port} after {timeout:g} s:\n{child.tail()}")


class Harness:
    """
    The processes of one run, with their logs in C{out}: L{stopAll} (or
    leaving the C{with} block) stops every one, newest first.
    """

    def __init__(
        self,
        out: Path,
        stamp: str,
        plan: Plan,
        cpus: Cpus | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.out = out
        self.stamp = stamp
        self.plan = plan
        self.cpus = cpus if cpus is not None else Cpus.choose()
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.logs: dict[str, Path] = {}
        self.problems: list[str] = []
        #: Per proxy: how many 499s wrk's end-of-run disconnects may log.
        self.expected499: Counter[str] = Counter()
        self.quietWaits = 0
        self._children: list[Child] = []
        out.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopAll()

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.say(f"  !! {text}")

    def spawn(self, name: str, argv: list[str], cpu: int | None, env: dict[str, str] | None = None) -> Child:
        path = self.out / f"{self.stamp}-{name}.log"
        self.logs[name] = path
        child = Child(name, onCpu(cpu, argv), path, env)
        self._children.append(child)
        return child

    def stop(self, server: Server | Child) -> None:
        child = server.child if isinstance(server, Server) else server
        child.stop()
        if child in self._children:
            self._children.remove(child)

    def stopAll(self) -> None:
        while self._children:
            self._children.pop().stop()

    def startFake(self, kind: str = "quiet") -> Server:
        """
        The fake Z.AI on the load CPU: C{quiet} is bench/fakeserver.py (no
        access log, no request record), C{twistd} the plain
        C{zaiproxy-fake}, C{nginx} a static JSON answer from nginx (the
        fastest upstream there is, so the relays, not the fake, are the
        bottleneck; JSON only).
        """
        if kind == "nginx":
            return self._startNginx()
        port = freePort()
        if kind == "twistd":
            command = [TWISTD, "-n", "--pidfile=", "zaiproxy-fake"]
        else:
            command = [PYTHON, str(BENCH / "fakeserver.py")]
        listen = f"tcp:{port}:interface=127.0.0.1:backlog=1024"
        child = self.spawn("fake", [*command, "--listen", listen, "--api-key", API_KEY], self.cpus.load)
        waitReady(child, port, "/api/anthropic/v1/models", {"x-api-key": API_KEY})
        return Server(child, port)

    def _startNginx(self) -> Server:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(nginx):
            raise BenchError("--fake nginx: nginx is not installed (apt-get install nginx-light)")
        port = freePort()
        prefix = self.out / f"{self.stamp}-nginx"
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, body=NGINX_BODY))
        argv = [nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        child = self.spawn("fake", argv, self.cpus.load)
        waitReady(child, port, "/api/anthropic/v1/models", {})
        return Server(child, port)

    def spawnProxy(
        self, fake: Server, name: str, env: dict[str, str] | None = None, twistd: str = TWISTD
    ) -> Server:
        """
        Start C{twistd -n zaiproxy} on the SUT CPU in front of C{fake},
        without waiting: the bench's settings, then C{env}. The caller's
        own ZAI_, LOG_, limit, upstream and ledger settings are dropped. C{twistd}
        may be another venv's, to run another version of the proxy.
        """
        port = freePort()
        environ = {k: v for k, v in os.environ.items() if not k.startswith(DROP_ENV)}
        environ.update(
            ZAI_API_KEY=API_KEY,
            ZAI_TARGET_URL=fake.url("/api/anthropic"),
            ZAI_OPENAI_TARGET_URL=fake.url("/api/coding/paas/v4"),
            # The ledger on, as shipped, in a file of this run's (never the
            # user's state folder).
            LEDGER_URL=f"sqlite:///{(self.out / f'{self.stamp}-{name}.sqlite3').resolve()}",
            **PROXY_ENV,
        )
        environ.update(env or {})
        listen = f"tcp:{port}:interface=127.0.0.1:backlog=1024"
        argv = [twistd, "-n", "--pidfile=", "zaiproxy", "--listen", listen]
        return Server(self.spawn(name, argv, self.cpus.sut, environ), port)

    def startProxy(
        self, fake: Server, name: str = "proxy", env: dict[str, str] | None = None, twistd: str = TWISTD
    ) -> Server:
        proxy = self.spawnProxy(fake, name, env, twistd)
        waitReady(proxy.child, proxy.port, "/readyz", {})
        return proxy

    def startRelay(self, fake: Server, kind: str = "agent") -> Server:
        """
        bench/minirelay.py (the raw twisted Agent relay, or one of its
        treq variants) on the SUT CPU in front of C{fake}.
        """
        port = freePort()
        argv = [PYTHON, str(BENCH / "minirelay.py"), kind, str(port), fake.url(DIRECT_PATH)]
        child = self.spawn(f"relay-{kind}", argv, self.cpus.sut)
        waitReady(child, port, "", {})
        return Server(child, port)

    def waitForQuiet(self, cpus: tuple[int, ...] | None = None, limit: float = DISTURBED) -> None:
        """
        Wait (up to the plan's C{quietWait}) until no CPU of C{cpus} (the
        SUT's and the load's, by default) is more than C{limit} busy for a
        second: on a shared machine a test suite on the proxy's CPU halves
        its throughput.
        """
        watched = cpus if cpus is not None else self.cpus.all()
        if not watched or self.plan.quietWait <= 0:
            return
        deadline = time.monotonic() + self.plan.quietWait
        waited = False
        while True:
            before = cpuTimes()
            time.sleep(1.0)
            after = cpuTimes()
            busy = max(sum(after[c]) - sum(before[c]) for c in watched)
            if busy <= limit:
                break
            if time.monotonic() > deadline:
                self.problem(f"the machine did not go quiet in {self.plan.quietWait:g} s ({busy:.0%} busy)")
                break
            if not waited:
                self.say(f"  waiting for other processes to finish (CPU {busy:.0%} busy)")
                waited = True
        self.quietWaits += waited

    def measure(
        self, label: str, url: str, connections: int, watch: dict[str, Child], load: Load
    ) -> Measurement:
        """
        Warm up, then one measured run with the CPU time of the C{watch}ed
        processes over it; a run disturbed by other processes is measured
        again (up to the plan's retries) and the quietest kept.
        """
        plan = self.plan
        for child in watch.values():
            if child.name.startswith("proxy"):
                self.expected499[child.name] += connections * (2 if plan.warmup > 0 else 1)
        self.waitForQuiet()
        if plan.warmup > 0:
            warm = runLoad(url, connections, plan.warmup, load, plan.tool, self.cpus.load)
            if warm.errors:
                self.problem(f"{label} c={connections} warm-up: {warm.errors} errors {warm.errorLines}")
        attempts: list[Measurement] = []
        for attempt in range(1 + max(0, plan.retries)):
            if attempt:
                time.sleep(5)  # other people's test runs come in bursts: let this one pass
                self.waitForQuiet()
            attempts.append(self._measureOnce(label, url, connections, watch, load))
            if attempts[-1].disturbance <= DISTURBED:
                break
            self.say(f"  {label} c={connections}: {attempts[-1].describeDisturbance()}")
        # The quietest: interference only ever makes the subject look slower.
        kept = attrs.evolve(min(attempts, key=lambda m: m.disturbance), attempts=len(attempts))
        if kept.disturbance > DISTURBED:
            self.problem(f"{label} c={connections}: {kept.describeDisturbance()} in the run kept")
        if kept.load.errors:
            self.problem(f"{label} c={connections}: {kept.load.errors} errors {kept.load.errorLines}")
        self.say(
            f"  {label:14} c={connections:<3} {kept.load.rps:8.0f} req/s  p50 {kept.load.p50 / 1e3:.3f} ms"
            f"  p99 {kept.load.p99 / 1e3:.3f} ms  errors {kept.load.errors}"
        )
        return kept

    def _measureOnce(
        self, label: str, url: str, connections: int, watch: dict[str, Child], load: Load
    ) -> Measurement:
        before = {name: cpuSeconds(child.pid) for name, child in watch.items()}
        cpusBefore = cpuTimes()
        result = runLoad(url, connections, self.plan.duration, load, self.plan.tool, self.cpus.load)
        cpusAfter = cpuTimes()
        cpu = {name: cpuSeconds(child.pid) - before[name] for name, child in watch.items()}
        seconds = max(result.seconds, 1e-9)
        sutOthers = sutSteal = loadOthers = loadSteal = 0.0
        sut, loadCpu = self.cpus.sut, self.cpus.load
        if sut is not None and loadCpu is not None:
            # What else ran on the SUT's CPU (other people's tests, the host).
            busy, sutSteal = (cpusAfter[sut][i] - cpusBefore[sut][i] for i in (0, 1))
            mine = sum(v for k, v in cpu.items() if k != "fake")
            sutOthers = max(0.0, busy - mine) / seconds
            sutSteal /= seconds
            # The load CPU runs the load, the fake and this process.
            busy, loadSteal = (cpusAfter[loadCpu][i] - cpusBefore[loadCpu][i] for i in (0, 1))
            known = result.loadCpu + cpu.get("fake", 0.0)
            loadOthers = max(0.0, busy - known) / seconds if "fake" in watch else 0.0
            loadSteal /= seconds
        return Measurement(label, connections, result, cpu, sutOthers, sutSteal, loadOthers, loadSteal)


# -- what was measured ----------------------------------------------------------


@attrs.frozen
class Measurement:
    """
    One measured load run, the CPU seconds each watched process spent over
    it, and the shares of the CPUs others took meanwhile.
    """

    label: str
    connections: int
    load: LoadResult
    cpu: dict[str, float]
    sutOthers: float = 0.0
    sutSteal: float = 0.0
    loadOthers: float = 0.0
    loadSteal: float = 0.0
    attempts: int = 1

    def cpuPerRequestUs(self, name: str) -> float:
        return self.cpu.get(name, float("nan")) / max(self.load.requests, 1) * 1e6

    def core(self, name: str) -> float:
        return self.cpu.get(name, float("nan")) / max(self.load.seconds, 1e-9)

    @property
    def disturbance(self) -> float:
        return max(self.sutOthers, self.sutSteal, self.loadOthers, self.loadSteal)

    def describeDisturbance(self) -> str:
        return (
            f"SUT CPU {self.sutOthers:.0%} other processes, {self.sutSteal:.0%} stolen; load CPU "
            f"{self.loadOthers:.0%} other processes, {self.loadSteal:.0%} stolen"
        )


@attrs.frozen
class Summary:
    """
    The medians of runs of the same target over the rounds, each figure on
    its own, with the spread of req/s and the runs themselves.
    """

    label: str
    connections: int
    rps: float
    rpsMin: float
    rpsMax: float
    p50: float
    p99: float
    cpuPerRequestUs: dict[str, float]
    core: dict[str, float]
    requests: int
    errors: int
    disturbance: float
    runs: tuple[Measurement, ...]

    @classmethod
    def of(cls, runs: list[Measurement]) -> Summary:
        first = runs[0]
        rps = [m.load.rps for m in runs]
        return cls(
            label=first.label,
            connections=first.connections,
            rps=median(rps),
            rpsMin=min(rps),
            rpsMax=max(rps),
            p50=median([m.load.p50 for m in runs]),
            p99=median([m.load.p99 for m in runs]),
            cpuPerRequestUs={k: median([m.cpuPerRequestUs(k) for m in runs]) for k in first.cpu},
            core={k: median([m.core(k) for m in runs]) for k in first.cpu},
            requests=sum(m.load.requests for m in runs),
            errors=sum(m.load.errors for m in runs),
            disturbance=max(m.disturbance for m in runs),
            runs=tuple(runs),
        )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- /proc ------------------------------------------------------------------------


def cpuSeconds(pid: int) -> float:
    """
    User + system CPU time of the whole process (all threads).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory(pid: int) -> dict[str, int]:
    """
    VmRSS and VmHWM in bytes.
    """
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value, _unit = line.split()
                out[name[:-1]] = int(value) * 1024
    return out


def cpuTimes() -> dict[int, tuple[float, float]]:
    """
    Per CPU: (busy seconds, steal seconds) since boot. Busy counts user and
    system time only: interrupts (loopback packets) are no other process.
    """
    out: dict[int, tuple[float, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                user, nice, system, steal = (int(values[i]) for i in (0, 1, 2, 7))
                out[int(name[3:])] = ((user + nice + system) / CLK_TCK, steal / CLK_TCK)
    return out


def openFds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def fdLimit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


class RssSampler:
    """
    A process's RSS every C{interval} seconds, in a thread, over a block.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), memory(self.pid)["VmRSS"]))
            except OSError:
                return
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)
