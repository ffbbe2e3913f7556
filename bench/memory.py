"""
What the proxy holds in memory: RSS with N concurrent slow streams (every
one checked to complete), which is what a proxy for coding agents holds
open all day; and RSS across one ~112 MB stream read fast and read slowly,
where backpressure must keep it flat.

The streaming clients are bench/streamclient.py, run on the load CPU.

    .venv/bin/python -m bench.memory                       # ~2 minutes
    .venv/bin/python -m bench.memory --only streams --streams 200 --stream-events 10
    .venv/bin/python -m bench.memory --only big --big-events 20000 --slow-seconds 5
"""

from __future__ import annotations

import sys
import time
from typing import Any

import attrs

from bench.harness import (
    DIRECT_PATH,
    PROXY_PATH,
    Harness,
    RssSampler,
    Server,
    cpuSeconds,
    fdLimit,
    memory,
    openFds,
)
from bench.load import API_KEY, BenchError, requestBody, runStreamClient, streamRequest
from bench.report import memoryReport
from bench.session import Session, commonParser


@attrs.frozen
class ManyStreams:
    """
    The proxy's memory before, while and after C{count} streams are open.
    """

    count: int
    scenario: str
    idleRss: int
    allRss: int | None
    peakSampled: int
    hwm: int
    afterRss: int
    fdsAll: int | None
    fdLimit: str | None
    ok: int
    failures: dict[str, int]
    secondsToAllStreaming: float | None

    @property
    def peak(self) -> int:
        return max(self.allRss or 0, self.peakSampled, self.hwm)


@attrs.frozen
class OneStream:
    """
    One large stream read by one client; the proxy's RSS and CPU over it
    when read through the proxy.
    """

    reader: str
    bytes: int
    mbps: float
    complete: bool
    rssBefore: int | None = None
    rssPeak: int | None = None
    rssAfter: int | None = None
    proxyCpu: float | None = None


@attrs.frozen
class MemoryResults:
    streams: ManyStreams | None
    bigScenario: str | None
    big: tuple[OneStream, ...]


def warm(proxy: Server) -> None:
    body = requestBody(stream=True)
    for _ in range(20):
        streamRequest(proxy.port, PROXY_PATH, "events=5", False, body)


def manyStreams(harness: Harness, proxy: Server, count: int, events: int, interval: float) -> ManyStreams:
    """
    Open C{count} streams (100 at a time) of C{events} deltas C{interval}
    apart; read RSS and fds the moment every one has its first event.
    """
    pid = proxy.child.pid
    warm(proxy)
    harness.waitForQuiet()
    idle = memory(pid)
    scenario = f"events={events} interval={interval:g}"
    expected = events * interval
    state: dict[str, Any] = {}

    def onLine(event: dict[str, Any]) -> None:
        if event["type"] == "all-streaming":
            time.sleep(0.2)  # every client has its first event: the moment of peak holding
            state.update(all=event, rss=memory(pid)["VmRSS"], fds=openFds(pid), limit=fdLimit(pid))
            harness.say(f"  all {event['count']} streaming after {event['seconds']:.1f} s")
        elif event["type"] == "not-all-streaming":
            harness.problem(f"streams: only {event['streaming']} of {event['count']} got a first event")
        elif event["type"] == "done":
            state["done"] = event

    argv = ["many", "--port", str(proxy.port), "--count", str(count), "--scenario", scenario]
    argv += ["--expect-deltas", str(events), "--timeout", str(expected + 90)]
    with RssSampler(pid) as sampler:
        runStreamClient(argv, expected + 120, harness.cpus.load, onLine)
    time.sleep(1.0)
    after = memory(pid)
    done = state.get("done", {})
    if done.get("ok") != count:
        harness.problem(f"streams: {done.get('ok')} of {count} completed; failures {done.get('failures')}")
    return ManyStreams(
        count=count,
        scenario=scenario,
        idleRss=idle["VmRSS"],
        allRss=state.get("rss"),
        peakSampled=sampler.peak,
        hwm=after["VmHWM"],
        afterRss=after["VmRSS"],
        fdsAll=state.get("fds"),
        fdLimit=state.get("limit"),
        ok=done.get("ok", 0),
        failures=done.get("failures", {}),
        secondsToAllStreaming=state.get("all", {}).get("seconds"),
    )


