"""
What token accounting costs, in one run: two proxies that differ only in
C{TOKEN_COUNTING_ENABLED} (true / false), measured alternately on the same
machine, then tiktoken's own speed in this process (L{bench.tokens}).

One fake upstream (bench/fakeserver.py), the load and every client on the
load CPU; both proxies on the SUT CPU, started together and loaded one at
a time (never concurrently), in an order that swaps every round, so drift
in the machine's speed hits both alike; new processes every round (two
processes of the same code differ by themselves). Sections:

- C{proxies}: throughput and proxy CPU per request at 32 connections for
  each answer kind: C{json} (the cost is holding the body and parsing its
  usage), C{stream} (the fake's default short SSE stream, 5 text deltas),
  and, as extras, the same with C{usage=none}, where Z.AI reports no usage
  and the proxy counts prompt and answer with tiktoken (the worst case);
  then time to the first SSE event, the proxies alternating request by
  request, paired;
- C{tokens}: tokens counted per CPU-second, in-process.

    .venv/bin/python -m bench.counting                  # everything, ~8 minutes
    .venv/bin/python -m bench.counting --only tokens    # tiktoken alone, ~1 minute
    .venv/bin/python -m bench.counting --modes json,stream --rounds 1 --duration 5
    .venv/bin/python -m bench.counting --modes "" --rounds 16 --control  # A/A: the bench's noise
"""

from __future__ import annotations

import random
import statistics
import sys
from typing import Any

import attrs

from bench.harness import (
    PROXY_PATH,
    Harness,
    Measurement,
    Server,
    memory,
    percentile,
    waitReady,
)
from bench.load import BenchError, Load, requestBody, streamRequest
from bench.report import countingReport
from bench.session import Session, commonParser
from bench.tokens import measureTokens

#: Answer kinds under load: (streamed?, x-fake-scenario or None).
MODES: dict[str, tuple[bool, str | None]] = {
    "json": (False, None),
    "stream": (True, None),
    "json-nousage": (False, "usage=none"),
    "stream-nousage": (True, "usage=none"),
}
TTFB_SCENARIO = "events=5 interval=0.002"
SIDES = ("on", "off")


@attrs.frozen
class ModeRatios:
    """
    One answer kind, on against off: medians over the rounds, and the
    on/off ratios taken round by round (the two runs of a round were back
    to back).
    """

    mode: str
    rps: dict[str, float]
    cpuUs: dict[str, float]
    core: dict[str, float]
    p50: dict[str, float]
    p99: dict[str, float]
    rpsRatios: tuple[float, ...]
    cpuRatios: tuple[float, ...]
    addedUs: tuple[float, ...]
    disturbance: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, runs: dict[str, list[Measurement]]) -> ModeRatios:
        pairs = list(zip(runs["on"], runs["off"], strict=True))

        def med(key: Any) -> dict[str, float]:
            return {side: statistics.median(key(m) for m in runs[side]) for side in SIDES}

        return cls(
            mode=runs["on"][0].label.split()[0],
            rps=med(lambda m: m.load.rps),
            cpuUs=med(lambda m: m.cpuPerRequestUs("proxy")),
            core=med(lambda m: m.core("proxy")),
            p50=med(lambda m: m.load.p50),
            p99=med(lambda m: m.load.p99),
            rpsRatios=tuple(on.load.rps / off.load.rps for on, off in pairs),
            cpuRatios=tuple(on.cpuPerRequestUs("proxy") / off.cpuPerRequestUs("proxy") for on, off in pairs),
            addedUs=tuple(on.cpuPerRequestUs("proxy") - off.cpuPerRequestUs("proxy") for on, off in pairs),
            disturbance=tuple((on.disturbance, off.disturbance) for on, off in pairs),
        )


