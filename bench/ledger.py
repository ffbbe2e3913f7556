"""
The usage ledger's costs, measured:

* C{--part rows}: 10 million synthetic requests over 30 days written
  through the ledger's own store (the rows and their minute and hour
  rollups, in batches, as the writer thread commits them), then
  C{/api/usage}'s questions timed on a read-only connection, as the API's
  reader threads ask them; and the file's size, per row, with what a year
  at 100,000 requests a day comes to under the default retentions.
* C{--part relay}: the relay's throughput with the ledger off, on, and on
  with 20 dashboards following C{/api/events}, in the same rounds (order
  rotated each round), as ratios.

    .venv/bin/python -m bench.ledger                         # both, ~10 minutes
    .venv/bin/python -m bench.ledger --part rows --rows 1000000
    .venv/bin/python -m bench.ledger --part relay --rounds 3 --duration 5 --fake nginx
    .venv/bin/python -m bench.ledger --throughput --fake nginx   # the same as --part relay
"""

from __future__ import annotations

import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from bench.harness import PROXY_PATH, PYTHON, Harness, Summary
from bench.load import BenchError, Load
from bench.session import Session, commonParser
from zaiproxy.dialects import Dialect
from zaiproxy.dialects.usage import Usage
from zaiproxy.ledger import reports
from zaiproxy.ledger.queries import RequestsQuery, UsageQuery
from zaiproxy.ledger.rows import Origin
from zaiproxy.ledger.store import Retention, SQLiteStore
from zaiproxy.observe.record import Billed, Record

DAY = 86400
#: The API's questions over the synthetic month, by name.
QUESTIONS: dict[str, Callable[[float], Any]] = {
    "30 days, totals": lambda now: UsageQuery(now - 30 * DAY, now),
    "30 days by client": lambda now: UsageQuery(now - 30 * DAY, now, ("client",)),
    "30 days by model": lambda now: UsageQuery(now - 30 * DAY, now, ("model",)),
    "30 days by client and day": lambda now: UsageQuery(now - 30 * DAY, now, ("client", "day")),
    "7 days by client and hour": lambda now: UsageQuery(now - 7 * DAY, now, ("client", "hour")),
    "24 hours by model": lambda now: UsageQuery(now - DAY, now, ("model",)),
    "1 hour by client (request rows)": lambda now: UsageQuery(now - 3600, now, ("client",)),
    "newest 50 requests": lambda now: RequestsQuery(now - DAY, now),
}
CLIENTS = [f"user-{i:02d}" for i in range(10)]
MODELS = ["glm-4.7", "glm-4.6", "glm-4.5-air", "glm-4.5"]
ROUTES = ["/v1/messages", "/v1/chat/completions"]
#: The default retentions (LEDGER_*_RETENTION), in days.
RETENTION_DAYS = {"requests": 30, "usage_minute": 8, "gauges_minute": 8, "usage_hour": 400}


# -- part 1: rows ----------------------------------------------------------------


def synthetic(offset: int, count: int, total: int, end: float) -> list[Record]:
    """
    Requests C{offset} to C{offset + count} of C{total} spread evenly, in
    time order, over the 30 days before C{end}.
    """
    rng = random.Random(offset)
    step = 30 * DAY / total
    records = []
    for i in range(offset, offset + count):
        status = 200 if rng.random() < 0.97 else rng.choice((429, 500, 499))
        usage = Usage(rng.randint(2_000, 60_000), rng.randint(50, 4_000), rng.randint(0, 30_000), 0)
        costs = {"input": usage.input * 6e-7, "output": usage.output * 2.2e-6}
        billed = Billed(usage, "reported", "m", None, "off_peak", costs) if status == 200 else None
        records.append(
            Record(
                method="POST",
                route=rng.choice(ROUTES),
                status=status,
                startedAt=end - 30 * DAY + i * step,
                duration=rng.expovariate(1 / 8.0),
                ttfb=0.4,
                requestBytes=rng.randint(2_000, 200_000),
                responseBytes=rng.randint(500, 30_000),
                dialect=Dialect.anthropic,
                model=rng.choice(MODELS),
                client="10.0.0.7",
                keyName=rng.choice(CLIENTS),
                requestId=f"{i:016x}",
                stream=True,
                attempts=1,
                billed=billed,
            )
        )
    return records


