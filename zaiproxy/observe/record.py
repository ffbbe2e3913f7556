# -*- test-case-name: tests.test_record -*-
"""
One request's record: filled in while the request is in flight
(L{Exchange}), frozen when it ends (L{Record}), then handed to the reporter
(L{zaiproxy.observe.reporter}), the one door to metrics, the access log
and the ledger.

Nothing here writes anywhere; these are values.
"""

from __future__ import annotations

import mmap
import os
import re
from typing import IO

import attrs

from zaiproxy.dialects import Dialect
from zaiproxy.dialects.usage import Usage

__all__ = [
    "CLIENT_CLOSED",
    "MAX_LOGGED_PATH",
    "Billed",
    "Exchange",
    "Record",
    "loggedPath",
    "newRequestId",
    "sniffModel",
]

#: The status recorded when the client left before the response ended
#: (nginx's convention), so client disconnects never look like upstream
#: errors or successes.
CLIENT_CLOSED = 499

# The first "model": "<name>" pair. The model key comes before the messages
# in Claude Code's bodies; in the openai SDK's it comes after them, but
# message contents and tool arguments are JSON strings, so their quotes are
# escaped and cannot match.
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


def sniffModel(content: IO[bytes]) -> str | None:
    """
    The request's C{model}, found without parsing the whole JSON body.

    C{json.loads} costs 3 ms per MB on the reactor thread; this scan costs
    about 0.01 ms for a typical 15 kB body.
    """
    getbuffer = getattr(content, "getbuffer", None)
    try:
        if getbuffer is not None:
            with getbuffer() as view:
                match = _MODEL.search(view)
                return match.group(1).decode("utf-8", "replace") if match else None
        content.seek(0, 2)
        if content.tell() == 0:
            return None
        with mmap.mmap(content.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            match = _MODEL.search(mapped)
            return match.group(1).decode("utf-8", "replace") if match else None
    except (OSError, ValueError):
        return None
    finally:
        if getbuffer is None:
            content.seek(0)


#: A refused path is logged up to this many characters.
MAX_LOGGED_PATH = 200


def newRequestId() -> str:
    """
    A new request id: 16 hex digits, random (64 bits: no two requests of a
    year's traffic share one, and it says nothing about the request).
    """
    return os.urandom(8).hex()


def loggedPath(uri: bytes) -> str:
    """
    A request target as an access-log line may show it: the path alone
    (a query string can carry a key: C{?key=...}), every byte outside
    printable ASCII percent-encoded (so a log line cannot be forged with a
    newline or fool a terminal), and at most L{MAX_LOGGED_PATH} characters.
    """
    path = uri.split(b"?", 1)[0]
    pieces = [_SHOWN[byte] for byte in path[:MAX_LOGGED_PATH]]
    if sum(map(len, pieces)) <= MAX_LOGGED_PATH and len(path) <= MAX_LOGGED_PATH:
        return "".join(pieces)
    shown, room = [], MAX_LOGGED_PATH - 3
    for piece in pieces:  # whole escapes only
        room -= len(piece)
        if room < 0:
            break
        shown.append(piece)
    return "".join(shown) + "..."


_SHOWN = [chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in range(256)]


@attrs.frozen
class Billed:
    """
    What one model answer is billed: its tokens, where the numbers came
    from, and what they cost by the configured prices.

    @ivar source: C{reported} (Z.AI's own numbers), C{estimated} (counted
        here; Z.AI sent none) or C{partial} (counted here; the answer was
        cut short).
    @ivar model: the requested model as a bounded label.
    @ivar costs: USD by direction, as L{Usage.directions} names them.
    @ivar outputRate: output tokens per second of generation, if known.
    """

    usage: Usage
    source: str
    model: str
    responseModel: str | None
    tier: str
    costs: dict[str, float]
    outputRate: float | None = None

    @property
    def cost(self) -> float:
        return sum(self.costs.values())


@attrs.define
class Exchange:
    """
    What is known about one request, filled in as it goes by the resource
    that makes it and the relay that runs it; L{freeze} ends it.

    @ivar errorType: the last kind of failure, with the C{error_type}
        vocabulary of the Go zai-proxy (or C{unauthorized}).
    @ivar upstreamErrors: every upstream failure, one per attempt that
        failed (a retried 429 counts, as it did in the Go zai-proxy).
    @ivar zaiErrors: Z.AI business errors seen, as (class, code).
    @ivar retries: the reason of each retry.
    @ivar client: the peer address.
    @ivar keyName: the name of the client key presented (C{unauthorized}
        when refused for it); L{None} while no client keys are configured.
    @ivar authFailure: why a client key was refused (C{missing},
        C{unknown}).
    @ivar path: the path as L{loggedPath} shows it, for a request refused
        without a route (its route label, C{unknown} or C{invalid}, would
        not say what was asked for); L{None} otherwise.
    @ivar requestId: the proxy's id of the request (L{newRequestId}), sent
        to the client as C{X-Zaiproxy-Request-Id}, so a log line, a record
        and a user's report join up.
    @ivar stream: the answer was an event stream.
    @ivar attempts: calls made to Z.AI for this request (retries included).
    @ivar zaiRequestId: Z.AI's own id of the answer, when it sent one.
    """

    method: str
    route: str
    startedAt: float
    dialect: Dialect | None = None
    requestBytes: int = 0
    status: int = 0
    responseBytes: int = 0
    firstByteAt: float | None = None
    model: str | None = None
    errorType: str | None = None
    client: str = "-"
    keyName: str | None = None
    queueWait: float = 0.0
    path: str | None = None
    upstreamErrors: tuple[str, ...] = ()
    zaiErrors: tuple[tuple[str, str | None], ...] = ()
    retries: tuple[str, ...] = ()
    authFailure: str | None = None
    requestId: str = ""
    stream: bool = False
    attempts: int = 0
    zaiRequestId: str | None = None

    @property
    def clientLabel(self) -> str:
        """
        Who the client is, for the access log and the admission queue: its
        key's name when client keys are configured, else its address.
        """
        return self.keyName or self.client

    def failed(self, errorType: str) -> None:
        """
        An upstream failure: the request's error, counted once.
        """
        self.errorType = errorType
        self.upstreamErrors += (errorType,)

    def freeze(self, endedAt: float, billed: Billed | None = None) -> Record:
        """
        The record of this request, ended at C{endedAt}.
        """
        firstByteAt = self.firstByteAt
        return Record(
            method=self.method,
            route=self.route,
            status=self.status,
            startedAt=self.startedAt,
            duration=endedAt - self.startedAt,
            ttfb=None if firstByteAt is None else firstByteAt - self.startedAt,
            requestBytes=self.requestBytes,
            responseBytes=self.responseBytes,
            dialect=self.dialect,
            model=self.model,
            errorType=self.errorType,
            client=self.client,
            keyName=self.keyName,
            queueWait=self.queueWait,
            path=self.path,
            upstreamErrors=self.upstreamErrors,
            zaiErrors=self.zaiErrors,
            retries=self.retries,
            authFailure=self.authFailure,
            requestId=self.requestId,
            stream=self.stream,
            attempts=self.attempts,
            zaiRequestId=self.zaiRequestId,
            billed=billed,
        )


@attrs.frozen
class Record:
    """
    One finished request, as metrics, the access log and the ledger see it.

    @ivar duration: seconds from the request to the end of its response.
    @ivar ttfb: seconds to the first byte of the upstream's answer, if one
        arrived.
    @ivar billed: the answer's tokens and cost; L{None} for anything that
        is not a model answer that began.

    The other fields are L{Exchange}'s.
    """

    method: str
    route: str
    status: int
    startedAt: float
    duration: float
    ttfb: float | None = None
    requestBytes: int = 0
    responseBytes: int = 0
    dialect: Dialect | None = None
    model: str | None = None
    errorType: str | None = None
    client: str = "-"
    keyName: str | None = None
    queueWait: float = 0.0
    path: str | None = None
    upstreamErrors: tuple[str, ...] = ()
    zaiErrors: tuple[tuple[str, str | None], ...] = ()
    retries: tuple[str, ...] = ()
    authFailure: str | None = None
    requestId: str = ""
    stream: bool = False
    attempts: int = 0
    zaiRequestId: str | None = None
    billed: Billed | None = None

    @property
    def clientLabel(self) -> str:
        return self.keyName or self.client
