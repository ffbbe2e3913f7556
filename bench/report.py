"""
Markdown from measurements: every function here takes figures the
commands computed and formats them; nothing here measures or decides.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.harness import LIMITS_ENV, MIB, Summary
from bench.session import RunInfo

if TYPE_CHECKING:
    from bench.counting import CountingResults
    from bench.counting import TtfbSummary as CountingTtfb
    from bench.memory import ManyStreams, MemoryResults
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


def throughputTable(summaries: dict[str, Summary]) -> list[str]:
    """
    req/s and CPU per request of each target, by its description: C{sut}
    is the process under test (none direct to the fake).
    """
    heads = ["target", "req/s", "req/s range", "its CPU us/request", "its % of a core", "fake CPU us/request"]
    rows = [
        [
            name,
            f"{x.rps:.0f}",
            f"{x.rpsMin:.0f}-{x.rpsMax:.0f}",
            us(x.cpuPerRequestUs.get("sut")),
            share(x.core.get("sut")),
            us(x.cpuPerRequestUs.get("fake")),
        ]
        for name, x in summaries.items()
    ]
    return table(heads, rows)


def latencyTable(summaries: dict[str, Summary]) -> list[str]:
    rows = [[name, ms(x.p50), ms(x.p99), us(x.cpuPerRequestUs.get("sut"))] for name, x in summaries.items()]
    return table(["target", "p50 ms", "p99 ms", "its CPU us/request"], rows)


def relayReport(info: RunInfo, results: RelayResults) -> str:
    """
    L{bench.relay.RelayResults}: throughput at 32 connections, latency at
    one, and what the proxy adds over the fake and over the raw relay.
    """
    s = results.summaries
    text = results.targetText
    many, one = results.connections
    lines = header("zaiproxy: the relay's cost", info)
    lines += [f"Medians of {results.rounds} round(s); each round measures every target back to back.", ""]
    lines += [f"## Throughput at {many} connections", ""]
    lines += throughputTable({text[t]: per[many] for t, per in s.items()})
    lines += [""]
    for name, ratio in results.ratios.items():
        lines.append(f"- {name}: **{ratio:.2f}**")
    lines += ["", f"## Latency at {one} connection", ""]
    lines += latencyTable({text[t]: per[one] for t, per in s.items()})
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
    if results.streams is not None:
        lines += manyStreamsSection(results.streams, streamSeconds)
    if results.big:
        lines += bigStreamSection(results)
    lines += footer(info)
    return "\n".join(lines)


def manyStreamsSection(s: ManyStreams, streamSeconds: float) -> list[str]:
    perStream = (s.allRss - s.idleRss) / s.count / 1024 if s.allRss else float("nan")
    allIn = f"{s.secondsToAllStreaming:.1f} s" if s.secondsToAllStreaming is not None else "never"
    lines = [
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
    return lines


def bigStreamSection(results: MemoryResults) -> list[str]:
    lines = [f"## RSS across one large stream (`{results.bigScenario}`)", ""]
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
    return lines


# -- bench.counting -------------------------------------------------------------------

#: The issue's target: counting on keeps this share of the throughput.
TARGET_THROUGHPUT_RATIO = 0.85
MODE_TEXT = {
    "json": "JSON answer (usage reported)",
    "stream": "SSE stream, 5 deltas (usage reported)",
    "json-nousage": "JSON answer, no usage: counted",
    "stream-nousage": "SSE stream, no usage: counted",
}


def countingReport(info: RunInfo, results: CountingResults) -> str:
    lines = header("zaiproxy: the cost of token accounting", info)
    if results.control:
        lines += [
            "**Control run (--control): counting is off in both proxies; any difference is noise.**",
            "",
        ]
    if results.modes:
        lines += countingThroughput(results)
    if results.rssStart:
        start, end = results.rssStart, results.rssEnd
        lines += [
            f"Proxy RSS at the start of the first round: on {mib(start['on'])} MiB, off "
            f"{mib(start['off'])} MiB (the difference is mostly the cl100k_base encoding); at the end of the "
            f"last: on {mib(end['on'])} MiB, off {mib(end['off'])} MiB.",
            "",
        ]
    if results.ttfb is not None:
        lines += countingTtfb(results, results.ttfb)
    if results.tokens:
        lines += tokensSection(results.tokens)
    lines += footer(info)
    return "\n".join(lines)


def countingThroughput(results: CountingResults) -> list[str]:
    lines = [
        f"## Throughput and proxy CPU at {results.connections} connections",
        "",
        f"{results.rounds} rounds, new proxies every round; medians over the rounds; on/off ratios are taken "
        "round by round (the two runs of a round were back to back), median and range shown.",
        "",
    ]
    heads = ["answer", "req/s on", "req/s off", "on/off req/s (range)", "CPU us/req on", "CPU us/req off"]
    heads += ["on/off CPU (range)", "added us/req (range)", "p50 ms on / off", "p99 ms on / off"]
    rows = []
    for x in results.modes:
        rows.append(
            [
                MODE_TEXT[x.mode],
                f"{x.rps['on']:.0f}",
                f"{x.rps['off']:.0f}",
                f"{statistics.median(x.rpsRatios):.3f} ({fmtRange(x.rpsRatios, '.3f')})",
                f"{x.cpuUs['on']:.0f}",
                f"{x.cpuUs['off']:.0f}",
                f"{statistics.median(x.cpuRatios):.3f} ({fmtRange(x.cpuRatios, '.3f')})",
                f"{statistics.median(x.addedUs):+.0f} ({fmtRange(x.addedUs, '+.0f')})",
                f"{ms(x.p50['on'])} / {ms(x.p50['off'])}",
                f"{ms(x.p99['on'])} / {ms(x.p99['off'])}",
            ]
        )
    lines += table(heads, rows)
    lines += ["", f"Target: counting on keeps >= {TARGET_THROUGHPUT_RATIO} of the throughput:", ""]
    for x in results.modes:
        ratio = statistics.median(x.rpsRatios)
        lines.append(f"- {MODE_TEXT[x.mode]}: {ratio:.3f}, {verdict(ratio >= TARGET_THROUGHPUT_RATIO)}")
    cores = "; ".join(
        f"{x.mode} {share(x.core['on'])} on / {share(x.core['off'])} off" for x in results.modes
    )
    worst = max(d for x in results.modes for pair in x.disturbance for d in pair)
    lines += [
        "",
        f"Proxy share of its core (median): {cores}. Below 100%, the proxy and the fake take turns and req/s "
        "understates a CPU difference; CPU per request is the direct measure of what accounting costs. "
        f"Interference in the runs kept: up to {worst:.0%} of a CPU.",
        "",
    ]
    return lines


def countingTtfb(results: CountingResults, t: CountingTtfb) -> list[str]:
    lines = [
        "## Time to the first SSE event",
        "",
        f"Per round {results.ttfbRequests} sequential streams through each proxy, alternating request by "
        "request, each on a new connection, after 10 warm-ups each.",
        "",
    ]
    heads = ["round", "p50 ms on", "p50 ms off", "added p50 ms", "p99 ms on", "p99 ms off", "added p99 ms"]
    rows: list[list[object]] = []
    for i, x in enumerate(t.perRound):
        on, off = x["on"], x["off"]
        rows.append([i + 1, ms(on[0] * 1e6), ms(off[0] * 1e6), signedMs((on[0] - off[0]) * 1e6)])
        rows[-1] += [ms(on[1] * 1e6), ms(off[1] * 1e6), signedMs((on[1] - off[1]) * 1e6)]
    rows.append([f"all ({t.n['on']} / {t.n['off']})", ms(t.p50["on"] * 1e6), ms(t.p50["off"] * 1e6)])
    rows[-1] += [signedMs(t.added * 1e6), ms(t.p99["on"] * 1e6), ms(t.p99["off"] * 1e6)]
    rows[-1].append(signedMs((t.p99["on"] - t.p99["off"]) * 1e6))
    lines += table(heads, rows)
    lo, hi = t.addedInterval
    plo, phi = t.pairedInterval
    paired = ", ".join(f"{d * 1e3:+.3f}" for d in t.roundPaired)
    measurable = not plo <= 0 <= phi
    lines += [
        "",
        f"Added p50 with counting on: {t.added * 1e3:+.3f} ms over all streams (95% bootstrap interval "
        f"{lo * 1e3:+.3f} to {hi * 1e3:+.3f} ms). Paired (on - off of the two streams of each pair, sent "
        f"back to back), the median per round: {paired} ms; 95% t interval of their mean over the rounds "
        f"{plo * 1e3:+.3f} to {phi * 1e3:+.3f} ms.",
        "",
        f"Target: no measurable added time to the first event: {verdict(not measurable)}"
        + (" (the paired interval excludes 0)" if measurable else "")
        + ".",
        "",
    ]
    return lines


def tokensSection(k: dict[str, Any]) -> list[str]:
    c = k["corpus"]
    mix = ", ".join(f"{name} {n / c['chars']:.0%}" for name, n in c["shares"].items())
    load = k["load"]
    lines = [
        "## Tokens counted per CPU-second (in-process tiktoken)",
        "",
        f"Counter: `loadCounter({{}})` gave {load['counter']}, loaded in {load['wall'] * 1e3:.0f} ms "
        f"({load['cpu'] * 1e3:.0f} ms CPU), +{mib(load['rss'])} MiB RSS. Corpus: {c['chars']:,} characters "
        f"({c['bytes']:,} bytes UTF-8, sha256 {c['sha256']}), seeded: {mix}. CPU is `time.process_time()`; "
        "single-threaded runs pinned to the SUT CPU; medians.",
        "",
    ]

    def row(label: str, x: dict[str, Any], texts: int) -> list[object]:
        perCpu = f"{x['tokensPerCpuSecond'] / 1e6:.2f} ({x['min'] / 1e6:.2f}-{x['max'] / 1e6:.2f})"
        return [label, f"{texts:,}", f"{x['tokens']:,.0f}", perCpu, f"{x['charsPerCpuSecond'] / 1e6:.2f}"]

    rows = [
        row("one big text, `counter.count`", k["big"], 1),
        row("~20-char texts (an SSE delta), `counter.count` each", k["short"], k["short"]["texts"]),
        row(f"{k['inlineChars']}-char texts, `Counting.count` each", k["inline"], k["inline"]["texts"]),
    ]
    lines += table(["what", "texts", "tokens", "M tokens / CPU-s (range)", "M chars / CPU-s"], rows)
    lines += ["", f"A 20-character count costs {k['short']['perCallUs']:.1f} us of CPU per call.", ""]
    rows = []
    for name, label in (("threadsBig", "64 K-char texts"), ("threadsShort", "20-char texts")):
        x = k[name]
        for n, key in ((1, "one"), (2, "two")):
            y = x[key]
            speed = f"{x['speedup']:.2f}x ({fmtRange(x['speedups'], '.2f')})" if n == 2 else ""
            rows.append([f"{label}, {x['texts']:,}", n, f"{y['tokensPerWallSecond'] / 1e6:.2f}"])
            rows[-1] += [f"{y['tokensPerCpuSecond'] / 1e6:.2f}", speed]
    heads = ["texts", "threads", "M tokens / wall-s", "M tokens / CPU-s", "2 threads / 1, wall"]
    lines += ["Two long-lived threads at once against one:", "", *table(heads, rows), ""]
    return lines
