"""
Where the proxy's CPU goes per request: py-spy samples the real proxy
(pinned to the SUT CPU, as in bench.relay) while wrk drives it with the same
~1 KB JSON POSTs, and the samples are summed by function and by layer.

The proxy is CPU-bound under load, so the functions with the most samples
are what an optimisation should look at first. py-spy reads the process
from outside (no instrumentation in the proxy); in its default blocking
mode it pauses the proxy briefly for each sample, so req/s under profiling
is printed next to the profile and is a little lower than bench.relay's.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.hotspots                  # 32 connections, 20 s
    .venv/bin/python -m bench.hotspots --connections 1

Writes bench/out/profile-<stamp>-c<N>.txt (collapsed stacks: open it in
https://www.speedscope.app or feed it to flamegraph.pl) and a Markdown
summary next to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.harness import PROXY_PATH, ROOT, Harness, Server, cpuSeconds
from bench.load import BenchError, Load, LoadResult, Plan, onCpu, runLoad
from bench.session import OUT, treeState
from bench.streamclient import raiseNoFile

#: Layers of the stack, matched on the file of the innermost frame; first
#: match wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("zaiproxy (own code)", ("zaiproxy/",)),
    (
        "logging (twisted.logger, legacy log)",
        ("twisted/logger/", "twisted/python/log.py", "string.py", "datetime"),
    ),
    ("prometheus_client", ("prometheus_client/",)),
    ("http headers", ("twisted/web/http_headers.py",)),
    (
        "twisted.web server (http.py, server.py)",
        ("twisted/web/http.py", "twisted/web/server.py", "twisted/web/resource.py"),
    ),
    (
        "twisted.web client (_newclient, client)",
        ("twisted/web/_newclient.py", "twisted/web/client.py", "twisted/web/iweb.py"),
    ),
    ("deferreds", ("twisted/internet/defer.py",)),
    ("reactor, tcp, line parsing", ("twisted/internet/", "twisted/protocols/", "twisted/python/")),
    ("attrs, zope.interface", ("attr/", "attrs/", "zope/")),
]


def layerOf(frame: str) -> str:
    for name, needles in LAYERS:
        if any(n in frame for n in needles):
            return name
    return "other (stdlib, interpreter)"


def shortFrame(frame: str) -> str:
    """
    C{func (/long/path/site-packages/twisted/web/http.py)} -> C{func (twisted/web/http.py)}.
    """
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def readStacks(path: Path) -> list[tuple[list[str], int]]:
    """
    The reactor thread's stacks (root first) and their sample counts.
    """
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if not stack.startswith("<module>"):
            # A thread-pool thread waiting for work, not the reactor.
            continue
        stacks.append(([shortFrame(f) for f in stack.split(";")], int(count)))
    return stacks


def focus(path: Path, needle: str, top: int) -> str:
    """
    What the functions matching C{needle} spend their time in: inclusive
    time of each direct callee (outermost match in each stack).
    """
    stacks = readStacks(path)
    samples = sum(n for _, n in stacks)
    inside = 0
    callees: Counter[str] = Counter()
    for frames, n in stacks:
        for i, frame in enumerate(frames):
            if needle in frame:
                inside += n
                callees[frames[i + 1] if i + 1 < len(frames) else "(self)"] += n
                break
    lines = [
        f"### Inside `{needle}`: {inside / max(samples, 1) * 100:.1f}% of busy samples",
        "",
        "| % of all | callee |",
        "|---:|---|",
    ]
    lines += [f"| {n / max(samples, 1) * 100:.1f} | `{name}` |" for name, n in callees.most_common(top)]
    return "\n".join(lines)


def summarise(path: Path, top: int) -> tuple[str, int]:
    selfTime: Counter[str] = Counter()
    total: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    samples = 0
    for frames, n in readStacks(path):
        samples += n
        selfTime[frames[-1]] += n
        layers[layerOf(frames[-1])] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return "no samples", 0
    lines = ["### Self time by layer (innermost frame)", "", "| layer | % of busy samples |", "|---|---:|"]
    lines += [f"| {name} | {n / samples * 100:.1f} |" for name, n in layers.most_common()]
    lines += ["", "### Top functions by self time", "", "| % self | function |", "|---:|---|"]
    lines += [f"| {n / samples * 100:.1f} | `{name}` |" for name, n in selfTime.most_common(top)]
    # Cumulative: skip the frames every sample has (twistd, the reactor loop).
    lines += [
        "",
        "### Top functions by cumulative time (below the reactor loop)",
        "",
        "| % total | function |",
        "|---:|---|",
    ]
    shown = 0
    for name, n in total.most_common():
        if n / samples > 0.80:
            continue
        lines.append(f"| {n / samples * 100:.1f} | `{name}` |")
        shown += 1
        if shown >= top:
            break
    # The proxy's own functions, inclusive of what they call: where a change
    # in zaiproxy/ can save time.
    lines += [
        "",
        "### zaiproxy functions by cumulative time",
        "",
        "| % total | % self | function |",
        "|---:|---:|---|",
    ]
    own = [(name, n) for name, n in total.most_common() if "(zaiproxy/" in name]
    lines += [
        f"| {n / samples * 100:.1f} | {selfTime[name] / samples * 100:.1f} | `{name}` |"
        for name, n in own[:top]
    ]
    return "\n".join(lines), samples


def record(
    pyspy: str, cpu: int | None, pid: int, args: argparse.Namespace, output: Path
) -> tuple[threading.Thread, dict[str, subprocess.CompletedProcess[str]]]:
    """
    py-spy recording C{pid} for C{--duration} seconds, in a thread; its
    completed process lands in the dict, under C{done}.
    """
    argv = [pyspy, "record", "--pid", str(pid), "--duration", str(round(args.duration))]
    argv += ["--rate", str(args.rate), "--nolineno", "--format", "raw", "-o", str(output)]
    argv += ["--nonblocking"] if args.nonblocking else []

    box: dict[str, subprocess.CompletedProcess[str]] = {}

    def run() -> None:
        box["done"] = subprocess.run(
            onCpu(cpu, argv), capture_output=True, text=True, timeout=args.duration + 60
        )

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def profile(harness: Harness, args: argparse.Namespace, pyspy: str, output: Path) -> tuple[LoadResult, float]:
    """
    Start the subject, warm it up, then sample it under load; the load's
    result and the subject's CPU seconds over it.
    """
    fake = harness.startFake()
    subject: Server
    if args.relay:
        subject = harness.startRelay(fake, args.relay)
        url = subject.url("/")
    else:
        env = dict(item.split("=", 1) for item in args.env)
        subject = harness.startProxy(fake, "proxy-profile", env)
        url = subject.url(PROXY_PATH)
    load = Load.post(stream=args.stream)
    harness.waitForQuiet()
    runLoad(url, args.connections, args.warmup, load, "wrk", harness.cpus.load)
    cpu = cpuSeconds(subject.child.pid)
    sampler, box = record(pyspy, harness.cpus.load, subject.child.pid, args, output)
    time.sleep(0.3)
    # wrk outlasts the sampling a little, so every sample is under load.
    result = runLoad(url, args.connections, args.duration + 1, load, "wrk", harness.cpus.load)
    sampler.join()
    cpu = cpuSeconds(subject.child.pid) - cpu
    done = box.get("done")
    if done is None or done.returncode != 0 or not output.exists():
        raise BenchError(f"py-spy failed: {done.stderr if done else 'no result'}")
    return result, cpu


def render(args: argparse.Namespace, output: Path, result: LoadResult, cpu: float) -> str:
    table, samples = summarise(output, args.top)
    tree = treeState()
    busy = samples / (args.rate * args.duration)
    subject = f"minimal relay ({args.relay})" if args.relay else "proxy"
    answered = "with the fake's default SSE stream (5 deltas)" if args.stream else "in JSON"
    return "\n".join(
        [
            f"## Profile of the {subject} at {args.connections} connections",
            "",
            f"Command: `python -m bench.hotspots{''.join(' ' + a for a in sys.argv[1:])}`",
            "",
            f"Code: commit {tree['commit']}; uncommitted changes under zaiproxy/: {tree['changed']} "
            f"(digest {tree['digest']}). Proxy settings as in bench.relay (LOG_LEVEL=info, token counting "
            f"default){''.join(', ' + e for e in args.env)}; wrk POSTs ~1 KB bodies answered {answered}.",
            "",
            f"py-spy record --rate {args.rate} --nolineno for {args.duration:g} s: {samples} busy samples "
            f"(idle samples are not recorded: the proxy was busy in about {busy * 100:.0f}% of them). "
            f"Under profiling: {result.rps:.0f} req/s, {result.errors} wrk errors, proxy CPU "
            f"{cpu / max(result.requests, 1) * 1e6:.0f} us/request. Raw stacks: `{output.name}`.",
            "",
            table,
            "",
            *(focus(output, f, args.top) + "\n" for f in args.focus),
        ]
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Profile the proxy under wrk load with py-spy.")
    add = parser.add_argument
    add("--connections", type=int, default=32)
    add("--duration", type=float, default=20.0, help="seconds of sampling (20)")
    add("--warmup", type=float, default=3.0)
    add("--rate", type=int, default=100, help="samples per second (100)")
    add("--top", type=int, default=25)
    add("--out", type=Path, default=OUT, help="where the profile and summary go (bench/out)")
    add(
        "--focus",
        action="append",
        default=[],
        metavar="TEXT",
        help="also break down the time inside functions matching TEXT, e.g. Reporter.finished (repeatable)",
    )
    add(
        "--relay",
        choices=("agent", "treq", "treq-bytes", "cookie", "decoder"),
        help="profile one of bench/minirelay.py's minimal relays instead of the proxy",
    )
    add("--summarise", type=Path, metavar="RAW", help="only summarise an existing raw profile (no benchmark)")
    add("--stream", action="store_true", help='POST "stream": true bodies (the fake\'s default short stream)')
    add("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the proxy")
    add("--nonblocking", action="store_true", help="sample without pausing the proxy (some samples lost)")
    return parser


def main() -> int:
    args = parser().parse_args()
    if args.summarise is not None:
        table, _ = summarise(args.summarise, args.top)
        print("\n\n".join([table, *(focus(args.summarise, f, args.top) for f in args.focus)]))
        return 0
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        print("hotspots: py-spy not found; pip install py-spy", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None or any("=" not in item for item in args.env):
        print("hotspots: needs wrk (apt-get install wrk); --env takes NAME=VALUE", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    subject = (f"relay-{args.relay}" if args.relay else "proxy") + ("-stream" if args.stream else "")
    name = f"profile-{stamp}-{subject}-c{args.connections}"
    harness = Harness(args.out, name, Plan(args.duration, args.warmup, 0, 60.0, "wrk"))
    if harness.cpus.load is not None:
        os.sched_setaffinity(0, {harness.cpus.load})
    raiseNoFile()
    try:
        with harness:
            result, cpu = profile(harness, args, pyspy, args.out / f"{name}.txt")
    except BenchError as e:
        print(f"hotspots: {e}", file=sys.stderr)
        return 1
    text = render(args, args.out / f"{name}.txt", result, cpu)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