@attrs.frozen
class TtfbSummary:
    """
    Time to the first event, seconds: per round and pooled, and the paired
    on - off differences (the two streams of a pair sent back to back).
    """

    perRound: tuple[dict[str, tuple[float, float]], ...]
    p50: dict[str, float]
    p99: dict[str, float]
    n: dict[str, int]
    added: float
    addedInterval: tuple[float, float]
    roundPaired: tuple[float, ...]
    pairedInterval: tuple[float, float]
    failed: dict[str, int]

    @classmethod
    def of(cls, rounds: list[dict[str, list[float]]], failed: dict[str, int]) -> TtfbSummary:
        pooled = {side: [t for r in rounds for t in r[side]] for side in SIDES}
        p50 = {side: percentile(pooled[side], 50) for side in SIDES}
        roundPaired = tuple(statistics.median(r["pairs"]) for r in rounds if r["pairs"])
        # Rounds, not streams, are the independent samples: each has its own two processes.
        interval = tInterval(list(roundPaired)) if len(roundPaired) >= 2 else (float("nan"), float("nan"))
        return cls(
            perRound=tuple({s: (percentile(r[s], 50), percentile(r[s], 99)) for s in SIDES} for r in rounds),
            p50=p50,
            p99={side: percentile(pooled[side], 99) for side in SIDES},
            n={side: len(pooled[side]) for side in SIDES},
            added=p50["on"] - p50["off"],
            addedInterval=bootstrapMedianDiff(pooled["on"], pooled["off"]),
            roundPaired=roundPaired,
            pairedInterval=interval,
            failed=failed,
        )


@attrs.frozen
class CountingResults:
    control: bool
    rounds: int
    connections: int
    ttfbRequests: int
    modes: tuple[ModeRatios, ...]
    ttfb: TtfbSummary | None
    rssStart: dict[str, int]
    rssEnd: dict[str, int]
    tokens: dict[str, Any] | None


def bootstrapMedianDiff(on: list[float], off: list[float], n: int = 2000) -> tuple[float, float]:
    """
    A 95% bootstrap interval of median(on) - median(off), fixed seed.
    """
    if not on or not off:
        return float("nan"), float("nan")
    rng = random.Random(1)
    diffs = sorted(
        statistics.median(rng.choices(on, k=len(on))) - statistics.median(rng.choices(off, k=len(off)))
        for _ in range(n)
    )
    return diffs[int(n * 0.025)], diffs[int(n * 0.975) - 1]


#: Student's t, two-sided 95%, by degrees of freedom (1-20).
_T95: tuple[float, ...] = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_T95 += (2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)


def tInterval(values: list[float]) -> tuple[float, float]:
    """
    The 95% t interval of the mean of C{values} (at least two).
    """
    n = len(values)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * statistics.stdev(values) / n**0.5
    mean = statistics.fmean(values)
    return mean - half, mean + half


# -- the proxies ------------------------------------------------------------------


def startProxies(harness: Harness, fake: Server, env: dict[str, str], control: bool) -> dict[str, Server]:
    """
    Both proxies at once (they load their code from the same tree), warmed
    up with a few streams each.
    """
    proxies = {}
    for side in SIDES:
        counting = "true" if side == "on" and not control else "false"
        proxies[side] = harness.spawnProxy(fake, f"proxy-{side}", {**env, "TOKEN_COUNTING_ENABLED": counting})
    for proxy in proxies.values():
        waitReady(proxy.child, proxy.port, "/readyz", {})
    body = requestBody(stream=True)
    for _ in range(10):
        for proxy in proxies.values():
            streamRequest(proxy.port, PROXY_PATH, "events=5", False, body)
    return proxies


