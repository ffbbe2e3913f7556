"""
Does treq cost ~0.2 ms a request on the relay path? zaiproxy forwards on a
plain twisted L{Agent} over a persistent pool rather than through
L{treq.client.HTTPClient} (see zaiproxy/relay/upstream.py) on the strength of that
claim; this measures it instead of taking it on trust.

Two minimal relays (bench/minirelay.py) that differ only in their HTTP
client run in turn on CPU 0 in front of the fake Z.AI (CPU 1), driven by
wrk on CPU 1 with the same ~1 KB JSON POSTs as bench.relay:

- C{agent}: plain L{Agent} + L{HTTPConnectionPool};
- C{treq}: C{HTTPClient(Agent(pool))}, C{unbuffered=True,
  allow_redirects=False}, same body producer: treq's URL handling, cookie
  agent and content decoder are the whole difference;
- C{treq-bytes}: the same, with the body given to treq as bytes (how treq is
  usually called), adding treq's FileBodyProducer;
- C{cookie}, C{decoder}: the plain agent under just one of treq's layers
  (CookieAgent, ContentDecoderAgent), to see which layer costs what.

Each relay is first measured alone, as bench.relay does: req/s at 32
connections, p50 at 1 connection, and its CPU time per request (from /proc).
On this shared VM the machine's speed drifts by 10-20% within minutes,
which is as much as the difference sought, so the cost of each layer is
then measured paired: the agent relay and one variant loaded at the same
time by two wrk processes, both relays sharing CPU 0, and each one's CPU
per request read over the same seconds. Whatever slows the core slows both.

    .venv/bin/python -m bench.layers                   # ~5 minutes
    .venv/bin/python -m bench.layers --rounds 1 --variants agent,treq
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import DIRECT_PATH, Harness, Measurement, Server, cpuSeconds
from bench.load import BenchError, Load, startWrk, wrkResult, wrkScript
from bench.session import Session, commonParser

VARIANTS = ("agent", "treq", "treq-bytes", "cookie", "decoder")

#: The perf-baselines reference: the 40-line relays, CPU per request at 32 connections.
REFERENCE_US = {"agent": 513, "treq": 726}

Solo = dict[str, list[dict[int, Measurement]]]
Pairs = dict[str, list[tuple[float, float, float, float]]]


def pairedRun(
    harness: Harness, agent: Server, other: Server, connections: int, script: Path
) -> tuple[float, float, float, float]:
    """
    Load both relays at once; return each one's CPU us per request and
    req/s, over the same wall-clock window.
    """
    plan, cpu = harness.plan, harness.cpus.load
    urls = [agent.url("/"), other.url("/")]
    harness.waitForQuiet()
    for proc in [startWrk(url, connections, plan.warmup, script, cpu) for url in urls]:
        wrkResult(proc, plan.warmup + 60)
    before = [cpuSeconds(s.child.pid) for s in (agent, other)]
    procs = [startWrk(url, connections, plan.duration, script, cpu) for url in urls]
    results = [wrkResult(proc, plan.duration + 60) for proc in procs]
    spent = [cpuSeconds(s.child.pid) - b for s, b in zip((agent, other), before, strict=True)]
    for result in results:
        if result.errors:
            harness.problem(f"paired run: {result.errors} wrk errors {result.errorLines}")
    perRequest = [c / max(r.requests, 1) * 1e6 for c, r in zip(spent, results, strict=True)]
    harness.say(
        f"  agent {perRequest[0]:5.0f} us/req {results[0].rps:5.0f} req/s | "
        f"other {perRequest[1]:5.0f} us/req {results[1].rps:5.0f} req/s | "
        f"difference {perRequest[1] - perRequest[0]:+.0f} us"
    )
    return perRequest[0], perRequest[1], results[0].rps, results[1].rps


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measureLayers(session: Session, variants: list[str]) -> tuple[Solo, Pairs]:
    """
    Every relay up at once (an idle one costs nothing), so a round is just
    load runs back to back; then each variant paired with the agent.
    """
    args, harness = session.args, session.harness
    fake = harness.startFake()
    relays = {kind: harness.startRelay(fake, kind) for kind in variants}
    targets = {"direct": (fake.url(DIRECT_PATH), {"fake": fake.child})}
    for kind, relay in relays.items():
        targets[kind] = (relay.url("/"), {"relay": relay.child, "fake": fake.child})
    results: Solo = {kind: [] for kind in targets}
    order = list(targets)
    load = Load.post()
    for index in range(args.rounds):
        harness.say(f"round {index + 1} of {args.rounds}:")
        shift = index % len(order)  # no variant always runs first or last
        for kind in order[shift:] + order[:shift]:
            url, watch = targets[kind]
            results[kind].append({c: harness.measure(kind, url, c, watch, load) for c in (32, 1)})
    pairs: Pairs = {kind: [] for kind in variants if kind != "agent"}
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(wrkScript(load))
        for kind in pairs:
            harness.say(f"paired: agent and {kind} at once, {args.pairs} runs:")
            for _ in range(args.pairs):
                pairs[kind].append(
                    pairedRun(harness, relays["agent"], relays[kind], args.pair_connections, script)
                )
    return results, pairs


def soloTable(results: Solo, variants: list[str]) -> list[str]:
    def med(kind: str, c: int, key: str) -> float:
        if key == "relayCpu":
            return median([r[c].cpuPerRequestUs("relay") for r in results[kind]])
        if key == "relayCore":
            return median([r[c].core("relay") for r in results[kind]])
        return median([getattr(r[c].load, key) for r in results[kind]])

    lines = [
        "| client | req/s, 32 conns | relay CPU us/req, 32 conns | relay % of core | p50 ms, 1 conn | p99 "
        "ms, 1 conn | relay CPU us/req, 1 conn |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| direct to the fake | {med('direct', 32, 'rps'):.0f} | | | {med('direct', 1, 'p50') / 1000:.3f} | "
        f"{med('direct', 1, 'p99') / 1000:.3f} | |",
    ]
    for kind in variants:
        lines.append(
            f"| {kind} | {med(kind, 32, 'rps'):.0f} | {med(kind, 32, 'relayCpu'):.0f} | "
            f"{med(kind, 32, 'relayCore') * 100:.0f}% | {med(kind, 1, 'p50') / 1000:.3f} | "
            f"{med(kind, 1, 'p99') / 1000:.3f} | {med(kind, 1, 'relayCpu'):.0f} |"
        )
    return lines


def differences(results: Solo, variants: list[str]) -> tuple[list[str], list[str]]:
    """
    Each variant against the plain agent, round by round.
    """

    def paired(kind: str, c: int, value: str) -> list[float]:
        def get(m: Measurement) -> float:
            return m.cpuPerRequestUs("relay") if value == "cpu" else m.load.p50

        return sorted(get(r[c]) - get(a[c]) for r, a in zip(results[kind], results["agent"], strict=True))

    def spread(values: list[float]) -> str:
        rounds = f" (rounds {values[0]:+.0f} to {values[-1]:+.0f})" if len(values) > 1 else ""
        return f"{median(values):+.0f} us{rounds}"

    lines: list[str] = []
    verdicts: list[str] = []
    for kind in variants:
        if kind == "agent":
            continue
        cpu32 = paired(kind, 32, "cpu")
        slower = median(
            [a[32].load.rps / r[32].load.rps for r, a in zip(results[kind], results["agent"], strict=True)]
        )
        lines.append(
            f"- {kind}: CPU {spread(cpu32)} a request at 32 connections, {spread(paired(kind, 1, 'cpu'))} at "
            f"1 connection; p50 at 1 connection {spread(paired(kind, 1, 'p50'))}; throughput at 32 "
            f"connections {slower:.2f}x lower."
        )
        verdicts.append(f"{kind} {median(cpu32):+.0f} us")
    return lines, verdicts


def pairsTable(pairs: Pairs) -> tuple[list[str], list[str]]:
    lines = [
        "| variant | agent CPU us/req | variant CPU us/req | difference us/req (median) | runs: min to max "
        "| variant/agent req/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for kind, runs in pairs.items():
        if not runs:
            continue
        diffs = sorted(b - a for a, b, _, _ in runs)
        lines.append(
            f"| {kind} | {median([a for a, _, _, _ in runs]):.0f} | "
            f"{median([b for _, b, _, _ in runs]):.0f} | {median(diffs):+.0f} | {diffs[0]:+.0f} to "
            f"{diffs[-1]:+.0f} | {median([rb / ra for _, _, ra, rb in runs]):.2f} |"
        )
        verdicts.append(f"{kind} {median(diffs):+.0f} us")
    return lines, verdicts


def render(session: Session, results: Solo, pairs: Pairs, variants: list[str]) -> str:
    args, info = session.args, session.info()
    facts, cpus = info.facts, info.cpus
    diffLines, verdicts = differences(results, variants)
    pairLines, pairedVerdicts = pairsTable(pairs)
    errors = sum(r[c].load.errors for runs in results.values() for r in runs for c in (1, 32))
    lines = [
        f"## treq layers on a minimal relay, {facts['date']}",
        "",
        f"Command: `{info.command}` ({info.elapsed:.0f} s; {args.rounds} round(s); wrk {args.duration:g} s "
        f"after {args.warmup:g} s warm-up).",
        "",
        f"Machine: {facts['nproc']} CPUs, {facts['cpu']}; Python {facts['python']}, Twisted "
        f"{facts['twisted']}, treq {facts['treq']}; relays on CPU {cpus.sut}, fake (bench/fakeserver.py) and "
        f"wrk on CPU {cpus.load}.",
        "",
        *soloTable(results, variants),
        "",
        "Cost per request relative to the plain Agent (median of the per-round differences):",
        "",
        *diffLines,
        "",
        f"Paired (both relays loaded at once by two wrk processes, {args.pair_connections} connections each, "
        f"sharing CPU {cpus.sut}; {args.pairs} runs of {args.duration:g} s per variant):",
        "",
        *pairLines,
        "",
        f"Reference (perf-baselines, same kind of relays): agent {REFERENCE_US['agent']} us, treq "
        f"{REFERENCE_US['treq']} us CPU/request, a {REFERENCE_US['treq'] - REFERENCE_US['agent']} us "
        "difference. relay/upstream.py says 0.2 ms; measured here: solo runs (CPU at 32 connections) "
        f"{', '.join(verdicts)}; paired runs {', '.join(pairedVerdicts) or 'not run'}.",
        "",
        f"wrk errors across all runs (socket errors + non-2xx): {errors}."
        + ("" if not info.allProblems else " Problems: " + "; ".join(info.allProblems)),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = commonParser("Measure treq's layers on a minimal relay.", duration=5.0, rounds=2)
    add = parser.add_argument
    add("--pairs", type=int, default=4, help="paired runs per variant against the agent (4)")
    add("--pair-connections", type=int, default=16, help="connections per relay in a paired run (16)")
    add("--variants", default=",".join(VARIANTS))
    parser.set_defaults(warmup=1.0, load="wrk")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "agent" not in variants or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants must include agent and be among {', '.join(VARIANTS)}")
    session = Session("layers", args)
    session.prepare()
    started = time.monotonic()
    try:
        with session.harness:
            results, pairs = measureLayers(session, variants)
    except BenchError as e:
        print(f"layers: {e}", file=sys.stderr)
        return 1
    session.harness.say(f"measured in {time.monotonic() - started:.0f} s")
    session.write(render(session, results, pairs, variants), {"solo": results, "pairs": pairs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
