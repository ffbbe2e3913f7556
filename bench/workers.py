"""
Issue 17: what C{--workers 2} buys over C{--workers 1} on one port. Both
proxies run at once in front of the same fake, both with REDIS_URL (a
redis-server this command starts on a free loopback port, a database each),
and are measured in alternating rounds (the order flips every round) with
JSON POSTs at C{--connections}. Reported: req/s, the CPU time of all the
proxy's processes (worker 0 and its workers, from /proc) per request, the
cores they used, latency, and the share of requests worker 0 served (from
each worker's own /metrics); then the ratios 2 workers / 1 worker.

On a machine with 4 CPUs or more the proxies are pinned to two CPUs and
everything else (the fake, Redis, the load) to the others; with fewer,
nothing is pinned and the proxies share the CPUs with the load and the
fake, which the report says.

    .venv/bin/python -m bench.workers                               # ~3 minutes
    .venv/bin/python -m bench.workers --rounds 2 --duration 5 --fake nginx
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import urllib.request

import attrs
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import (
    DROP_ENV,
    PROXY_ENV,
    PROXY_PATH,
    TWISTD,
    Child,
    Cpus,
    Harness,
    cpuSeconds,
    freePort,
    median,
)
from bench.load import API_KEY, BenchError, Load, runLoad
from bench.report import footer
from bench.session import Session, commonParser


@attrs.frozen
class Proxy:
    """
    One C{twistd zaiproxy --workers N}: worker 0's process, the port, and
    the first admin port (worker K serves on it + K).
    """

    name: str
    workers: int
    child: Child
    port: int
    admin: int

    def pids(self) -> list[int]:
        """
        Worker 0 and the workers it started (its children).
        """
        found = [self.child.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == self.child.pid:
                    found.append(int(entry))
        return found

    def cpu(self) -> float:
        return sum(cpuSeconds(pid) for pid in self.pids())

    def served(self) -> list[float]:
        """
        C{zai_proxy_requests_total} of the proxied route, per worker.
        """
        counts = []
        for k in range(self.workers):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin + k}/metrics", timeout=10) as response:
                text = response.read().decode()
            counts.append(
                sum(
                    s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                    if s.name == "zai_proxy_requests_total" and s.labels.get("path") == PROXY_PATH
                )
            )
        return counts


@attrs.frozen
class Run:
    name: str
    rps: float
    cpuPerRequestUs: float
    cores: float
    p50: float
    p99: float
    errors: int
    shareOfWorker0: float


def adminPorts(count: int) -> int:
    """
    A port with the C{count - 1} after it free too.
    """
    for _ in range(100):
        first = freePort()
        try:
            for k in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", first + k))
            return first
        except OSError:
            continue
    raise BenchError("no free admin ports in a row")


def startRedis(harness: Harness, cpus: str | None) -> int:
    redis = shutil.which("redis-server")
    if redis is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = freePort()
    argv = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = harness.spawn("redis", pinned(cpus, argv), None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(100).startswith(b"+PONG"):
                    return port
        except OSError:
            time.sleep(0.05)
        if not child.alive():
            break
    raise BenchError(f"redis-server did not answer on port {port}:\n{child.tail()}")


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    return argv if cpus is None else ["taskset", "-c", cpus, *argv]


def startProxy(
    harness: Harness, session: Session, fakePort: int, workers: int, redisURL: str, cpus: str | None
) -> Proxy:
    name = f"proxy-w{workers}"
    port, admin = freePort(), adminPorts(workers)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(DROP_ENV)}
    environ.update(
        ZAI_API_KEY=API_KEY,
        ZAI_TARGET_URL=f"http://127.0.0.1:{fakePort}/api/anthropic",
        ZAI_OPENAI_TARGET_URL=f"http://127.0.0.1:{fakePort}/api/coding/paas/v4",
        LEDGER_URL=f"sqlite:///{(harness.out / f'{harness.stamp}-{name}.sqlite3').resolve()}",
        REDIS_URL=redisURL,
        **PROXY_ENV,
    )
    environ.update(session.env)
    argv = [TWISTD, "-n", "--pidfile=", "zaiproxy", "--workers", str(workers)]
    argv += ["--listen", f"tcp:{port}:interface=127.0.0.1:backlog=1024"]
    argv += ["--admin-listen", f"tcp:{admin}:interface=127.0.0.1"]
    child = harness.spawn(name, pinned(cpus, argv), None, environ)
    proxy = Proxy(name, workers, child, port, admin)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{name} exited:\n{child.tail()}")
        try:
            proxy.served()
            return proxy
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{name}: not every worker answered on its admin port:\n{child.tail()}")


def measure(harness: Harness, proxy: Proxy, connections: int, load: Load) -> Run:
    """
    Warm up, then one run with the CPU time of all the proxy's processes.
    """
    plan = harness.plan
    url = f"http://127.0.0.1:{proxy.port}{PROXY_PATH}"
    if plan.warmup > 0:
        runLoad(url, connections, plan.warmup, load, plan.tool, None)
        harness.expected499[proxy.name] += connections
    servedBefore, cpuBefore = proxy.served(), proxy.cpu()
    result = runLoad(url, connections, plan.duration, load, plan.tool, None)
    cpu, served = proxy.cpu() - cpuBefore, proxy.served()
    harness.expected499[proxy.name] += connections
    if result.errors:
        harness.problem(f"{proxy.name}: {result.errors} load errors {result.errorLines}")
    counted = [after - before for before, after in zip(servedBefore, served, strict=True)]
    run = Run(
        proxy.name,
        result.rps,
        cpu / max(result.requests, 1) * 1e6,
        cpu / max(result.seconds, 1e-9),
        result.p50,
        result.p99,
        result.errors,
        counted[0] / max(sum(counted), 1),
    )
    harness.say(
        f"  {proxy.name}: {run.rps:8.0f} req/s, {run.cpuPerRequestUs:6.0f} us CPU/request, "
        f"{run.cores:.2f} cores, p99 {run.p99 / 1e3:.2f} ms, worker 0 served {run.shareOfWorker0:.0%}"
    )
    return run


def chooseCpus() -> tuple[str | None, str | None]:
    """
    The proxies' two CPUs and everything else's, or (None, None) on fewer
    than 4 (or without taskset): then nothing is pinned.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 4 or shutil.which("taskset") is None:
        return None, None
    return f"{available[0]},{available[1]}", ",".join(str(c) for c in available[2:])


