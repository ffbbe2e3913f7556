"""
What sharing the limits through Redis costs one proxy: the relay's
throughput and CPU per request with C{REDIS_URL} unset (the limiter in
memory) and set (a redis-server this bench starts on the load CPU, every
admission a round trip, batched per waiting callers), in the same rounds
with the order rotated each round, as ratios. The limits are set far
above the offered load, so the bucket never makes anyone wait: what is
measured is the round trips themselves (issue 17: at most 15%).

    .venv/bin/python -m bench.shared --rounds 5 --duration 5 --fake nginx
"""

from __future__ import annotations

import sys
from typing import Any

import attrs

from bench.harness import PROXY_PATH, Harness, Summary
from bench.load import BenchError, Load
from bench.session import Session, commonParser
from bench.workers import startRedis

TARGETS = {
    "alone": "limits in memory (REDIS_URL unset)",
    "shared": "limits shared through a local Redis (REDIS_URL)",
}


@attrs.frozen
class SharedResults:
    rounds: int
    connections: int
    summaries: dict[str, Summary]
    ratios: dict[str, float]


def measureShared(session: Session, connections: int) -> SharedResults:
    harness: Harness = session.harness
    fake = harness.startFake(session.args.fake)
    redis = startRedis(harness, None)
    base = {**session.env, "LEDGER_ENABLED": "false"}
    proxies = {
        "alone": harness.startProxy(fake, "alone", base),
        "shared": harness.startProxy(fake, "shared", {**base, "REDIS_URL": f"redis://127.0.0.1:{redis}/0"}),
    }
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
    summaries = {name: Summary.of(each) for name, each in runs.items()}
    ratios = {
        "shared / alone, req/s": summaries["shared"].rps / summaries["alone"].rps,
        "shared / alone, CPU per request": summaries["shared"].cpuPerRequestUs["sut"]
        / summaries["alone"].cpuPerRequestUs["sut"],
    }
    return SharedResults(session.args.rounds, connections, summaries, ratios)


def report(results: SharedResults) -> list[str]:
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
    for name, value in results.ratios.items():
        target = "at least 0.85 (round trips cost at most 15%)" if "req/s" in name else ""
        lines.append(f"| {name} | {value:.3f} | {target} |")
    return lines


def main() -> int:
    parser = commonParser("What sharing the limits through Redis costs one proxy.", 5.0, 3)
    parser.add_argument("--connections", type=int, default=32, help="load connections (32)")
    args = parser.parse_args()
    session = Session("shared", args)
    session.prepare()
    try:
        with session.harness:
            results = measureShared(session, args.connections)
    except BenchError as e:
        session.harness.problem(f"aborted: {e}")
        return 1
    info = session.info()
    lines = ["# bench.shared", "", f"    {session.command}", "", *report(results), ""]
    lines += [f"Machine: {info.facts}", "", *(f"- {p}" for p in info.allProblems)]
    session.write("\n".join(lines) + "\n", {"shared": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
