"""
Load generators for the harness: wrk when it is installed (one thread, a
Lua hook that reports its percentiles as JSON), else a pure-Python client
of keep-alive connections in threads, much slower but enough to show that
everything answers (the test suite's smoke run uses it where wrk is absent).

Latencies are in microseconds, as wrk gives them.
"""

from __future__ import annotations

import http.client
import json
import queue
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

#: The upstream key the fake expects, sent by requests made direct to it.
API_KEY = "bench-key"


class BenchError(Exception):
    """
    The benchmark cannot go on; the message says why.
    """


def requestBody(stream: bool, size: int = 1024) -> bytes:
    """
    An Anthropic Messages request of about C{size} bytes, shaped like Claude
    Code's (model first, a system prompt, one user turn).
    """
    doc: dict[str, Any] = {
        "model": "glm-4.7",
        "max_tokens": 1024,
        "system": "You are a helpful coding assistant.",
        "messages": [{"role": "user", "content": ""}],
        "stream": stream,
    }
    filler = size - len(json.dumps(doc))
    doc["messages"][0]["content"] = ("Please review this function. " * (filler // 29 + 1))[: max(filler, 0)]
    return json.dumps(doc).encode()


@attrs.frozen
class Load:
    """
    The request every connection sends, again and again.
    """

    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def post(cls, stream: bool = False, scenario: str | None = None) -> Load:
        """
        The ~1 KB Messages POST, answered in JSON or (C{stream}) with the
        fake's default short SSE stream, or as C{scenario} says.
        """
        extra = (("x-fake-scenario", scenario),) if scenario else ()
        return cls(requestBody(stream), extra)

    def allHeaders(self) -> dict[str, str]:
        base = {"Content-Type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": API_KEY}
        return {**base, **dict(self.headers)}


@attrs.frozen
class Plan:
    """
    How long each load run lasts and what drives it; C{tool} is C{wrk} or
    C{python}.
    """

    duration: float = 10.0
    warmup: float = 2.0
    retries: int = 1
    quietWait: float = 60.0
    tool: str = "wrk"


def onCpu(cpu: int | None, argv: list[str]) -> list[str]:
    """
    C{argv} pinned to C{cpu} with taskset, or as it is when not pinning.
    """
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def chooseTool(requested: str) -> str:
    """
    C{auto}: wrk if it is installed, else the Python client.
    """
    if requested == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    return requested


@attrs.frozen
class LoadResult:
    """
    One load run: requests completed, errors by kind, latency percentiles
    (us), and the CPU seconds the load generator itself spent.
    """

    tool: str
    requests: int
    seconds: float
    bytes: int
    connect: int
    read: int
    write: int
    status: int
    timeout: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float
    loadCpu: float = 0.0
    errorLines: tuple[str, ...] = ()

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.connect + self.read + self.write + self.status + self.timeout


def runLoad(url: str, connections: int, seconds: float, load: Load, tool: str, cpu: int | None) -> LoadResult:
    """
    One load run, waited for, with the generator's CPU time (wrk's arrives
    in RUSAGE_CHILDREN when it is reaped; the Python client's is ours).
    """
    childrenBefore = resource.getrusage(resource.RUSAGE_CHILDREN)
    ownBefore = time.process_time()
    if tool == "wrk":
        result = runWrk(url, connections, seconds, load, cpu)
    else:
        result = pythonLoad(url, connections, seconds, load)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = after.ru_utime - childrenBefore.ru_utime + after.ru_stime - childrenBefore.ru_stime
    return attrs.evolve(result, loadCpu=spent + time.process_time() - ownBefore)


# -- wrk ----------------------------------------------------------------------------

WRK_SCRIPT = """\
-- Written by bench/load.py: a fixed JSON POST, percentiles as JSON.
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
%(headers)s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,' ..
    '"write":%%d,"status":%%d,"timeout":%%d,"p50":%%d,"p90":%%d,"p99":%%d,"p999":%%d,' ..
    '"max":%%d,"mean":%%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
"""


def wrkScript(load: Load) -> str:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in load.allHeaders().items())
    return WRK_SCRIPT % {"body": load.body.decode(), "headers": headers}


def runWrk(url: str, connections: int, seconds: float, load: Load, cpu: int | None) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(wrkScript(load))
        return wrkResult(startWrk(url, connections, seconds, script, cpu), seconds + 60)


def startWrk(
    url: str, connections: int, seconds: float, script: Path, cpu: int | None
) -> subprocess.Popen[str]:
    """
    Start one wrk run (on C{cpu} when given); L{wrkResult} collects it.
    """
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script)]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    return subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrkResult(proc: subprocess.Popen[str], timeout: float) -> LoadResult:
    """
    The Lua C{done()} hook's figures plus the error lines of wrk's text.
    """
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError("wrk did not finish in time") from None
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {stderr or stdout}")
    match = re.search(r"^WRKJSON (\{.*\})$", stdout, re.MULTILINE)
    if match is None:
        raise BenchError(f"no WRKJSON line in wrk's output:\n{stdout}")
    raw: dict[str, Any] = json.loads(match.group(1))
    errorLines = tuple(
        line.strip() for line in stdout.splitlines() if line.strip().startswith(("Non-2xx", "Socket errors"))
    )
    seconds = raw.pop("duration_us") / 1e6
    return LoadResult(tool="wrk", seconds=seconds, errorLines=errorLines, **raw)