@attrs.frozen
class RowsResults:
    rows: int
    #: The same questions as HTTP GETs of a proxy on that file: median, worst (ms).
    http: dict[str, tuple[float, float]]
    writeSeconds: float
    rowsPerSecond: float
    fileBytes: int
    tableBytes: dict[str, int]
    tableRows: dict[str, int]
    #: Each question's median and worst of five, in ms, and its resolution.
    questions: dict[str, tuple[float, float, str]]
    yearBytes: int
    yearFormula: str
    #: Rows past the default retentions deleted before the proxy started, and how long it took.
    pruned: int
    pruneSeconds: float


def writeRows(path: Path, total: int, batch: int, say: Callable[[str], None]) -> float:
    store = SQLiteStore(str(path))
    store.open()
    end = time.time()
    started = time.monotonic()
    origin = Origin("production", "bench")
    written = 0
    while written < total:
        # A chunk at a time: 10 million records never sit in memory at once.
        records = synthetic(written, min(200_000, total - written), total, end)
        for start in range(0, len(records), batch):
            store.write(records[start : start + batch], [], origin)
        written += len(records)
        say(f"  {written:,} rows written ({written / (time.monotonic() - started):,.0f} rows/s)")
    seconds = time.monotonic() - started
    store.close()
    return seconds


def tableSizes(connection: sqlite3.Connection) -> dict[str, int]:
    """
    Bytes per table, its indexes counted with it (SQLite's dbstat table).
    """
    sizes: dict[str, int] = {}
    tables = {name: table for name, table in connection.execute("SELECT name, tbl_name FROM sqlite_master")}
    for name, size in connection.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
        table = tables.get(name, name)
        sizes[table] = sizes.get(table, 0) + size
    return sizes


def askAll(store: SQLiteStore, now: float) -> dict[str, tuple[float, float, str]]:
    timed: dict[str, tuple[float, float, str]] = {}
    for name, make in QUESTIONS.items():
        question = make(now)
        times = []
        resolution = "request"
        for _ in range(5):
            connection = store.reader()
            started = time.perf_counter()
            if isinstance(question, UsageQuery):
                resolution = reports.usage(connection, question)["resolution"]
            else:
                reports.requests(connection, question)
            times.append((time.perf_counter() - started) * 1000)
            connection.close()
        timed[name] = (statistics.median(times), max(times), resolution)
    return timed


def yearAt100k(sizes: dict[str, int], counts: dict[str, int], days: float) -> tuple[int, str]:
    """
    The steady size of a ledger that takes 100,000 requests a day, under
    the default retentions: request rows scale with requests; rollup rows
    with time (their keys per bucket measured here, where the synthetic
    traffic fills every minute).
    """
    perRow = sizes["requests"] / counts["requests"]
    minuteRows = counts["usage_minute"] / days
    minuteBytes = sizes["usage_minute"] / max(counts["usage_minute"], 1)
    hourRows = counts["usage_hour"] / days
    hourBytes = sizes["usage_hour"] / max(counts["usage_hour"], 1)
    total = (
        100_000 * RETENTION_DAYS["requests"] * perRow
        + minuteRows * RETENTION_DAYS["usage_minute"] * minuteBytes
        + hourRows * RETENTION_DAYS["usage_hour"] * hourBytes
    )
    formula = (
        f"100,000/day x 30 days x {perRow:.0f} B per request row"
        f" + {minuteRows:,.0f} minute rows/day x 8 days x {minuteBytes:.0f} B"
        f" + {hourRows:,.0f} hour rows/day x 400 days x {hourBytes:.0f} B"
    )
    return int(total), formula


