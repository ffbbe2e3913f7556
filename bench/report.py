"""
Markdown from measurements: every function here takes figures the
commands computed and formats them; nothing here measures or decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bench.harness import LIMITS_ENV, MIB, Summary
from bench.session import RunInfo

if TYPE_CHECKING:
    from bench.memory import MemoryResults
    from bench.relay import RelayResults
    from bench.streams import StreamsResults


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> list[str]:
    """
    A Markdown table; the first C{left} columns are left-aligned, the rest
    (figures) right-aligned.
    """
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def ms(us: float) -> str:
    """
    Microseconds as milliseconds.
    """
    return f"{us / 1000:.3f}"


def us(value: float | None) -> str:
    """
    Microseconds of CPU, blank where nothing was measured (direct has no
    subject process).
    """
    return "" if value is None or value != value else f"{value:.0f}"


def share(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.0%}"


def signedMs(us: float) -> str:
    return f"{us / 1000:+.3f}"


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.1f}"


def fmtRange(values: Sequence[float], fmt: str) -> str:
    return f"{format(min(values), fmt)} to {format(max(values), fmt)}" if values else "n/a"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def header(title: str, info: RunInfo) -> list[str]:
    """
    The title, the command, the machine, the code and the setup.
    """
    f, tree, end = info.facts, info.treeStart, info.treeEnd
    same = ", the same at the end" if end == tree else f"; at the end {end['commit']} / {end['digest']}"
    cpus = info.cpus
    if cpus.pinned:
        pinning = (
            f"proxy and relays pinned to CPU {cpus.sut}; the load, the fake and clients to CPU {cpus.load}"
        )
    else:
        pinning = "nothing pinned (fewer than 2 CPUs, or no taskset): CPU figures include the load's"
    plan = info.plan
    env = "".join(f", {k}={v}" for k, v in info.env.items())
    load = ""
    if plan.duration > 0:
        load = f" Load: {plan.tool}, {plan.duration:g} s runs after {plan.warmup:g} s of warm-up"
        load += ", ~1 KB POST bodies."
    return [
        f"# {title}, {f['date']}",
        "",
        f"Command: `{info.command}` ({info.elapsed:.0f} s)",
        "",
        f"Machine: {f['nproc']} CPUs, {f['cpu']}, Linux {f['kernel']}; Python {f['python']}, Twisted "
        f"{f['twisted']}, treq {f['treq']}, {f['wrk']}; load average at start {f['loadavg']}.",
        "",
        f"Code: commit {tree['commit']}; uncommitted changes under zaiproxy/: {tree['changed']} (digest "
        f"{tree['digest']}) at the start{same}.",
        "",
        f"Setup: {pinning}; loopback; proxy with LOG_LEVEL=info, "
        f"{', '.join(f'{k}={v}' for k, v in LIMITS_ENV.items())} (the rate limiter out of the way; admission "
        f"still runs){env}.{load}",
        "",
    ]


def footer(info: RunInfo) -> list[str]:
    """
    Every log read back, and the problems of the run.
    """
    lines = ["## Errors and warnings", ""]
    for log in info.logs:
        lines.append(
            f"- `{log.path.name}`: access-log statuses {log.statuses}; {len(log.bad)} warn/error lines"
        )
        lines += [f"  - `{line[:200]}`" for line in log.bad[:5]]
        if log.statuses.get("499") and not log.problems:
            lines.append(
                f"  - the {log.statuses['499']} 499s are the load closing its connections with requests in "
                f"flight as each run ends (up to {log.expected499} expected)"
            )
    lines.append("")
    problems = info.allProblems
    if problems:
        return [*lines, "Problems seen:", "", *(f"- {p}" for p in problems), ""]
    return [*lines, "No load errors, no non-2xx responses, no failed streams, no proxy warnings.", ""]


def interference(info: RunInfo, summaries: Sequence[Summary]) -> list[str]:
    worst = max((s.disturbance for s in summaries), default=0.0)
    return [
        f"Interference: other processes or the host took up to {worst:.0%} of a CPU in the runs kept (a run "
        f"above 5% is measured again, up to --retries times); the run waited for a quiet machine "
        f"{info.quietWaits} times.",
        "",
    ]


# -- bench.relay --------------------------------------------------------------------


def relayReport(info: RunInfo, results: RelayResults) -> str:
    """
    L{bench.relay.RelayResults}: throughput at 32 connections, latency at
    one, and what the proxy adds over the fake and over the raw relay.
    """
    s = results.summaries
    text = results.targetText
    many, one = results.connections
    lines = header("zaiproxy: the relay's cost", info)
    lines += [f"Medians of {results.rounds} rounds; each round measures every target back to back.", ""]
    lines += [f"## Throughput at {many} connections", ""]
    rows = [
        [
            text[t],
            f"{s[t][many].rps:.0f}",
            f"{s[t][many].rpsMin:.0f}-{s[t][many].rpsMax:.0f}",
            us(s[t][many].cpuPerRequestUs.get("sut")),
            share(s[t][many].core.get("sut")),
            us(s[t][many].cpuPerRequestUs["fake"]),
        ]
        for t in s
    ]
    heads = ["target", "req/s", "req/s range", "its CPU us/request", "its % of a core", "fake CPU us/request"]
    lines += table(heads, rows)
    lines += [""]
    for name, ratio in results.ratios.items():
        lines.append(f"- {name}: **{ratio:.2f}**")
    lines += ["", f"## Latency at {one} connection", ""]
    rows = [
        [
            text[t],
            ms(s[t][one].p50),
            ms(s[t][one].p99),
            us(s[t][one].cpuPerRequestUs.get("sut")),
        ]
        for t in s
    ]
    lines += table(["target", "p50 ms", "p99 ms", "its CPU us/request"], rows)
    lines += ["", "Added at 1 connection (medians of the rounds' figures, subtracted):", ""]
    rows = [[name, signedMs(p50), signedMs(p99)] for name, (p50, p99) in results.added.items()]
    lines += table(["", "added p50 ms", "added p99 ms"], rows)
    lines += [""]
    lines += interference(info, [x for per in s.values() for x in per.values()])
    lines += footer(info)
    return "\n".join(lines)


# -- bench.streams ------------------------------------------------------------------


def streamsReport(info: RunInfo, results: StreamsResults) -> str:
    lines = header("zaiproxy: time to the first SSE event", info)
    lines += [
        f"Scenario `{results.scenario}`; {results.requests} sequential streams per target, each on a new "
        "connection, the targets alternating request by request, after 20 warm-ups each; time from sending "
        "the request to the first `event:` bytes.",
        "",
    ]
    rows = [
        [t.text, t.n, ms(t.p50 * 1e6), ms(t.p99 * 1e6), ms(t.mean * 1e6), t.failed] for t in results.targets
    ]
    lines += table(["target", "streams", "p50 ms", "p99 ms", "mean ms", "failed"], rows)
    lines += [""]
    rows = [[name, signedMs(p50 * 1e6), signedMs(p99 * 1e6)] for name, (p50, p99) in results.added.items()]
    lines += table(["", "added p50 ms", "added p99 ms"], rows)
    lines += ["", *footer(info)]
    return "\n".join(lines)


# -- bench.memory -------------------------------------------------------------------

#: Targets from the brief the proxy was built to.
TARGET_STREAMS_RSS_MB = 150.0
TARGET_FLAT_MB = 20.0


def memoryReport(info: RunInfo, results: MemoryResults, streamSeconds: float) -> str:
    lines = header("zaiproxy: memory under streams", info)
    s = results.streams
    if s is not None:
        perStream = (s.allRss - s.idleRss) / s.count / 1024 if s.allRss else float("nan")
        allIn = f"{s.secondsToAllStreaming:.1f} s" if s.secondsToAllStreaming is not None else "never"
        lines += [
            f"## RSS with {s.count} concurrent slow streams",
            "",
            f"Scenario `{s.scenario}` (about {streamSeconds:g} s each), opened 100 at a time; all streaming "
            f"after {allIn}; {s.fdsAll} open fds in the proxy then (limit {s.fdLimit}).",
            "",
        ]
        heads = ["idle RSS MiB", "all streaming MiB", "peak MiB", "per stream KiB", "after MiB", "completed"]
        row = [
            mib(s.idleRss),
            mib(s.allRss),
            mib(s.peak),
            f"{perStream:.1f}",
            mib(s.afterRss),
            f"{s.ok} / {s.count}",
        ]
        lines += table(heads, [row], left=0)
        ok = s.peak < TARGET_STREAMS_RSS_MB * 1e6 and s.ok == s.count
        lines += [
            "",
            f"Target: RSS < {TARGET_STREAMS_RSS_MB:g} MB with {s.count} streams, all complete: peak "
            f"{s.peak / 1e6:.1f} MB, {verdict(ok)}.",
            "",
        ]
    if results.big:
        lines += [f"## RSS across one large stream (`{results.bigScenario}`)", ""]
        heads = [
            "reader",
            "MB",
            "MB/s",
            "RSS before MiB",
            "max during MiB",
            "after MiB",
            "growth MiB",
            "proxy CPU s",
        ]
        rows = []
        for x in results.big:
            growth = x.rssPeak - x.rssBefore if x.rssPeak is not None and x.rssBefore is not None else None
            cpu = "" if x.proxyCpu is None else f"{x.proxyCpu:.2f}"
            rows.append([x.reader, f"{x.bytes / 1e6:.1f}", f"{x.mbps:.1f}", mib(x.rssBefore), mib(x.rssPeak)])
            rows[-1] += [mib(x.rssAfter), mib(growth), cpu]
        lines += table(heads, rows)
        growths = [
            x.rssPeak - x.rssBefore for x in results.big if x.rssPeak is not None and x.rssBefore is not None
        ]
        worst = max(growths, default=0)
        lines += [
            "",
            f"RSS sampled every 100 ms. Target: flat (max during - before < {TARGET_FLAT_MB:g} MB): "
            f"{worst / 1e6:.1f} MB, {verdict(worst < TARGET_FLAT_MB * 1e6)}.",
            "",
        ]
    lines += footer(info)
    return "\n".join(lines)