# -- the Python client ----------------------------------------------------------------


@attrs.define
class _Tally:
    latencies: list[float] = attrs.Factory(list)
    bytes: int = 0
    connect: int = 0
    read: int = 0
    status: int = 0
    lines: set[str] = attrs.Factory(set)


def _client(host: str, port: int, path: str, load: Load, deadline: float, tally: _Tally) -> None:
    """
    One keep-alive connection sending C{load} until C{deadline}; reconnect
    after an error, as wrk does.
    """
    headers = load.allHeaders()
    conn: http.client.HTTPConnection | None = None
    while time.monotonic() < deadline:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            try:
                conn.connect()
            except OSError as e:
                tally.connect += 1
                tally.lines.add(f"connect: {e}")
                conn = None
                time.sleep(0.01)
                continue
        started = time.perf_counter()
        try:
            conn.request("POST", path, body=load.body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            tally.read += 1
            tally.lines.add(f"read: {type(e).__name__}")
            conn.close()
            conn = None
            continue
        tally.latencies.append((time.perf_counter() - started) * 1e6)
        tally.bytes += len(data)
        if not 200 <= response.status < 300:
            tally.status += 1
            tally.lines.add(f"Non-2xx or 3xx responses: status {response.status}")
        if response.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def pythonLoad(url: str, connections: int, seconds: float, load: Load) -> LoadResult:
    """
    C{connections} threads, each a keep-alive connection, for C{seconds}.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tallies = [_Tally() for _ in range(connections)]
    started = time.monotonic()
    deadline = started + seconds
    threads = [
        threading.Thread(
            target=_client, args=(host, port, parts.path or "/", load, deadline, tally), daemon=True
        )
        for tally in tallies
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - started
    latencies = sorted(x for t in tallies for x in t.latencies)

    def at(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] if latencies else 0.0

    return LoadResult(
        tool="python",
        requests=len(latencies),
        seconds=elapsed,
        bytes=sum(t.bytes for t in tallies),
        connect=sum(t.connect for t in tallies),
        read=sum(t.read for t in tallies),
        write=0,
        status=sum(t.status for t in tallies),
        timeout=sum(1 for thread in threads if thread.is_alive()),
        p50=at(50),
        p90=at(90),
        p99=at(99),
        p999=at(99.9),
        max=latencies[-1] if latencies else 0.0,
        mean=sum(latencies) / len(latencies) if latencies else 0.0,
        errorLines=tuple(sorted({line for t in tallies for line in t.lines})),
    )


# -- streaming clients ------------------------------------------------------------


def runStreamClient(
    argv: list[str], timeout: float, cpu: int | None, onLine: Callable[[dict[str, Any]], None]
) -> None:
    """
    Run bench/streamclient.py on C{cpu}, handing each JSON line it prints
    to C{onLine} as it arrives.
    """
    command = onCpu(cpu, [sys.executable, str(Path(__file__).with_name("streamclient.py")), *argv])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in _linesUntil(proc, time.monotonic() + timeout, timeout):
            if line.startswith("{"):
                onLine(json.loads(line))
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        stderr = proc.stderr.read() if proc.stderr else ""
        raise BenchError(f"stream client failed ({proc.returncode}): {stderr[-2000:]}")


def _linesUntil(proc: subprocess.Popen[str], deadline: float, timeout: float) -> Iterator[str]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"stream client still running after {timeout:g} s") from None
        if line is None:
            return
        yield line


def streamRequest(port: int, path: str, scenario: str, withKey: bool, body: bytes) -> tuple[float, bool]:
    """
    One streaming request on a new connection: the seconds from sending it
    to the first SSE event's bytes, and whether the stream ended intact.
    """
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "anthropic-version: 2023-06-01",
        f"x-fake-scenario: {scenario}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *([f"x-api-key: {API_KEY}"] if withKey else []),
    ]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        first: float | None = None
        started = time.perf_counter()
        sock.sendall(request)
        while data := sock.recv(65536):
            buf += data
            if first is None:
                end = buf.find(b"\r\n\r\n")
                if end >= 0 and (buf.find(b"event:", end) >= 0 or buf.find(b"data:", end) >= 0):
                    first = time.perf_counter()
    ok = buf.startswith(b"HTTP/1.1 200") and b"event: message_stop" in buf
    return (first - started if first is not None else float("nan")), ok
