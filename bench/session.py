"""
What every bench command shares around its measurements: the common
options, the checks before a run, the facts of the machine and of the code
that ran, the proxies' logs read back, and the report and raw JSON written
to bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from bench.harness import PYTHON, ROOT, TWISTD, Cpus, Harness
from bench.load import Plan, chooseTool
from bench.streamclient import raiseNoFile

OUT = ROOT / "bench" / "out"


def commonParser(
    description: str, duration: float = 10.0, rounds: int = 3, load: bool = True
) -> argparse.ArgumentParser:
    """
    The options of every command; those of load runs unless C{load} is
    false (the command drives its own clients).
    """
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    if load:
        add("--duration", type=float, default=duration, help=f"seconds per measured load run ({duration:g})")
        add("--warmup", type=float, default=2.0, help="seconds of warm-up before each (2)")
        add("--retries", type=int, default=1, help="measure a run again if other processes disturbed it (1)")
        add(
            "--load",
            choices=("auto", "wrk", "python"),
            default="auto",
            help="load generator (auto: wrk if found)",
        )
    add("--rounds", type=int, default=rounds, help=f"rounds; medians reported ({rounds})")
    add("--quiet-wait", type=float, default=60.0, help="wait up to this long for quiet CPUs (60; 0: never)")
    add(
        "--fake",
        choices=("quiet", "twistd", "nginx"),
        default="quiet",
        help="bench/fakeserver.py, twistd's fake, or a static nginx (JSON only: bench.relay)",
    )
    add("--out", type=Path, default=OUT, help="where the report and raw JSON go (bench/out)")
    add(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the proxy, e.g. LOG_LEVEL=warn (repeatable)",
    )
    return parser


def proxyEnv(items: list[str]) -> dict[str, str]:
    if any("=" not in item for item in items):
        raise SystemExit("bench: --env takes NAME=VALUE")
    return dict(item.split("=", 1) for item in items)


class Session:
    """
    One command's run: its options, its harness, the facts of the machine
    and of the code, and where its outputs go.
    """

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out: Path = args.out
        tool = chooseTool(getattr(args, "load", "auto"))
        plan = Plan(
            getattr(args, "duration", 0.0),
            getattr(args, "warmup", 0.0),
            getattr(args, "retries", 0),
            args.quiet_wait,
            tool,
        )
        self.harness = Harness(self.out, f"{name}-{self.stamp}", plan, Cpus.choose())
        self.env = proxyEnv(getattr(args, "env", []))
        self.command = f"python -m bench.{name}" + "".join(" " + a for a in sys.argv[1:])
        self.started = time.monotonic()
        self.facts = machineFacts()
        self.treeAtStart = treeState()

    def prepare(self) -> None:
        """
        Refuse to measure code other than this tree's, then set this
        process up before it starts any child.
        """
        stale = installedDiffers()
        if stale:
            raise SystemExit(
                f"bench: the venv's zaiproxy is not this tree's ({', '.join(stale[:5])} differ): "
                f"pip install . first (twistd runs the installed copy)"
            )
        if self.harness.plan.tool == "wrk" and shutil.which("wrk") is None:
            raise SystemExit("bench: wrk is not installed (apt-get install wrk), or use --load python")
        if not Path(TWISTD).exists():
            raise SystemExit(f"bench: {TWISTD} not found; install the project in this interpreter's venv")
        cpus = self.harness.cpus
        if cpus.load is not None:
            # This process and its clients share the load generator's CPU.
            os.sched_setaffinity(0, {cpus.load})
        else:
            self.harness.problem("fewer than 2 CPUs (or no taskset): nothing pinned, CPU figures are mixed")
        # Children inherit it: 1,000 streams need 2,000+ fds in the proxy.
        raiseNoFile()
        # A SIGTERM must still run the finally that stops the children.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    def info(self) -> RunInfo:
        return runInfo(self.harness, self.command, self.started, self.facts, self.treeAtStart, self.env)

    def write(self, markdown: str, data: Any) -> Path:
        """
        Print the report, and write it and the raw figures to the out dir.
        """
        path = self.out / f"{self.name}-{self.stamp}.md"
        path.write_text(markdown)
        (self.out / f"{self.name}-{self.stamp}.json").write_text(
            json.dumps(toJson(data), indent=2, default=str)
        )
        print(markdown)
        self.harness.say(f"report written to {path}")
        return path


def runInfo(
    harness: Harness,
    command: str,
    started: float,
    facts: dict[str, str],
    treeStart: dict[str, str],
    env: dict[str, str],
) -> RunInfo:
    """
    What a report says about the run of C{harness} besides its figures,
    with every log it kept read back.
    """
    logs = tuple(checkLog(name, path, harness.expected499[name]) for name, path in harness.logs.items())
    return RunInfo(
        command=command,
        elapsed=time.monotonic() - started,
        facts=facts,
        treeStart=treeStart,
        treeEnd=treeState(),
        cpus=harness.cpus,
        plan=harness.plan,
        env=env,
        logs=logs,
        problems=tuple(harness.problems),
        quietWaits=harness.quietWaits,
    )


def toJson(data: Any) -> Any:
    """
    attrs instances as dicts (recursively), for the raw JSON.
    """
    if attrs.has(type(data)):
        return {k: toJson(v) for k, v in attrs.asdict(data, recurse=False).items()}
    if isinstance(data, dict):
        return {str(k): toJson(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [toJson(v) for v in data]
    return data


@attrs.frozen
class LogCheck:
    """
    One process's log read back: access-log statuses, warn/error lines,
    and the problems they make.
    """

    name: str
    path: Path
    statuses: dict[str, int]
    bad: tuple[str, ...]
    expected499: int
    problems: tuple[str, ...]


def checkLog(name: str, path: Path, expected499: int) -> LogCheck:
    """
    A proxy's log: statuses other than 200 and more 499s than the load's
    end-of-run disconnects explain are problems; any other process's log:
    tracebacks and errors are.
    """
    statuses: Counter[str] = Counter()
    bad: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    proxy = name.startswith("proxy")
    for line in text.splitlines():
        access = re.search(r"\[zaiproxy\.(?:front\.)?access#\w+\] \S+ \S+ (\d{3}) ", line)
        if access:
            statuses[access.group(1)] += 1
        elif re.search(
            r"#(warn|error|critical)\]|Traceback|Unhandled" if proxy else r"Traceback|#error|#critical", line
        ):
            bad.append(line.strip())
    problems = []
    if set(statuses) - {"200", "499"}:
        problems.append(f"{name}: non-200 statuses in the access log: {dict(statuses)}")
    if statuses["499"] > expected499:
        problems.append(f"{name}: {statuses['499']} requests logged as 499 (client gone), over {expected499}")
    if bad:
        problems.append(f"{name}: {len(bad)} warn/error lines in its log")
    return LogCheck(name, path, dict(statuses), tuple(bad), expected499, tuple(problems))


@attrs.frozen
class RunInfo:
    """
    What every report says about its run besides its figures.
    """

    command: str
    elapsed: float
    facts: dict[str, str]
    treeStart: dict[str, str]
    treeEnd: dict[str, str]
    cpus: Cpus
    plan: Plan
    env: dict[str, str]
    logs: tuple[LogCheck, ...]
    problems: tuple[str, ...]
    quietWaits: int

    @property
    def allProblems(self) -> list[str]:
        found = list(self.problems) + [p for log in self.logs for p in log.problems]
        if self.treeEnd != self.treeStart:
            found.append(
                f"the code changed during the run: {self.treeStart} at the start, {self.treeEnd} at the end"
            )
        return found


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machineFacts() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    script = "import sys, twisted, treq; print(sys.version.split()[0], twisted.__version__, treq.__version__)"
    versions = _output([PYTHON, "-c", script]).split()
    versions += ["?"] * (3 - len(versions))
    wrk = _output(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0] if shutil.which("wrk") else "no wrk"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": versions[0],
        "twisted": versions[1],
        "treq": versions[2],
        "wrk": wrk,
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def installedDiffers() -> list[str]:
    """
    The files of zaiproxy/ that the interpreter's installed copy (what
    twistd imports) does not hold as they are in this tree.
    """
    try:
        done = subprocess.run(
            [PYTHON, "-c", "import zaiproxy; print(zaiproxy.__file__)"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return ["(zaiproxy cannot be imported)"]
    if done.returncode != 0:
        return ["(zaiproxy cannot be imported)"]
    installed = Path(done.stdout.strip()).parent
    tree = ROOT / "zaiproxy"
    if installed.resolve() == tree.resolve():
        return []
    differ = []
    for file in sorted(tree.rglob("*.py")):
        relative = file.relative_to(tree)
        other = installed / relative
        if not other.exists() or other.read_bytes() != file.read_bytes():
            differ.append(str(Path("zaiproxy") / relative))
    return differ


def treeState() -> dict[str, str]:
    """
    Which proxy code ran: the commit, and a digest of uncommitted changes
    under zaiproxy/.
    """

    def git(*argv: str) -> bytes:
        try:
            return subprocess.run(
                ["git", "--no-optional-locks", *argv], capture_output=True, timeout=20, cwd=ROOT
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return b""

    changed = git("status", "--porcelain", "--", "zaiproxy").decode().splitlines()
    digest = hashlib.sha256(git("diff", "HEAD", "--", "zaiproxy"))
    for line in sorted(changed):
        if line.startswith("??"):
            path = ROOT / line[3:].strip()
            for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
                with contextlib.suppress(OSError):
                    digest.update(file.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD").decode().strip() or "?",
        "changed": ", ".join(line[3:].strip() for line in changed) or "none",
        "digest": digest.hexdigest()[:12] if changed else "clean",
    }