def measureRows(total: int, harness: Harness, folder: Path) -> RowsResults:
    say = harness.say
    path = folder / "ledger.sqlite3"
    say(f"writing {total:,} synthetic requests over 30 days to {path}")
    seconds = writeRows(path, total, 500, say)
    store = SQLiteStore(str(path))
    connection = store.reader()
    sizes = tableSizes(connection)
    counts = {
        table: connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in ("requests", "usage_minute", "usage_hour")
    }
    connection.close()
    say("asking /api/usage's questions, five times each")
    questions = askAll(store, time.time())
    fileBytes = sum(p.stat().st_size for p in folder.glob("ledger.sqlite3*"))
    yearBytes, formula = yearAt100k(sizes, counts, 30.0)
    # The proxy's writer prunes when it starts, in one transaction (minute
    # rollups past 8 days: millions of rows here), which would run beside
    # the HTTP questions: done first, and timed.
    say("pruning to the default retentions, as the proxy's writer does when it starts")
    pruned, pruneSeconds = pruneToDefaults(path)
    say("asking a proxy on that file over HTTP, five times each")
    http = askOverHTTP(harness, path, time.time())
    return RowsResults(
        total,
        http,
        seconds,
        total / seconds,
        fileBytes,
        sizes,
        counts,
        questions,
        yearBytes,
        formula,
        pruned,
        pruneSeconds,
    )


def pruneToDefaults(path: Path) -> tuple[int, float]:
    """
    SQLiteStore.prune at the default retentions: the rows deleted, and
    the seconds it took.
    """
    store = SQLiteStore(str(path))
    store.open()
    retention = Retention(
        RETENTION_DAYS["requests"] * DAY,
        RETENTION_DAYS["usage_minute"] * DAY,
        RETENTION_DAYS["usage_hour"] * DAY,
    )
    started = time.monotonic()
    deleted = store.prune(time.time(), retention)
    seconds = time.monotonic() - started
    store.close()
    return deleted, seconds


#: The HTTP questions: /api/usage's, as a script or the dashboard asks them.
HTTP_QUESTIONS = {
    "GET /api/usage (30 days)": "/api/usage?from={month}",
    "GET /api/usage?group_by=client (30 days)": "/api/usage?from={month}&group_by=client",
    "GET /api/usage?group_by=client,day (30 days)": "/api/usage?from={month}&group_by=client,day",
    "GET /api/usage?group_by=model (24 hours)": "/api/usage?group_by=model",
    "GET /api/metrics?range=30d": "/api/metrics?range=30d",
    "GET /api/requests?limit=50": "/api/requests?limit=50",
}


def askOverHTTP(harness: Harness, path: Path, now: float) -> dict[str, tuple[float, float]]:
    """
    The API's answers from a real proxy on the synthetic ledger.
    """
    fake = harness.startFake("quiet")
    proxy = harness.startProxy(fake, "ledger-10m", {"LEDGER_URL": f"sqlite:///{path}"})
    timed = {}
    for name, template in HTTP_QUESTIONS.items():
        url = proxy.url(template.format(month=int(now - 30 * DAY)))
        times = []
        for _ in range(5):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as answer:
                answer.read()
            times.append((time.perf_counter() - started) * 1000)
        timed[name] = (statistics.median(times), max(times))
    harness.stopAll()
    return timed