def readOne(
    harness: Harness, reader: str, server: Server, scenario: str, rate: float, watch: int | None
) -> OneStream:
    """
    One large stream through C{streamclient.py one} (direct when C{watch},
    the proxy's pid, is None), with the proxy's RSS sampled meanwhile.
    """
    done: dict[str, Any] = {}
    path = DIRECT_PATH if watch is None else PROXY_PATH
    argv = ["one", "--port", str(server.port), "--path", path, "--scenario", scenario, "--rate", str(rate)]
    if watch is None:
        argv += ["--api-key", API_KEY]
    timeout = 120.0 + (112e6 / rate if rate else 0.0)

    def onLine(event: dict[str, Any]) -> None:
        if event["type"] == "done":
            done.update(event)

    if watch is None:
        runStreamClient(argv, timeout, harness.cpus.load, onLine)
        return OneStream(reader, done.get("bytes", 0), done.get("mbps", 0.0), bool(done.get("complete")))
    before, cpu = memory(watch)["VmRSS"], cpuSeconds(watch)
    with RssSampler(watch) as sampler:
        runStreamClient(argv, timeout, harness.cpus.load, onLine)
    time.sleep(0.5)
    return OneStream(
        reader,
        done.get("bytes", 0),
        done.get("mbps", 0.0),
        bool(done.get("complete")),
        rssBefore=before,
        rssPeak=max(sampler.peak, before),
        rssAfter=memory(watch)["VmRSS"],
        proxyCpu=cpuSeconds(watch) - cpu,
    )


def bigStream(
    harness: Harness, fake: Server, proxy: Server, events: int, delta: int, slow: float
) -> tuple[str, tuple[OneStream, ...]]:
    """
    The same large stream direct, through the proxy read as fast as
    possible, and through the proxy read over C{slow} seconds.
    """
    warm(proxy)
    time.sleep(0.5)
    harness.waitForQuiet()
    scenario = f"events={events} deltaSize={delta}"
    direct = readOne(harness, "direct, fast", fake, scenario, 0.0, None)
    fast = readOne(harness, "via proxy, fast", proxy, scenario, 0.0, proxy.child.pid)
    rate = (fast.bytes or 112e6) / slow
    slowly = readOne(harness, "via proxy, slow", proxy, scenario, rate, proxy.child.pid)
    for read in (direct, fast, slowly):
        if not read.complete:
            harness.problem(f"big stream ({read.reader}): incomplete after {read.bytes} bytes")
        else:
            harness.say(f"  big stream {read.reader}: {read.bytes / 1e6:.1f} MB at {read.mbps:.1f} MB/s")
    return scenario, (direct, fast, slowly)


def measureMemory(session: Session, sections: set[str]) -> MemoryResults:
    args, harness = session.args, session.harness
    fake = harness.startFake(args.fake)
    streams = None
    if "streams" in sections:
        harness.say(f"{args.streams} concurrent streams:")
        proxy = harness.startProxy(fake, "proxy-streams", session.env)
        streams = manyStreams(harness, proxy, args.streams, args.stream_events, args.stream_interval)
        harness.stop(proxy)
    scenario: str | None = None
    big: tuple[OneStream, ...] = ()
    if "big" in sections:
        harness.say("one large stream:")
        proxy = harness.startProxy(fake, "proxy-big", session.env)
        scenario, big = bigStream(harness, fake, proxy, args.big_events, args.big_delta, args.slow_seconds)
        harness.stop(proxy)
    return MemoryResults(streams, scenario, big)


def main() -> int:
    parser = commonParser("The proxy's memory: many slow streams, one large stream.", load=False, rounds=1)
    add = parser.add_argument
    add("--only", default="streams,big", help="comma-separated sections: streams, big (both)")
    add("--streams", type=int, default=1000, help="concurrent slow streams (1000)")
    add("--stream-events", type=int, default=60, help="deltas per slow stream (60)")
    add("--stream-interval", type=float, default=0.5, help="seconds between deltas (0.5)")
    add("--big-events", type=int, default=100000, help="deltas of the large stream (100000: ~112 MB)")
    add("--big-delta", type=int, default=1000, help="bytes of text per delta (1000)")
    add("--slow-seconds", type=float, default=10.0, help="target length of the slow read (10)")
    args = parser.parse_args()
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if not sections or not sections <= {"streams", "big"}:
        parser.error("--only takes streams, big")
    session = Session("memory", args)
    session.prepare()
    try:
        with session.harness:
            results = measureMemory(session, sections)
    except BenchError as e:
        session.harness.problem(f"aborted: {e}")
        session.write("\n".join(["# bench.memory aborted", "", *session.info().allProblems, ""]), None)
        return 1
    info = session.info()
    session.write(
        memoryReport(info, results, args.stream_interval * args.stream_events),
        {"info": info, "results": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
