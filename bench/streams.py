"""
How long until a client sees the first SSE event of a stream, direct to
the fake, through the raw Agent relay (bench/minirelay.py) and through the
proxy: what a coding agent waits for before anything shows.

Sequential streams, each on a new connection, the targets alternating
request by request so that drift in the machine's speed hits each alike;
time from sending the request to the first C{event:} bytes.

    .venv/bin/python -m bench.streams                  # 300 streams each, ~1 minute
    .venv/bin/python -m bench.streams --requests 50 --scenario "events=5 interval=0.01"
"""

from __future__ import annotations

import statistics
import sys

import attrs

from bench.harness import DIRECT_PATH, PROXY_PATH, Server, percentile
from bench.load import BenchError, requestBody, streamRequest
from bench.report import streamsReport
from bench.session import Session, commonParser

#: Five deltas 2 ms apart: the first event is what is timed.
SCENARIO = "events=5 interval=0.002"
WARMUPS = 20


@attrs.frozen
class FirstEvent:
    """
    Seconds to the first event over the streams that ended intact.
    """

    name: str
    text: str
    n: int
    failed: int
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, name: str, text: str, times: list[float], failed: int) -> FirstEvent:
        mean = statistics.fmean(times) if times else float("nan")
        return cls(name, text, len(times), failed, percentile(times, 50), percentile(times, 99), mean)


@attrs.frozen
class StreamsResults:
    scenario: str
    requests: int
    targets: tuple[FirstEvent, ...]
    #: Added p50 and p99 in seconds, by what they compare.
    added: dict[str, tuple[float, float]]


@attrs.frozen
class StreamTarget:
    name: str
    text: str
    port: int
    path: str
    withKey: bool

    def send(self, scenario: str, body: bytes) -> tuple[float, bool]:
        return streamRequest(self.port, self.path, scenario, self.withKey, body)


def firstEvents(targets: list[StreamTarget], requests: int, scenario: str) -> StreamsResults:
    """
    C{requests} streams through each target, alternating, after warm-ups.
    """
    body = requestBody(stream=True)
    for _ in range(WARMUPS):
        for target in targets:
            target.send(scenario, body)
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    failed = dict.fromkeys(times, 0)
    for _ in range(requests):
        for target in targets:
            seconds, ok = target.send(scenario, body)
            if ok:
                times[target.name].append(seconds)
            else:
                failed[target.name] += 1
    stats = tuple(FirstEvent.of(t.name, t.text, times[t.name], failed[t.name]) for t in targets)
    byName = {s.name: s for s in stats}
    added = {
        f"{name} vs {base}": (byName[name].p50 - byName[base].p50, byName[name].p99 - byName[base].p99)
        for name, base in (("relay", "direct"), ("proxy", "direct"), ("proxy", "relay"))
        if name in byName and base in byName
    }
    return StreamsResults(scenario, requests, stats, added)


def streamTargets(fake: Server, relay: Server, proxy: Server) -> list[StreamTarget]:
    return [
        StreamTarget("direct", "direct to the fake", fake.port, DIRECT_PATH, True),
        StreamTarget("relay", "raw Agent relay (minirelay)", relay.port, "/", False),
        StreamTarget("proxy", "zaiproxy", proxy.port, PROXY_PATH, False),
    ]


def main() -> int:
    parser = commonParser(
        "Time to the first SSE event: direct, raw Agent relay and proxy.", load=False, rounds=1
    )
    parser.add_argument("--requests", type=int, default=300, help="sequential streams per target (300)")
    parser.add_argument("--scenario", default=SCENARIO, help=f"the fake's x-fake-scenario ({SCENARIO})")
    args = parser.parse_args()
    session = Session("streams", args)
    session.prepare()
    harness = session.harness
    try:
        with harness:
            fake = harness.startFake(args.fake)
            targets = streamTargets(
                fake, harness.startRelay(fake), harness.startProxy(fake, "proxy", session.env)
            )
            harness.waitForQuiet()
            results = firstEvents(targets, args.requests, args.scenario)
    except BenchError as e:
        harness.problem(f"aborted: {e}")
        session.write("\n".join(["# bench.streams aborted", "", *session.info().allProblems, ""]), None)
        return 1
    for target in results.targets:
        if target.failed:
            harness.problem(f"{target.failed} streams {target.text} failed or ended early")
    info = session.info()
    session.write(streamsReport(info, results), {"info": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