def runRounds(session: Session, connections: int) -> dict[str, list[Run]]:
    harness = session.harness
    sut, rest = chooseCpus()
    if rest is not None:
        # The fake, Redis, wrk and this process: off the proxies' CPUs.
        os.sched_setaffinity(0, {int(c) for c in rest.split(",")})
    redis = startRedis(harness, None)
    fake = harness.startFake(session.args.fake)
    proxies = [
        startProxy(harness, session, fake.port, workers, f"redis://127.0.0.1:{redis}/{workers}", sut)
        for workers in (1, 2)
    ]
    load = Load.post()
    runs: dict[str, list[Run]] = {p.name: [] for p in proxies}
    for index in range(session.args.rounds):
        harness.say(f"round {index + 1} of {session.args.rounds}:")
        for proxy in proxies if index % 2 == 0 else proxies[::-1]:
            runs[proxy.name].append(measure(harness, proxy, connections, load))
    return runs


def report(session: Session, runs: dict[str, list[Run]], connections: int) -> str:
    info = session.info()
    f, tree = info.facts, info.treeStart
    sut, _ = chooseCpus()
    pinning = f"proxies pinned to CPUs {sut}, the rest elsewhere" if sut else "nothing pinned"
    lines = [
        f"# bench.workers, {f['date']}",
        "",
        f"Command: `{info.command}` ({info.elapsed:.0f} s)",
        "",
        f"Machine: {f['nproc']} CPUs, {f['cpu']}, Linux {f['kernel']}; Python {f['python']}, "
        f"Twisted {f['twisted']}, {f['wrk']}; load average at start {f['loadavg']}. Code: commit "
        f"{tree['commit']}, uncommitted under zaiproxy/: {tree['changed']}.",
        "",
        f"Setup: {pinning}; fake `{session.args.fake}`; both proxies with REDIS_URL (shared limits), "
        f"the ledger on; {info.plan.tool}, {connections} connections, {info.plan.duration:g} s runs after "
        f"{info.plan.warmup:g} s of warm-up; medians of {session.args.rounds} rounds, order alternating.",
        "",
        "| proxy | req/s (min-max) | CPU per request | cores used | p50 | p99 | worker 0's share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    med: dict[str, dict[str, float]] = {}
    for name, each in runs.items():
        m = {
            k: median([getattr(r, k) for r in each])
            for k in ("rps", "cpuPerRequestUs", "cores", "p50", "p99")
        }
        m["share"] = median([r.shareOfWorker0 for r in each])
        med[name] = m
        rps = [r.rps for r in each]
        lines.append(
            f"| `--workers {name[-1]}` | {m['rps']:,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
            f"| {m['cpuPerRequestUs']:,.0f} us | {m['cores']:.2f} | {m['p50'] / 1e3:.2f} ms "
            f"| {m['p99'] / 1e3:.2f} ms | {m['share']:.0%} |"
        )
    one, two = med["proxy-w1"], med["proxy-w2"]
    lines += [
        "",
        f"Ratios, 2 workers / 1 worker: throughput **{two['rps'] / one['rps']:.2f}**, CPU per request "
        f"**{two['cpuPerRequestUs'] / one['cpuPerRequestUs']:.2f}**, "
        f"cores used {two['cores'] / one['cores']:.2f}.",
        "",
        *footer(info),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = commonParser("--workers 2 against --workers 1, alternating, with REDIS_URL.", 8.0, 3)
    parser.add_argument("--connections", type=int, default=32, help="load connections (32)")
    args = parser.parse_args()
    session = Session("workers", args)
    # Pinning is this command's own (two CPUs for the proxies), not the harness's one.
    session.harness.cpus = Cpus(None, None)
    session.prepare()
    session.harness.problems.clear()  # prepare's "nothing pinned" note: the report says how it was
    try:
        with session.harness:
            runs = runRounds(session, args.connections)
    except BenchError as e:
        session.harness.problem(f"aborted: {e}")
        session.write("\n".join(["# bench.workers aborted", "", *session.info().allProblems, ""]), None)
        return 1
    session.write(report(session, runs, args.connections), {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
