"""
Tests for L{zaiproxy.relay.forward}: the seed's retry and error-class contract,
row by row, deterministically: the real fake Z.AI behind treq's in-memory
agent, every wait on a L{task.Clock}, nothing sleeps.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from support.doubles import MemoryUpstream, RequestDouble
from treq.testing import RequestTraversalAgent
from twisted.internet import task

from zaiproxy.dialects import Dialect, errorBody
from zaiproxy.fake import FakeZai, parseScenario
from zaiproxy.limits.limiter import LimiterSettings, RateLimiter
from zaiproxy.observe.metrics import Metrics
from zaiproxy.observe.record import CLIENT_CLOSED
from zaiproxy.observe.reporter import Reporter
from zaiproxy.relay.context import RelayContext
from zaiproxy.relay.forward import Answer, Forwarder, Gone, PassOn, Refusal, Stream, Trail
from zaiproxy.relay.routes import Forward
from zaiproxy.relay.upstream import DiscardBody

KEY = "upstream-key"
MESSAGES = Forward("/v1/messages", Dialect.anthropic, b"http://zai.test/api/anthropic/v1/messages")
CHAT = Forward("/v1/chat/completions", Dialect.openai, b"http://zai.test/api/coding/paas/v4/chat/completions")
BODY = b'{"model":"glm-4.7","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Rig:
    """
    A forwarder's world: clock, fake, limiter, metrics.
    """

    def __init__(self, maxRetries: int = 3, quotaHold: bool = True, **limits: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.fake = FakeZai(self.clock, apiKey=KEY)
        self.agent = RequestTraversalAgent(self.fake)
        self.upstream = MemoryUpstream(self.agent)
        self.metrics = Metrics("test", "0")
        settings: dict[str, Any] = dict(
            initial=100.0,
            minimum=1.0,
            maximum=1000.0,
            window=30.0,
            alpha=0.3,
            margin=0.02,
            probeInterval=10,
            maxWorkers=10,
            maxQueue=10,
            queueTimeout=60.0,
            stateFile=None,
            stateMaxAge=3600.0,
        )
        settings.update(limits, quotaHold=quotaHold)
        self.limiter = RateLimiter(self.clock, LimiterSettings(**settings))
        self.waits: list[float] = []
        self.context = RelayContext(
            clock=self.clock,
            upstream=self.upstream,  # type: ignore[arg-type]
            reporter=Reporter(self.metrics),
            apiKey=KEY.encode(),
            firstByteTimeout=300.0,
            idleTimeout=120.0,
            limiter=self.limiter,
            maxRetries=maxRetries,
            jitter=lambda a, b: a,  # jitter at its lower bound, as the seed's tests forced it
        )

    def queue(self, *specs: str) -> None:
        self.fake.queue.extend(parseScenario(spec) for spec in specs)

    def pump(self) -> None:
        for _ in range(20):
            self.agent.flush()
            self.clock.advance(0)

    def forward(self, route: Forward = MESSAGES) -> tuple[Forwarder, Seen, Trail, list[Any]]:
        request = RequestDouble([b""])
        request.method = b"POST"
        request.content = io.BytesIO(BODY)
        forwarder = Forwarder(self.context, request.asRequest(), route, "source-01")
        outcome: list[Any] = []
        forwarder.start().addBoth(outcome.append)
        self.pump()
        return forwarder, Seen(outcome, route), forwarder.trail, outcome

    def advance(self, seconds: float) -> None:
        """
        Move time on, noting when attempts happen.
        """
        before = self.upstream.calls
        self.clock.advance(seconds)
        self.pump()
        if self.upstream.calls != before:
            self.waits.append(seconds)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"variant": "test", **labels})


class Seen:
    """
    What the client is told of the forwarder's answer (once there is
    one): its status, headers and error body, as the relay writes them.
    """

    def __init__(self, outcome: list[Any], route: Forward) -> None:
        self._outcome = outcome
        self._route = route

    @property
    def answer(self) -> Answer:
        [answer] = self._outcome
        assert isinstance(answer, Stream | PassOn | Refusal | Gone)
        return answer

    @property
    def responseCode(self) -> int:
        answer = self.answer
        if isinstance(answer, Stream | PassOn):
            code: int = answer.response.code
            return code
        return answer.status if isinstance(answer, Refusal) else CLIENT_CLOSED

    def header(self, name: bytes) -> list[bytes]:
        answer = self.answer
        added = [value for key, value in getattr(answer, "headers", ()) if key == name]
        if added or not isinstance(answer, PassOn):
            return added
        return list(answer.response.headers.getRawHeaders(name, []))

    def body(self) -> Any:
        answer = self.answer
        if isinstance(answer, PassOn):
            return json.loads(answer.body)
        assert isinstance(answer, Refusal)
        return json.loads(errorBody(self._route.dialect, answer.status, answer.message, answer.code))


def header(seen: Seen, name: bytes) -> list[bytes]:
    return seen.header(name)


def written(seen: Seen) -> Any:
    return seen.body()


def answeredHere(outcome: list[Any]) -> bool:
    """
    Whether the forwarder answered with an error (its own or Z.AI's)
    rather than a response to relay.
    """
    return len(outcome) == 1 and isinstance(outcome[0], PassOn | Refusal)


def test_successRelayed() -> None:
    """
    A 2xx answer goes to the relay; nothing is retried.
    """
    rig = Rig()
    rig.queue("")
    _, _, _, outcome = rig.forward()
    assert outcome[0].response.code == 200
    assert rig.upstream.calls == 1


@pytest.mark.parametrize(
    "code, waits, limiterOutcome",
    [
        ("1303", [0.5, 1.0], "frequency"),  # frequency: jittered backoff
        ("1305", [0.5, 1.0], "frequency"),
        ("1302", [1.0, 2.0], "concurrency"),  # concurrency: plain backoff
        ("1312", [0.5, 1.0], None),  # congestion: jittered, not a rate signal
        ("9999", [0.5, 1.0], "frequency"),  # unknown 429: a rate signal
    ],
)
def test_retriedThenSucceeds(code: str, waits: list[float], limiterOutcome: str | None) -> None:
    """
    A retryable 429 is retried after the backoff for its class, admitted
    again each time, until an answer comes; the limiter hears the 429s of
    the classes that concern it.
    """
    rig = Rig()
    rig.queue(f"mode=error code={code} status=429", f"mode=error code={code} status=429", "")
    forwarder, _, _, outcome = rig.forward()
    assert outcome == []
    for wait in waits:
        rig.advance(wait)
    assert outcome[0].response.code == 200
    assert rig.waits == waits
    assert rig.upstream.calls == 3
    assert forwarder.trail.retries == ("429", "429")
    assert forwarder.trail.upstreamErrors == ("429", "429")
    counts = (rig.limiter._frequency, rig.limiter._concurrency)
    assert counts == {"frequency": (2, 0), "concurrency": (0, 2), None: (0, 0)}[limiterOutcome]


def test_retriesRunOut() -> None:
    """
    After MAX_RETRIES, the last 429 goes to the client unchanged, with the
    X-Zai-* headers and a Retry-After.
    """
    rig = Rig(maxRetries=2)
    rig.queue(*["mode=error code=1303 retryAfter=2.5"] * 3)
    _, request, _, outcome = rig.forward()
    rig.advance(2.5)
    rig.advance(2.5)
    assert answeredHere(outcome)
    assert rig.upstream.calls == 3
    assert request.responseCode == 429
    assert written(request)["error"]["type"] == "1303"
    assert header(request, b"x-zai-error-class") == [b"frequency"]
    assert header(request, b"x-zai-error-code") == [b"1303"]
    assert header(request, b"retry-after") == [b"3"]


@pytest.mark.parametrize("where", ["retry_after in the body", "Retry-After header"])
def test_askedWaitWins(where: str) -> None:
    """
    Z.AI's Retry-After (header) or retry_after (body), when longer than the
    backoff, is the one wait; an upstream Retry-After reaches the client.
    """
    rig = Rig(maxRetries=1)
    spec = "mode=error code=1303 " + ("retryAfter=9" if "body" in where else "retryAfterHeader=7")
    rig.queue(spec, spec)
    _, request, _, _ = rig.forward()
    rig.advance(6.9)
    assert rig.upstream.calls == 1
    rig.advance(2.1 if "body" in where else 0.1)
    assert rig.upstream.calls == 2
    if "header" in where:
        assert header(request, b"retry-after") == [b"7"]


@pytest.mark.parametrize(
    "spec, reset",
    [
        ("mode=error code=1308 resetIn=3600", NOW + 3600),
        ("mode=error code=1310 resetIn=7200", NOW + 7200),
    ],
)
def test_quotaNeverRetriedThenHeld(spec: str, reset: float) -> None:
    """
    Quota (1308, 1310) is never retried: the client gets Z.AI's 429 with the
    reset time (read from the message text, Beijing time) and a Retry-After;
    until then further calls are answered locally, spending nothing
    upstream.
    """
    rig = Rig()
    rig.queue(spec)
    _, request, _, outcome = rig.forward()
    assert rig.upstream.calls == 1
    assert request.responseCode == 429
    assert header(request, b"x-zai-error-class") == [b"quota"]
    assert header(request, b"retry-after") == [b"%d" % (reset - NOW)]
    rig.clock.advance(100)
    _, again, _, outcome = rig.forward(CHAT)
    assert rig.upstream.calls == 1
    assert again.responseCode == 429
    assert header(again, b"retry-after") == [b"%d" % (reset - NOW - 100)]
    body = written(again)
    assert body["error"]["code"] == spec.split()[1].split("=")[1]
    assert "usage limit is reached" in body["error"]["message"]
    rig.clock.advance(reset - rig.clock.seconds())
    rig.queue("")
    _, _, _, outcome = rig.forward()
    assert outcome[0].response.code == 200


def test_quotaHoldOff() -> None:
    """
    QUOTA_HOLD=false: every call goes upstream.
    """
    rig = Rig(quotaHold=False)
    rig.queue("mode=error code=1308", "mode=error code=1308")
    rig.forward()
    rig.clock.advance(1)
    rig.forward()
    assert rig.upstream.calls == 2


def test_quotaKeepsUpstreamRetryAfter() -> None:
    """
    A quota 429 that carries Retry-After keeps it.
    """
    rig = Rig()
    rig.queue("mode=error code=1308 retryAfterHeader=42")
    _, request, _, _ = rig.forward()
    assert header(request, b"retry-after") == [b"42"]


@pytest.mark.parametrize(
    "spec, status",
    [
        ("mode=error code=1113", 429),  # no balance: configuration
        ("mode=error code=1211", 400),  # unknown model
        ("mode=error code=1261", 400),  # prompt too long
        ("mode=error code=500", 500),
        ("mode=not-found", 404),
    ],
)
def test_passThroughUnretried(spec: str, status: int) -> None:
    """
    Configuration errors and other 4xx/5xx pass through, once, unchanged.
    """
    rig = Rig()
    rig.queue(spec)
    _, request, trail, outcome = rig.forward()
    assert answeredHere(outcome)
    assert rig.upstream.calls == 1
    assert request.responseCode == status
    assert trail.retries == ()
    assert trail.upstreamErrors == (str(status),)


def test_connectionErrorsRetried() -> None:
    """
    A connection that fails before any answer is retried; when retries run
    out, 502.
    """
    rig = Rig(maxRetries=2)
    rig.upstream.refuse = 1
    rig.queue("")
    _, _, trail, outcome = rig.forward()
    rig.advance(0.5)
    assert outcome[0].response.code == 200
    assert trail.retries == ("network_error",)
    rig.upstream.refuse = 3
    _, request, _, outcome = rig.forward()
    rig.advance(0.5)
    rig.advance(1.0)
    assert answeredHere(outcome) and request.responseCode == 502


@pytest.mark.parametrize("maxWorkers", [1, 2])
def test_networkRetryKeepsItsOwnSlot(maxWorkers: int) -> None:
    """
    A refused connection's retry goes out on the slot it already holds: with
    one slot it does not queue behind itself until QUEUE_TIMEOUT, and when
    retries run out the client gets 502 within the retry budget.
    """
    rig = Rig(maxRetries=2, maxWorkers=maxWorkers, queueTimeout=120.0)
    rig.upstream.refuse = 1
    rig.queue("")
    _, _, _, outcome = rig.forward()
    assert rig.limiter.admission.inFlight == 1
    rig.advance(0.5)
    assert outcome[0].response.code == 200
    assert rig.upstream.calls == 2
    assert rig.limiter.admission.queued == 0
    outcome[0].response.deliverBody(DiscardBody())
    outcome[0].permit.release()
    assert rig.limiter.admission.inFlight == 0

    rig.upstream.refuse = 3
    _, request, trail, outcome = rig.forward()
    rig.advance(0.5)
    rig.advance(1.0)
    assert answeredHere(outcome) and request.responseCode == 502
    assert trail.errorType == "upstream_connection"
    assert rig.upstream.calls == 5
    # An answer of the forwarder's own gave its slot back.
    assert rig.limiter.admission.inFlight == 0
    rig.pump()


def test_throttledRetryGivesItsSlotBack() -> None:
    """
    A 429 retry gives its slot back while it backs off (another call may use
    it) and is admitted again, through the bucket, before its next attempt.
    """
    rig = Rig(maxWorkers=1)
    rig.queue("mode=error code=1302", "")
    _, _, _, outcome = rig.forward()
    assert outcome == [] and rig.limiter.admission.inFlight == 0
    rig.advance(2.0)
    assert outcome[0].response.code == 200
    assert rig.limiter.admission.inFlight == 1


def test_clientLeavesDuringBackoff() -> None:
    """
    A client that leaves while a retry waits: no further attempt, no timer.
    """
    rig = Rig()
    rig.queue("mode=error code=1303", "")
    forwarder, _, _, outcome = rig.forward()
    forwarder.cancel("client")
    assert len(outcome) == 1 and isinstance(outcome[0], Gone)
    rig.advance(10)
    assert rig.upstream.calls == 1
    assert rig.clock.getDelayedCalls() == []


def test_clientLeavesWhileQueued() -> None:
    """
    A client that leaves while waiting for admission leaves the queue.
    """
    rig = Rig(maxWorkers=1)
    rig.queue("mode=hang", "")
    first, _, _, _ = rig.forward()
    second, _, _, outcome = rig.forward()
    assert rig.limiter.admission.queued == 1
    second.cancel("client")
    assert rig.limiter.admission.queued == 0
    assert len(outcome) == 1 and isinstance(outcome[0], Gone)
    first.cancel("client")
    rig.pump()
    assert rig.limiter.admission.inFlight == 0


def test_queueFullAndTimeout() -> None:
    """
    A full queue and a wait past QUEUE_TIMEOUT answer 429 with Retry-After
    in the route's dialect, and are counted.
    """
    rig = Rig(maxWorkers=1, maxQueue=1, queueTimeout=5.0)
    rig.queue("mode=hang")
    holder, _, _, _ = rig.forward()
    _, waitingRequest, _, waiting = rig.forward(CHAT)
    _, full, _, outcome = rig.forward(CHAT)
    assert answeredHere(outcome) and full.responseCode == 429
    assert header(full, b"retry-after")
    assert set(written(full)) == {"error"}
    assert written(full)["error"]["message"].startswith("the proxy's queue is full")
    rig.clock.advance(5.0)
    assert answeredHere(waiting) and waitingRequest.responseCode == 429
    assert header(waitingRequest, b"retry-after")
    # A wait that timed out says so; it is not a full queue.
    assert written(waitingRequest)["error"]["message"].startswith(
        "waited 5 s in the proxy's queue without being admitted"
    )
    assert (
        rig.sample("zai_proxy_rate_limit_rejections_total", client="source-01") is None
    )  # no hooks wired here
    holder.cancel("client")
    rig.pump()


def test_shutdownDuringBackoff() -> None:
    """
    A proxy stopping while a retry waits answers 503 at once.
    """
    rig = Rig()
    rig.queue("mode=error code=1305", "")
    forwarder, request, _, outcome = rig.forward()
    forwarder.cancel("shutdown")
    assert answeredHere(outcome) and request.responseCode == 503
    assert rig.clock.getDelayedCalls() == []


def test_streamHoldsItsSlot() -> None:
    """
    An answer to relay carries its admission slot, which the relay gives
    back at the end; nothing is told to the limiter before then.
    """
    rig = Rig()
    rig.queue("")
    _, _, _, outcome = rig.forward()
    [answer] = outcome
    assert isinstance(answer, Stream) and answer.permit is not None
    assert rig.limiter.admission.inFlight == 1
    assert rig.limiter._successes == 0
    answer.response.deliverBody(DiscardBody())
    answer.permit.release()
    assert rig.limiter.admission.inFlight == 0