def rowsReport(results: RowsResults) -> list[str]:
    lines = [
        f"{results.rows:,} requests over 30 days written in {results.writeSeconds:,.0f} s "
        f"({results.rowsPerSecond:,.0f} rows/s, batches of 500 through SQLiteStore.write); "
        f"the file is {results.fileBytes / 2**20:,.0f} MiB.",
        "",
        "| question (reports.usage on a read-only connection) | read from | median of 5 | worst |",
        "|---|---|---:|---:|",
    ]
    for name, (median, worst, resolution) in results.questions.items():
        lines.append(f"| {name} | {resolution} rows | {median:,.1f} ms | {worst:,.1f} ms |")
    lines += [
        "",
        f"Then pruned to the default retentions (as the proxy's writer does when it starts): "
        f"{results.pruned:,} rows deleted in {results.pruneSeconds:,.1f} s, one transaction.",
        "",
        "| over HTTP, from a proxy on that file | median of 5 | worst |",
        "|---|---:|---:|",
    ]
    for name, (median, worst) in results.http.items():
        lines.append(f"| {name} | {median:,.1f} ms | {worst:,.1f} ms |")
    lines += ["", "| table (with its indexes) | rows | MiB | bytes per row |", "|---|---:|---:|---:|"]
    for table, count in results.tableRows.items():
        size = results.tableBytes.get(table, 0)
        lines.append(f"| {table} | {count:,} | {size / 2**20:,.1f} | {size / max(count, 1):,.0f} |")
    lines += [
        "",
        f"A year at 100,000 requests a day, default retentions: about "
        f"{results.yearBytes / 2**30:,.2f} GiB, steady ({results.yearFormula}).",
    ]
    return lines


# -- part 2: the relay with the ledger and dashboards -------------------------------

#: Follows /api/events on N connections, reading every byte; on SIGTERM it
#: prints how many metrics frames the stream that got fewest received.
DASHBOARDS = """
import signal, socket, sys, selectors
port, count = int(sys.argv[1]), int(sys.argv[2])
chooser = selectors.DefaultSelector()
frames = {}
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /api/events HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n")
    chooser.register(s, selectors.EVENT_READ)
    frames[s] = 0
def done(*_):
    print(f"dashboards: {len(frames)} streams, fewest metrics frames {min(frames.values())}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    for key, _ in chooser.select():
        data = key.fileobj.recv(65536)
        if not data:
            sys.exit("a dashboard stream ended")
        frames[key.fileobj] += data.count(b'"type":"metrics"')
"""


@attrs.frozen
class RelayResults:
    rounds: int
    connections: int
    summaries: dict[str, Summary]
    ratios: dict[str, float]
    #: The metrics frames the dashboard that got fewest received, and over how long.
    dashboardFrames: int
    dashboardSeconds: float


TARGETS = {
    "ledger-off": "ledger off (LEDGER_ENABLED=false)",
    "ledger-on": "ledger on (the default)",
    "dashboards-20": "ledger on, 20 dashboards following /api/events every second",
}


def measureRelay(session: Session, connections: int) -> RelayResults:
    harness: Harness = session.harness
    fake = harness.startFake(session.args.fake)
    base = {**session.env, "DASHBOARD_INTERVAL": "1s"}
    proxies = {
        "ledger-off": harness.startProxy(fake, "ledger-off", {**base, "LEDGER_ENABLED": "false"}),
        "ledger-on": harness.startProxy(fake, "ledger-on", base),
        "dashboards-20": harness.startProxy(fake, "dashboards-20", base),
    }
    viewers = harness.spawn(
        "dashboards", [PYTHON, "-c", DASHBOARDS, str(proxies["dashboards-20"].port), "20"], harness.cpus.load
    )
    followed = time.monotonic()
    time.sleep(1.0)
    if not viewers.alive():
        raise BenchError("the 20 dashboards could not connect")
    load = Load.post()
    runs: dict[str, list[Any]] = {name: [] for name in proxies}
    names = list(proxies)
    for index in range(session.args.rounds):
        harness.say(f"round {index + 1} of {session.args.rounds}:")
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            proxy = proxies[name]
            watch = {"sut": proxy.child, "fake": fake.child}
            runs[name].append(harness.measure(name, proxy.url(PROXY_PATH), connections, watch, load))
            # wrk's end-of-run disconnects (warm-up and run), logged as 499s:
            # the harness counts them only for proxies named proxy*.
            warmups = 1 if harness.plan.warmup > 0 else 0
            harness.expected499[name] += connections * (runs[name][-1].attempts + warmups)
    if not viewers.alive():
        raise BenchError("a dashboard stream ended during the run")
    harness.stop(viewers)
    seconds = time.monotonic() - followed
    frames = dashboardFrames(viewers.logPath)
    if frames < seconds / 2:
        harness.problem(
            f"a dashboard received {frames} metrics frames in {seconds:.0f} s (one a second expected)"
        )
    summaries = {name: Summary.of(each) for name, each in runs.items()}

    def ratio(a: str, b: str) -> float:
        return summaries[a].rps / summaries[b].rps

    def cpu(a: str, b: str) -> float:
        return summaries[a].cpuPerRequestUs["sut"] / summaries[b].cpuPerRequestUs["sut"]

    ratios = {
        "ledger on / off, req/s": ratio("ledger-on", "ledger-off"),
        "ledger on / off, CPU per request": cpu("ledger-on", "ledger-off"),
        "20 dashboards / none, req/s": ratio("dashboards-20", "ledger-on"),
        "20 dashboards / none, CPU per request": cpu("dashboards-20", "ledger-on"),
    }
    return RelayResults(session.args.rounds, connections, summaries, ratios, frames, seconds)


