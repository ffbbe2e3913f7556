"""
Does treq cost ~0.2 ms a request on the relay path? zaiproxy forwards on a
plain twisted L{Agent} over a persistent pool rather than through
L{treq.client.HTTPClient} (see zaiproxy/relay/upstream.py) on the strength of that
claim; this measures it instead of taking it on trust.

Two minimal relays (bench/minirelay.py) that differ only in their HTTP
client run in turn on CPU 0 in front of the fake Z.AI (CPU 1), driven by
wrk on CPU 1 with the same ~1 KB JSON POSTs as bench/run.py:

- C{agent}: plain L{Agent} + L{HTTPConnectionPool};
- C{treq}: C{HTTPClient(Agent(pool))}, C{unbuffered=True,
  allow_redirects=False}, same body producer: treq's URL handling, cookie
  agent and content decoder are the whole difference;
- C{treq-bytes}: the same, with the body given to treq as bytes (how treq is
  usually called), adding treq's FileBodyProducer;
- C{cookie}, C{decoder}: the plain agent under just one of treq's layers
  (CookieAgent, ContentDecoderAgent), to see which layer costs what.

Each relay is first measured alone, as bench/run.py does: req/s at 32
connections, p50 at 1 connection, and its CPU time per request (from /proc).
On this shared VM the machine's speed drifts by 10-20% within minutes,
which is as much as the difference sought, so the cost of each layer is
then measured paired: the agent relay and one variant loaded at the same
time by two wrk processes, both relays sharing CPU 0, and each one's CPU
per request read over the same seconds. Whatever slows the core slows both.

    .venv/bin/python bench/layers.py                   # ~5 minutes
    .venv/bin/python bench/layers.py --rounds 1 --variants agent,treq
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from run import (
    DIRECT_PATH,
    LOAD_CPU,
    OUT,
    PYTHON,
    SUT_CPU,
    BenchError,
    Child,
    Children,
    Run,
    cpuSeconds,
    freePort,
    machineFacts,
    measure,
    startFake,
    startWrk,
    waitForQuiet,
    wrkResult,
)
from streamclient import raiseNoFile

VARIANTS = ("agent", "treq", "treq-bytes", "cookie", "decoder")

#: perf-baselines.md: the 40-line relays, CPU per request at 32 connections.
REFERENCE_US = {"agent": 513, "treq": 726}


def startRelay(children: Children, run: Run, kind: str, fakePort: int) -> tuple[Child, int]:
    port = freePort()
    argv = [
        "taskset",
        "-c",
        str(SUT_CPU),
        PYTHON,
        str(Path(__file__).with_name("minirelay.py")),
        kind,
        str(port),
        f"http://127.0.0.1:{fakePort}{DIRECT_PATH}",
    ]
    child = children.add(Child(f"relay-{kind}", argv, run.log(f"relay-{kind}")))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"relay {kind} exited:\n{child.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return child, port
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"relay {kind} did not listen on {port}")


def pairedRun(
    run: Run, agent: tuple[str, dict[str, Child]], other: tuple[str, dict[str, Child]], connections: int
) -> tuple[float, float, float, float]:
    """
    Load both relays at once; return each one's CPU us per request and
    req/s, over the same wall-clock window.
    """
    relays = [agent[1]["relay"], other[1]["relay"]]
    waitForQuiet(run)
    warm = [startWrk(url, connections, run.args.warmup, run.script) for url, _ in (agent, other)]
    for proc in warm:
        wrkResult(proc, run.args.warmup + 60)
    before = [cpuSeconds(r.pid) for r in relays]
    procs = [startWrk(url, connections, run.args.duration, run.script) for url, _ in (agent, other)]
    results = [wrkResult(proc, run.args.duration + 60) for proc in procs]
    cpu = [cpuSeconds(r.pid) - b for r, b in zip(relays, before, strict=True)]
    for result in results:
        if result["errors"]:
            run.problem(f"paired run: {result['errors']} wrk errors {result['errorLines']}")
    perRequest = [c / max(r["requests"], 1) * 1e6 for c, r in zip(cpu, results, strict=True)]
    run.say(
        f"  agent {perRequest[0]:5.0f} us/req {results[0]['rps']:5.0f} req/s | "
        f"other {perRequest[1]:5.0f} us/req {results[1]['rps']:5.0f} req/s | "
        f"difference {perRequest[1] - perRequest[0]:+.0f} us"
    )
    return perRequest[0], perRequest[1], results[0]["rps"], results[1]["rps"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure treq's layers on a minimal relay.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each (1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of solo runs; medians reported (2)")
    parser.add_argument("--pairs", type=int, default=4, help="paired runs per variant against the agent (4)")
    parser.add_argument(
        "--pair-connections", type=int, default=16, help="connections per relay in a paired run (16)"
    )
    parser.add_argument(
        "--retries", type=int, default=1, help="re-measure a run disturbed by other processes (1)"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="wait up to this long for a quiet machine (60)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("layers: wrk is not installed; apt-get install wrk", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "agent" not in variants or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants must include agent and be among {', '.join(VARIANTS)}")
    os.sched_setaffinity(0, {LOAD_CPU})
    raiseNoFile()

    run = Run(
        argparse.Namespace(
            fake="quiet",
            warmup=args.warmup,
            duration=args.duration,
            retries=args.retries,
            quiet_wait=args.quiet_wait,
        )
    )
    facts = machineFacts()
    started = time.monotonic()
    results: dict[str, list[dict[int, dict[str, Any]]]] = {v: [] for v in ("direct", *variants)}
    pairs: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in variants}
    children = Children()
    try:
        fake, fakePort = startFake(children, run)
        targets: dict[str, tuple[str, dict[str, Child]]] = {
            "direct": (f"http://127.0.0.1:{fakePort}{DIRECT_PATH}", {"fake": fake})
        }
        # All relays up at once (an idle one costs nothing), so a round is
        # just wrk runs back to back and slow drift of the machine's speed
        # hits every variant of a round alike.
        for kind in variants:
            relay, port = startRelay(children, run, kind, fakePort)
            targets[kind] = (f"http://127.0.0.1:{port}/", {"relay": relay, "fake": fake})
        order = list(targets)
        for round in range(args.rounds):
            run.say(f"round {round + 1} of {args.rounds}:")
            # Rotate the order, so no variant always runs first or last.
            shift = round % len(order)
            for kind in order[shift:] + order[:shift]:
                url, watch = targets[kind]
                results[kind].append({c: measure(run, kind, url, c, watch) for c in (32, 1)})
        for kind in variants:
            if kind == "agent":
                continue
            run.say(f"paired: agent and {kind} at once, {args.pairs} runs:")
            for _ in range(args.pairs):
                pairs[kind].append(pairedRun(run, targets["agent"], targets[kind], args.pair_connections))
    except BenchError as e:
        print(f"layers: {e}", file=sys.stderr)
        return 1
    finally:
        children.stopAll()

    def med(kind: str, c: int, key: str) -> float:
        return median([r[c][key] for r in results[kind]])

    def paired(kind: str, c: int, key: str) -> list[float]:
        """
        Round by round: this variant minus the plain agent.
        """
        return sorted(r[c][key] - a[c][key] for r, a in zip(results[kind], results["agent"], strict=True))

    def spread(values: list[float]) -> str:
        return f"{median(values):+.0f} us" + (
            f" (rounds {values[0]:+.0f} to {values[-1]:+.0f})" if len(values) > 1 else ""
        )

    command = ".venv/bin/python bench/layers.py" + "".join(" " + a for a in sys.argv[1:])
    lines = [
        f"## treq layers on a minimal relay, {facts['date']}",
        "",
        f"Command: `{command}` ({time.monotonic() - started:.0f} s; {args.rounds} round(s), "
        f"{'medians' if args.rounds > 1 else 'single runs'}; wrk {args.duration:g} s after {args.warmup:g} "
        "s warm-up).",
        "",
        f"Machine: {facts['nproc']} CPUs, {facts['cpu']}; Python {facts['python']}, Twisted "
        f"{facts['twisted']}, treq {facts['treq']}; relays on CPU {SUT_CPU}, fake (bench/fakeserver.py) and "
        f"wrk on CPU {LOAD_CPU}.",
        "",
        "| client | req/s, 32 conns | relay CPU us/req, 32 conns | relay % of core | p50 ms, 1 conn | p99 "
        "ms, 1 conn | relay CPU us/req, 1 conn |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| direct to the fake | {med('direct', 32, 'rps'):.0f} | | | {med('direct', 1, 'p50') / 1000:.3f} | "
        f"{med('direct', 1, 'p99') / 1000:.3f} | |",
    ]
    for kind in variants:
        lines.append(
            f"| {kind} | {med(kind, 32, 'rps'):.0f} | {med(kind, 32, 'relayCpuPerRequestUs'):.0f} | "
            f"{med(kind, 32, 'relayCore') * 100:.0f}% | {med(kind, 1, 'p50') / 1000:.3f} | "
            f"{med(kind, 1, 'p99') / 1000:.3f} | {med(kind, 1, 'relayCpuPerRequestUs'):.0f} |"
        )
    lines += [
        "",
        "Cost per request relative to the plain Agent (median of the per-round differences, each round "
        "running every variant back to back):",
        "",
    ]
    verdicts: list[str] = []
    for kind in variants:
        if kind == "agent":
            continue
        cpu32 = paired(kind, 32, "relayCpuPerRequestUs")
        cpu1 = paired(kind, 1, "relayCpuPerRequestUs")
        p50 = paired(kind, 1, "p50")
        slower = median(
            [a[32]["rps"] / r[32]["rps"] for r, a in zip(results[kind], results["agent"], strict=True)]
        )
        lines.append(
            f"- {kind}: CPU {spread(cpu32)} a request at 32 connections, {spread(cpu1)} at 1 connection; "
            f"p50 at 1 connection {spread(p50)}; throughput at 32 connections {slower:.2f}x lower."
        )
        verdicts.append(f"{kind} {median(cpu32):+.0f} us")
    lines += [
        "",
        f"Paired (both relays loaded at once by two wrk processes, {args.pair_connections} connections each, "
        f"sharing CPU {SUT_CPU}; {args.pairs} runs of {args.duration:g} s per variant):",
        "",
        "| variant | agent CPU us/req | variant CPU us/req | difference us/req (median) | runs: min to max "
        "| variant/agent req/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    pairedVerdicts: list[str] = []
    for kind, runs in pairs.items():
        if not runs:
            continue
        diffs = sorted(b - a for a, b, _, _ in runs)
        lines.append(
            f"| {kind} | {median([a for a, _, _, _ in runs]):.0f} | "
            f"{median([b for _, b, _, _ in runs]):.0f} | {median(diffs):+.0f} | {diffs[0]:+.0f} to "
            f"{diffs[-1]:+.0f} | {median([rb / ra for _, _, ra, rb in runs]):.2f} |"
        )
        pairedVerdicts.append(f"{kind} {median(diffs):+.0f} us")
    errors = sum(r[c]["errors"] for runs in results.values() for r in runs for c in (1, 32))
    lines += [
        "",
        f"Reference (perf-baselines.md, same kind of relays): agent {REFERENCE_US['agent']} us, treq "
        f"{REFERENCE_US['treq']} us CPU/request, a {REFERENCE_US['treq'] - REFERENCE_US['agent']} us "
        "difference. relay/upstream.py says 0.2 ms; measured here: solo runs (CPU at 32 connections) "
        f"{', '.join(verdicts)}; paired runs {', '.join(pairedVerdicts) or 'not run'}.",
        "",
        f"wrk errors across all runs (socket errors + non-2xx): {errors}."
        + ("" if not run.problems else " Problems: " + "; ".join(run.problems)),
        "",
    ]
    text = "\n".join(lines)
    (OUT / f"layers-{run.stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
