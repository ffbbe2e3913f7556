"""
C{/api/events} in memory: the frames a viewer gets, the variant filter,
heartbeats, and viewers dropped when they leave, stop reading, or the
proxy stops.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel

from zaiproxy.dashboard.events import HEARTBEAT_SECONDS, MAX_UNREAD_BYTES, EventsResource
from zaiproxy.dashboard.live import GaugeReading, LiveWindow, Sampler


class Stream:
    """
    A real twisted.web request on a transport in memory, and what it got.
    """

    def __init__(self, args: dict[bytes, list[bytes]] | None = None) -> None:
        self.channel = DummyChannel()
        self.request = Request(self.channel)
        self.request.method = b"GET"
        self.request.uri = self.request.path = b"/api/events"
        # HTTP/1.0: no chunked framing around the events.
        self.request.clientproto = b"HTTP/1.0"
        self.request.args = args or {}

    @property
    def frames(self) -> list[Any]:
        raw = self.channel.transport.written.getvalue()
        body = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
        found: list[Any] = []
        for line in body.split(b"\n"):
            if line.startswith(b"data: "):
                found.append(json.loads(line[len(b"data: ") :]))
            elif line.startswith(b": heartbeat"):
                found.append("heartbeat")
        return found


def gauges() -> GaugeReading:
    return (0, 10, 1.0, 2.0, None)


def setUp() -> tuple[Clock, Sampler, EventsResource]:
    clock = Clock()
    sampler = Sampler(clock, 5.0, "production", LiveWindow(), gauges)
    sampler.start()
    return clock, sampler, EventsResource(sampler, ["production"])


def test_framesAndHeartbeats() -> None:
    """
    A connected event, then a metrics event per point, and a heartbeat
    every 30 seconds.
    """
    clock, sampler, events = setUp()
    stream = Stream()
    assert events.render(stream.request) == NOT_DONE_YET
    assert stream.request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert stream.request.responseHeaders.getRawHeaders(b"x-accel-buffering") == [b"no"]
    clock.pump([5.0] * int(HEARTBEAT_SECONDS / 5))
    frames = stream.frames
    assert frames[0] == {"type": "connected", "scrape_interval": 5.0, "variants": ["production"]}
    assert [f if f == "heartbeat" else f["type"] for f in frames[1:]] == ["metrics"] * 5 + [
        "heartbeat",
        "metrics",
    ]
    assert frames[-1]["data"]["timestamp"] == 30_000
    sampler.stop()


def test_variantFilter() -> None:
    """
    A viewer of another variant gets no points of this one.
    """
    clock, sampler, events = setUp()
    mine, theirs = Stream({b"variant": [b"production"]}), Stream({b"variant": [b"canary"]})
    events.render(mine.request)
    events.render(theirs.request)
    clock.advance(5)
    assert [f["type"] for f in mine.frames] == ["connected", "metrics"]
    assert [f["type"] for f in theirs.frames] == ["connected"]
    sampler.stop()


def test_viewerThatLeftIsForgotten() -> None:
    clock, sampler, events = setUp()
    stream = Stream()
    events.render(stream.request)
    assert len(events) == 1
    stream.request.connectionLost(Failure(ConnectionError("gone")))
    assert len(events) == 0
    clock.advance(5)
    sampler.stop()


def test_viewerThatStoppedReadingIsDropped() -> None:
    """
    Bytes piling up unread past the bound end the stream.
    """
    clock, sampler, events = setUp()
    stream = Stream()
    events.render(stream.request)
    stream.channel.transport.dataBuffer = b"x" * (MAX_UNREAD_BYTES + 1)  # type: ignore[attr-defined]
    clock.advance(5)
    assert len(events) == 0 and stream.request.finished
    sampler.stop()


def test_closeAll() -> None:
    clock, sampler, events = setUp()
    streams = [Stream(), Stream()]
    for stream in streams:
        events.render(stream.request)
    events.closeAll()
    assert len(events) == 0 and all(s.request.finished for s in streams)
    clock.advance(5)
    sampler.stop()


def test_badVariant() -> None:
    _, sampler, events = setUp()
    stream = Stream({b"variant": [b"v" * 65]})
    body = events.render(stream.request)
    assert stream.request.code == 400 and b"variant is longer than 64 characters" in body
    sampler.stop()
