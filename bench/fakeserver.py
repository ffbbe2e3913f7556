"""
The fake Z.AI as a benchmark upstream: the C{zaiproxy-fake} tap's own
options and service, minus the two things that make it a test double.

The fake writes an access-log line for every request and keeps every
request it ever received (L{FakeZai.received}) so tests can inspect them.
Under load that record grows by ~2 kB a request (150 MB after 45,000
requests), and the garbage collector's full passes over it stall the fake
for up to ~100 ms: a p99 that measures the fake, not the proxy. Here the
record is emptied every second and the access log is off; the answers are
byte-for-byte the same.

    python bench/fakeserver.py --listen tcp:9999:interface=127.0.0.1 \\
        --api-key bench-key --scenario "events=5"
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.python import usage

from zaiproxy.fake.server import FakeZai
from zaiproxy.fake.tap import Options, makeService

# The global reactor, typed loosely: its interfaces are not in its type.
reactor: Any = _reactor


def main(argv: list[str]) -> int:
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"fakeserver: {e}", file=sys.stderr)
        return 2
    service: Any = makeService(options)
    fakes: list[FakeZai] = []
    for child in service:
        site = child.factory
        site.log = lambda request: None
        site.noisy = False
        fakes.append(site.resource)

    def forget() -> None:
        for fake in fakes:
            del fake.received[:]

    task.LoopingCall(forget).start(1.0, now=False)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    print("fakeserver: listening on " + " ".join(options["listen"]), flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
