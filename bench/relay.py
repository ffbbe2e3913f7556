"""
The key question: what does zaiproxy cost as a relay? JSON POSTs at 32
connections and at one, in one run, side by side: direct to the fake, the
raw twisted Agent relay (bench/minirelay.py: the least any Twisted relay
can cost), and the proxy with token counting on (and, with
C{--counting-off}, a second proxy with it off).

Reports req/s and the subject's CPU per request at 32 connections, the
proxy/raw-relay throughput ratio, and the p50/p99 the proxy adds at one
connection over the fake and over the raw relay. Every target of a round
is measured back to back, in an order that rotates every round, so drift
in the machine's speed hits each alike; medians over C{--rounds}.

    .venv/bin/python -m bench.relay                          # ~6 minutes
    .venv/bin/python -m bench.relay --rounds 1 --duration 3  # ~1 minute
    .venv/bin/python -m bench.relay --counting-off --env LOG_LEVEL=warn
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs

from bench.harness import DIRECT_PATH, PROXY_PATH, Child, Harness, Measurement, Summary, memory
from bench.load import BenchError, Load
from bench.report import relayReport
from bench.session import Session, commonParser

#: The load's connection counts: a busy agent fleet, and one client alone.
CONNECTIONS = (32, 1)


@attrs.frozen
class Target:
    """
    Where the load goes and which processes' CPU time is read over it:
    C{sut} (the subject, absent direct) and C{fake}.
    """

    name: str
    text: str
    url: str
    watch: dict[str, Child]


@attrs.frozen
class RelayResults:
    rounds: int
    connections: tuple[int, int]
    targetText: dict[str, str]
    summaries: dict[str, dict[int, Summary]]
    #: Throughput ratios at C{connections[0]}, by what they compare.
    ratios: dict[str, float]
    #: (p50, p99) added at C{connections[1]}, in us, by what they compare.
    added: dict[str, tuple[float, float]]
    proxyRss: dict[str, tuple[int, int]]


def startTargets(
    harness: Harness, countingOff: bool, env: dict[str, str], fakeKind: str, baseline: str | None = None
) -> list[Target]:
    """
    The fake, the raw relay and the proxies, all up at once (an idle one
    costs nothing), so a round is just load runs back to back.
    """
    fake = harness.startFake(fakeKind)
    relay = harness.startRelay(fake, "agent")
    proxies = {"proxy": {**env, "TOKEN_COUNTING_ENABLED": "true"}}
    if countingOff:
        proxies["proxy-off"] = {**env, "TOKEN_COUNTING_ENABLED": "false"}
    targets = [
        Target("direct", "direct to the fake", fake.url(DIRECT_PATH), {"fake": fake.child}),
        Target(
            "relay", "raw Agent relay (minirelay)", relay.url("/"), {"sut": relay.child, "fake": fake.child}
        ),
    ]
    for name, proxyEnv in proxies.items():
        proxy = harness.startProxy(fake, name, proxyEnv)
        counting = "on" if proxyEnv["TOKEN_COUNTING_ENABLED"] == "true" else "off"
        text = f"zaiproxy, counting {counting}"
        targets.append(Target(name, text, proxy.url(PROXY_PATH), {"sut": proxy.child, "fake": fake.child}))
    if baseline is not None:
        # The same proxy from another venv (another commit), in the same rounds.
        twistd = str(Path(baseline) / "bin" / "twistd")
        proxy = harness.startProxy(fake, "proxy-baseline", {**env, "TOKEN_COUNTING_ENABLED": "true"}, twistd)
        text = f"zaiproxy, counting on, from {baseline}"
        watch = {"sut": proxy.child, "fake": fake.child}
        targets.append(Target("proxy-baseline", text, proxy.url(PROXY_PATH), watch))
    return targets


def runRounds(
    harness: Harness, targets: list[Target], rounds: int
) -> dict[str, dict[int, list[Measurement]]]:
    load = Load.post()
    runs: dict[str, dict[int, list[Measurement]]] = {t.name: {c: [] for c in CONNECTIONS} for t in targets}
    for index in range(rounds):
        harness.say(f"round {index + 1} of {rounds}:")
        # Rotate the order, so no target always runs first or last.
        shift = index % len(targets)
        for connections in CONNECTIONS:
            for target in targets[shift:] + targets[:shift]:
                runs[target.name][connections].append(
                    harness.measure(target.name, target.url, connections, target.watch, load)
                )
    return runs


def compare(
    summaries: dict[str, dict[int, Summary]],
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """
    The throughput ratios at many connections and the latency added at one.
    """
    many, one = CONNECTIONS
    ratios: dict[str, float] = {}
    added: dict[str, tuple[float, float]] = {}
    proxies = [name for name in summaries if name.startswith("proxy")]
    for name in proxies:
        ratios[f"{name}/raw relay req/s at {many} connections"] = (
            summaries[name][many].rps / summaries["relay"][many].rps
        )
        ratios[f"{name}/raw relay CPU per request at {many} connections"] = (
            summaries[name][many].cpuPerRequestUs["sut"] / summaries["relay"][many].cpuPerRequestUs["sut"]
        )
    if "proxy-baseline" in summaries:
        ratios[f"proxy/proxy-baseline CPU per request at {many} connections"] = (
            summaries["proxy"][many].cpuPerRequestUs["sut"]
            / summaries["proxy-baseline"][many].cpuPerRequestUs["sut"]
        )
    ratios[f"raw relay/direct req/s at {many} connections"] = (
        summaries["relay"][many].rps / summaries["direct"][many].rps
    )
    for name in ["relay", *proxies]:
        for base in ("direct", "relay"):
            if base != name:
                a, b = summaries[name][one], summaries[base][one]
                added[f"{name} vs {base}"] = (a.p50 - b.p50, a.p99 - b.p99)
    return ratios, added


def measureRelay(session: Session, countingOff: bool) -> RelayResults:
    harness = session.harness
    targets = startTargets(harness, countingOff, session.env, session.args.fake, session.args.baseline)
    proxies = {t.name: t.watch["sut"] for t in targets if t.name.startswith("proxy")}
    rssStart = {name: memory(child.pid)["VmRSS"] for name, child in proxies.items()}
    runs = runRounds(harness, targets, session.args.rounds)
    rss = {name: (rssStart[name], memory(child.pid)["VmRSS"]) for name, child in proxies.items()}
    summaries = {name: {c: Summary.of(each) for c, each in per.items()} for name, per in runs.items()}
    ratios, added = compare(summaries)
    return RelayResults(
        rounds=session.args.rounds,
        connections=CONNECTIONS,
        targetText={t.name: t.text for t in targets},
        summaries=summaries,
        ratios=ratios,
        added=added,
        proxyRss=rss,
    )


def main() -> int:
    parser = commonParser("The proxy's cost as a relay: direct, raw Agent relay and proxy, side by side.")
    parser.add_argument("--counting-off", action="store_true", help="also a proxy with token counting off")
    parser.add_argument(
        "--baseline",
        metavar="VENV",
        help="also the proxy installed in another venv (a before/after in one run)",
    )
    args = parser.parse_args()
    session = Session("relay", args)
    session.prepare()
    try:
        with session.harness:
            results = measureRelay(session, args.counting_off)
    except BenchError as e:
        session.harness.problem(f"aborted: {e}")
        session.write("\n".join(["# bench.relay aborted", "", *session.info().allProblems, ""]), None)
        return 1
    info = session.info()
    session.write(relayReport(info, results), {"info": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