def dashboardFrames(log: Path) -> int:
    """
    The fewest metrics frames one of the dashboards received, from the
    line their process prints when stopped (0 if it printed none).
    """
    found = re.findall(r"fewest metrics frames (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def relayReport(results: RelayResults) -> list[str]:
    lines = [
        f"JSON POSTs at {results.connections} connections, medians of {results.rounds} rounds "
        "(order rotated each round):",
        "",
        "| proxy | req/s (min-max) | CPU per request | p50 | p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, summary in results.summaries.items():
        lines.append(
            f"| {TARGETS[name]} | {summary.rps:,.0f} ({summary.rpsMin:,.0f}-{summary.rpsMax:,.0f}) "
            f"| {summary.cpuPerRequestUs['sut']:,.0f} us "
            f"| {summary.p50 / 1e3:.3f} ms | {summary.p99 / 1e3:.3f} ms |"
        )
    lines += ["", "| ratio | measured | target |", "|---|---:|---|"]
    targets = {
        "ledger on / off, req/s": "at least 0.9",
        "20 dashboards / none, req/s": "at least 0.95 (under 5% cost)",
    }
    for name, value in results.ratios.items():
        lines.append(f"| {name} | {value:.3f} | {targets.get(name, '')} |")
    lines += [
        "",
        f"Each of the 20 dashboards received at least {results.dashboardFrames:,} metrics frames "
        f"in {results.dashboardSeconds:,.0f} s.",
    ]
    return lines


def main() -> int:
    parser = commonParser("The usage ledger's costs: 10M rows answered, disk, and the relay with it.", 5.0, 3)
    parser.add_argument("--part", choices=("rows", "relay", "all"), default="all")
    parser.add_argument("--throughput", action="store_true", help="the relay part alone (--part relay)")
    parser.add_argument("--rows", type=int, default=10_000_000, help="synthetic requests (10,000,000)")
    parser.add_argument("--connections", type=int, default=32, help="load connections (32)")
    args = parser.parse_args()
    if args.throughput:
        args.part = "relay"
    session = Session("ledger", args)
    session.prepare()
    lines = ["# bench.ledger", "", f"    {session.command}", ""]
    data: dict[str, Any] = {}
    if args.part in ("rows", "all"):
        with tempfile.TemporaryDirectory(prefix="ledger-bench-") as folder, session.harness:
            rows = measureRows(args.rows, session.harness, Path(folder))
        lines += ["## 10 million rows", "", *rowsReport(rows), ""]
        data["rows"] = rows
    if args.part in ("relay", "all"):
        try:
            with session.harness:
                relay = measureRelay(session, args.connections)
        except BenchError as e:
            session.harness.problem(f"aborted: {e}")
            return 1
        lines += ["## The relay with the ledger and dashboards", "", *relayReport(relay), ""]
        data["relay"] = relay
    info = session.info()
    lines += [f"Machine: {info.facts}", "", *(f"- {p}" for p in info.allProblems)]
    session.write("\n".join(lines) + "\n", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
