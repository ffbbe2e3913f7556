"""
Streaming clients for bench.memory, run as a separate process pinned to
the load generator's CPU so that their work never lands on the proxy's core.

C{many}: open N concurrent SSE streams and hold them, to measure what an
open stream costs the proxy in memory. It reports (as JSON lines on stdout)
when every stream has received its first event, so the caller reads RSS at
the moment all N are live, and then how many completed intact: a memory
figure from streams that silently failed would be worthless.

C{one}: read one large stream as fast as possible, or at a fixed rate to
show that a slow reader pauses the upstream instead of filling the proxy's
memory.

Both speak just enough HTTP/1.1 (one request, chunked or close-delimited
body) to count bytes and events exactly, with no client library overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from typing import Any

BODY_TEMPLATE = {
    "model": "glm-4.7",
    "max_tokens": 1024,
    "stream": True,
    "messages": [{"role": "user", "content": "Say hello, slowly."}],
}


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"type": kind, "t": time.monotonic(), **fields}), flush=True)


def raiseNoFile(want: int = 65536) -> int:
    """
    Lift the open-file limit: 1,000 streams need 1,000 sockets here.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def requestBytes(path: str, port: int, scenario: str, apiKey: str | None) -> bytes:
    body = json.dumps(BODY_TEMPLATE).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        "anthropic-version: 2023-06-01",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if scenario:
        lines.append(f"x-fake-scenario: {scenario}")
    if apiKey:
        lines.append(f"x-api-key: {apiKey}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class StreamFailed(Exception):
    pass


async def oneStream(
    index: int,
    port: int,
    request: bytes,
    gate: asyncio.Semaphore,
    firstEvent: asyncio.Event,
    state: dict[str, Any],
    expectedDeltas: int,
) -> str:
    """
    Hold one stream to its end; return "ok" or the reason it failed.
    """
    writer = None
    try:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise StreamFailed(f"status {status}")
            chunked = b"transfer-encoding: chunked" in head.lower()
            body = bytearray()
            # The first event: read until a whole event has arrived.
            while b"\n\n" not in body:
                data = await readPiece(reader, chunked)
                if not data:
                    raise StreamFailed("ended before the first event")
                body += data
        state["streaming"] += 1
        if state["streaming"] == state["count"]:
            firstEvent.set()
        while True:
            data = await readPiece(reader, chunked)
            if not data:
                break
            body += data
        deltas = body.count(b"event: content_block_delta")
        if b"event: message_stop" not in body:
            raise StreamFailed("no message_stop")
        if expectedDeltas and deltas != expectedDeltas:
            raise StreamFailed(f"{deltas} deltas, expected {expectedDeltas}")
        if b"event: error" in body:
            raise StreamFailed("error event")
        return "ok"
    except StreamFailed as e:
        return str(e)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        return type(e).__name__
    finally:
        if writer is not None:
            writer.close()


async def readPiece(reader: asyncio.StreamReader, chunked: bool) -> bytes:
    """
    The next piece of the body, or b"" at its end.
    """
    if not chunked:
        return await reader.read(65536)
    line = await reader.readuntil(b"\r\n")
    size = int(line.split(b";", 1)[0].strip(), 16)
    if size == 0:
        await reader.readuntil(b"\r\n")
        return b""
    data = await reader.readexactly(size)
    await reader.readexactly(2)
    return data


async def many(args: argparse.Namespace) -> int:
    request = requestBytes(args.path, args.port, args.scenario, args.api_key)
    gate = asyncio.Semaphore(args.connect_concurrency)
    firstEvent = asyncio.Event()
    state: dict[str, Any] = {"streaming": 0, "count": args.count}
    started = time.monotonic()
    tasks = [
        asyncio.create_task(oneStream(i, args.port, request, gate, firstEvent, state, args.expect_deltas))
        for i in range(args.count)
    ]
    everything: asyncio.Future[list[str]] = asyncio.gather(*tasks)
    waitFirst: asyncio.Future[Any] = asyncio.create_task(firstEvent.wait())
    waiting: set[asyncio.Future[Any]] = {waitFirst, everything}
    done, _ = await asyncio.wait(waiting, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED)
    if waitFirst in done:
        emit("all-streaming", count=args.count, seconds=time.monotonic() - started)
    else:
        emit("not-all-streaming", streaming=state["streaming"], count=args.count)
        waitFirst.cancel()
    try:
        outcomes = await asyncio.wait_for(everything, max(1.0, args.timeout - (time.monotonic() - started)))
    except asyncio.TimeoutError:
        outcomes = ["timeout" if not t.done() or t.cancelled() else t.result() for t in tasks]
    failures: dict[str, int] = {}
    for outcome in outcomes:
        if outcome != "ok":
            failures[outcome] = failures.get(outcome, 0) + 1
    emit(
        "done",
        count=args.count,
        ok=sum(1 for o in outcomes if o == "ok"),
        failures=failures,
        seconds=time.monotonic() - started,
    )
    return 0


def one(args: argparse.Namespace) -> int:
    """
    Read one stream with a blocking socket (nothing else to do meanwhile).
    """
    request = requestBytes(args.path, args.port, args.scenario, args.api_key)
    sock = socket.create_connection(("127.0.0.1", args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    sock.sendall(request)
    total = 0
    tail = b""
    firstAt: float | None = None
    recv = sock.recv
    rate = args.rate
    while True:
        data = recv(262144)
        if not data:
            break
        if firstAt is None:
            firstAt = time.monotonic()
            emit("first-byte", seconds=firstAt - started)
        total += len(data)
        tail = (tail + data)[-4096:] if len(data) < 4096 else data[-4096:]
        if rate:
            # Sleep until this many bytes are due at the target rate.
            ahead = started + total / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    elapsed = time.monotonic() - started
    sock.close()
    complete = b"event: message_stop" in tail and tail.endswith(b"0\r\n\r\n")
    emit("done", bytes=total, seconds=elapsed, complete=complete, mbps=total / elapsed / 1e6)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("many", "one"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--path", default="/v1/messages")
        p.add_argument("--scenario", default="")
        p.add_argument("--api-key", default=None, help="send x-api-key (direct to the fake)")
    sub.choices["many"].add_argument("--count", type=int, default=1000)
    sub.choices["many"].add_argument("--connect-concurrency", type=int, default=100)
    sub.choices["many"].add_argument("--expect-deltas", type=int, default=0)
    sub.choices["many"].add_argument("--timeout", type=float, default=120.0)
    sub.choices["one"].add_argument(
        "--rate", type=float, default=0.0, help="bytes/s; 0 = as fast as possible"
    )
    args = parser.parse_args()
    raiseNoFile()
    if args.mode == "many":
        return asyncio.run(many(args))
    return one(args)


if __name__ == "__main__":
    sys.exit(main())