def ttfbRound(
    harness: Harness, proxies: dict[str, Server], order: tuple[str, ...], requests: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """
    Sequential streams, alternating between the proxies request by request
    (and which goes first, pair by pair).
    """
    harness.waitForQuiet()
    body = requestBody(stream=True)
    for _ in range(10):
        for side in SIDES:
            streamRequest(proxies[side].port, PROXY_PATH, TTFB_SCENARIO, False, body)
    times: dict[str, list[float]] = {"on": [], "off": [], "pairs": []}
    failed = dict.fromkeys(SIDES, 0)
    for i in range(requests):
        pair: dict[str, float] = {}
        for side in order if i % 2 == 0 else order[::-1]:
            seconds, ok = streamRequest(proxies[side].port, PROXY_PATH, TTFB_SCENARIO, False, body)
            if ok:
                times[side].append(seconds)
                pair[side] = seconds
            else:
                failed[side] += 1
        if len(pair) == 2:
            times["pairs"].append(pair["on"] - pair["off"])
    return times, failed


def proxyRounds(session: Session, modes: list[str]) -> dict[str, Any]:
    """
    Every round: new proxies, each answer kind loaded on one then the
    other, then the time-to-first-event streams.
    """
    args, harness = session.args, session.harness
    fake = harness.startFake(args.fake)
    loads = {mode: Load.post(*MODES[mode]) for mode in modes}
    runs: dict[str, dict[str, list[Measurement]]] = {m: {s: [] for s in SIDES} for m in modes}
    ttfb: list[dict[str, list[float]]] = []
    failed = dict.fromkeys(SIDES, 0)
    rss: dict[str, dict[str, int]] = {}
    for index in range(args.rounds):
        proxies = startProxies(harness, fake, session.env, args.control)
        rss.setdefault("start", {s: memory(p.child.pid)["VmRSS"] for s, p in proxies.items()})
        order = SIDES if index % 2 == 0 else SIDES[::-1]
        harness.say(f"round {index + 1} of {args.rounds} (order: {', '.join(order)})")
        for mode in modes:
            for side in order:
                watch = {"proxy": proxies[side].child, "fake": fake.child}
                url = proxies[side].url(PROXY_PATH)
                runs[mode][side].append(
                    harness.measure(f"{mode} {side}", url, args.connections, watch, loads[mode])
                )
        if args.ttfb_requests:
            times, lost = ttfbRound(harness, proxies, order, args.ttfb_requests)
            ttfb.append(times)
            failed = {side: failed[side] + lost[side] for side in SIDES}
        rss["end"] = {s: memory(p.child.pid)["VmRSS"] for s, p in proxies.items()}
        for side, proxy in proxies.items():
            if not proxy.child.alive():
                harness.problem(f"the counting-{side} proxy died during the run:\n{proxy.child.tail()}")
            harness.stop(proxy)
    return {"runs": runs, "ttfb": ttfb, "failed": failed, "rss": rss}


def measureCounting(session: Session, modes: list[str], sections: set[str]) -> CountingResults:
    args = session.args
    raw: dict[str, Any] = {"runs": {}, "ttfb": [], "failed": {}, "rss": {}}
    if "proxies" in sections:
        session.harness.say("counting on vs off, through two proxies:")
        raw = proxyRounds(session, modes)
    tokens = None
    if "tokens" in sections:
        session.harness.say("tokens per CPU-second, in-process:")
        tokens = measureTokens(session.harness, int(args.corpus_mb * 1_000_000), args.token_reps)
    for side, count in raw["failed"].items():
        if count:
            session.harness.problem(
                f"TTFB: {count} streams via the counting-{side} proxy failed or ended early"
            )
    return CountingResults(
        control=args.control,
        rounds=args.rounds,
        connections=args.connections,
        ttfbRequests=args.ttfb_requests,
        modes=tuple(ModeRatios.of(raw["runs"][mode]) for mode in raw["runs"]),
        ttfb=TtfbSummary.of(raw["ttfb"], raw["failed"]) if raw["ttfb"] else None,
        rssStart=raw["rss"].get("start", {}),
        rssEnd=raw["rss"].get("end", {}),
        tokens=tokens,
    )


def main() -> int:
    parser = commonParser("The cost of token accounting: counting on vs off, in one run.")
    add = parser.add_argument
    add("--connections", type=int, default=32, help="load connections (32)")
    add("--modes", default=",".join(MODES), help=f"answer kinds under load, among {', '.join(MODES)} (all)")
    add(
        "--control",
        action="store_true",
        help="both proxies with counting off (an A/A run: the bench's noise)",
    )
    add("--ttfb-requests", type=int, default=200, help="sequential streams per proxy per round (200)")
    add("--corpus-mb", type=float, default=1.0, help="size of the token corpus, million characters (1)")
    add("--token-reps", type=int, default=3, help="runs of each tiktoken measurement; medians (3)")
    add("--only", default="proxies,tokens", help="comma-separated sections: proxies, tokens")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= set(MODES) or not (modes or args.ttfb_requests):
        parser.error(f"--modes must be among {', '.join(MODES)} (empty: time to first byte only)")
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if not sections or not sections <= {"proxies", "tokens"}:
        parser.error("--only takes proxies, tokens")
    session = Session("counting", args)
    session.prepare()
    try:
        with session.harness:
            results = measureCounting(session, modes, sections)
    except BenchError as e:
        session.harness.problem(f"aborted: {e}")
        session.write("\n".join(["# bench.counting aborted", "", *session.info().allProblems, ""]), None)
        return 1
    info = session.info()
    session.write(countingReport(info, results), {"info": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
