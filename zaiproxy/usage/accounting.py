# -*- test-case-name: tests.test_accounting -*-
"""
Token accounting: what Z.AI bills for each answer (a L{Billed} value, which
the reporter turns into metrics, a log line and a ledger row).

Z.AI's reported usage is the truth; the local tiktoken estimate is used only
where usage is missing, and only then is the prompt counted (counting every
prompt would double the proxy's CPU for a number Z.AI already gives). When
an answer lacks usage, estimated usage is added in the dialect's own shape,
because the anthropic SDK fails on a stream without it. Nothing here may
delay or fail a response: every error is logged and the answer goes on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred

from zaiproxy.dialects import Dialect, dialectModule
from zaiproxy.dialects.usage import Usage
from zaiproxy.observe.record import Billed, Exchange
from zaiproxy.usage.body import COUNTED_ROUTES, RequestBody
from zaiproxy.usage.tokens import Counting

__all__ = [
    "KNOWN_MODELS",
    "Accounting",
    "ModelLabels",
    "Price",
    "Pricing",
]

#: Model ids Z.AI has served (zai-api.md section 6.1): always their own label.
KNOWN_MODELS = frozenset(
    [
        "glm-4-plus",
        "glm-4-air",
        "glm-4-airx",
        "glm-4-flash",
        "glm-4-flashx",
        "glm-4-long",
        "glm-4-32b-0414-128k",
        "glm-4",
        "glm-4.5",
        "glm-4.5-air",
        "glm-4.5-x",
        "glm-4.5-airx",
        "glm-4.5-flash",
        "glm-4.5v",
        "glm-4.6",
        "glm-4.6v",
        "glm-4.7",
        "glm-4.7-flash",
        "glm-4.7-flashx",
        "glm-5",
        "glm-5-turbo",
        "glm-5.1",
        "glm-5.2",
        "glm-5.3",
        "glm-5.3-flash",
    ]
)

#: How many distinct Claude model names may become labels before the rest
#: share "other".
MAX_CLAUDE_LABELS = 24
#: Distinct requested model names whose label is remembered (clients may
#: send any string; past this the memo starts again).
_MAX_MEMO = 1024
#: Request bodies up to this size are parsed and counted inline.
INLINE_BODY_BYTES = 16 << 10

_CLAUDE = re.compile(r"(claude-[a-z0-9.-]{1,60}|opus|sonnet|haiku)\Z")
_SUFFIX = re.compile(r"\[[^\]]*\]\Z")


class ModelLabels:
    """
    The request's model as a bounded metric label.

    Known GLM ids and configured names are their own label; Claude names
    (which Z.AI maps to a GLM model) stay as requested, up to a cap; a
    request without a model gets C{TOKENIZER_MODEL}; anything else is
    C{other}.
    """

    def __init__(self, extra: Iterable[str], default: str) -> None:
        self._allowed = KNOWN_MODELS | {self._normalise(name) for name in extra}
        self._default = self._normalise(default) or "glm-4"
        self._claude: set[str] = set()
        # Requested name -> label: a name's label never changes once given.
        self._memo: dict[str, str] = {}

    @staticmethod
    def _normalise(name: str) -> str:
        # Claude Code marks 1M-context models with a "[1m]" suffix.
        return _SUFFIX.sub("", name.strip().lower())

    def label(self, requested: str | None) -> str:
        if not requested:
            return self._default
        label = self._memo.get(requested)
        if label is None:
            if len(self._memo) >= _MAX_MEMO:
                self._memo = {}
            label = self._memo[requested] = self._label(requested)
        return label

    def _label(self, requested: str) -> str:
        name = self._normalise(requested)
        if name in self._allowed:
            return name
        if _CLAUDE.match(name):
            if name in self._claude or len(self._claude) < MAX_CLAUDE_LABELS:
                self._claude.add(name)
                return name
        return "other"


@attrs.frozen
class Price:
    """
    USD per million tokens, by direction.
    """

    input: float
    output: float
    cacheRead: float
    cacheWrite: float

    def of(self, direction: str) -> float:
        return getattr(self, _PRICE_FIELDS[direction])  # type: ignore[no-any-return]


#: A direction's field in L{Price}.
_PRICE_FIELDS = {"input": "input", "output": "output", "cache_read": "cacheRead", "cache_write": "cacheWrite"}


@attrs.frozen
class Pricing:
    """
    The price table and the peak window (the Go zai-proxy's: GLM-4.7 prices, 2x from
    02:00 to 06:00 at UTC-5).
    """

    prices: dict[str, Price]
    peakStart: float = 2.0
    peakEnd: float = 6.0
    utcOffset: float = -5.0
    peakMultiplier: float = 2.0
    _minute: list[Any] = attrs.field(factory=lambda: [None, ""], eq=False, repr=False)

    def tier(self, now: float) -> str:
        minute = int(now // 60)
        if self._minute[0] != minute:
            self._minute[:] = [minute, self._tierAt(minute * 60.0)]
        return self._minute[1]  # type: ignore[no-any-return]

    def _tierAt(self, now: float) -> str:
        local = datetime.fromtimestamp(now, timezone(timedelta(hours=self.utcOffset)))
        hour = local.hour + local.minute / 60.0
        if self.peakStart <= self.peakEnd:
            peak = self.peakStart <= hour < self.peakEnd
        else:
            peak = hour >= self.peakStart or hour < self.peakEnd
        return "peak" if peak else "off_peak"

    def cost(self, model: str, direction: str, tokens: int, tier: str) -> float:
        price = self.prices.get(model) or self.prices.get("*")
        if price is None:
            return 0.0
        factor = self.peakMultiplier if tier == "peak" else 1.0
        return tokens * price.of(direction) * factor / 1e6


class Accounting:
    """
    What every exchange's accounting shares: the counter, metrics, labels
    and prices.

    @ivar counting: L{None} when C{TOKEN_COUNTING_ENABLED=false}: then the
        proxy relays bodies without reading them, as the Go zai-proxy did.
    @ivar countedRoutes: the route labels whose answers are read (none
        when counting is off).
    """

    def __init__(
        self,
        reactor: Any,
        counting: Counting | None,
        labels: ModelLabels,
        pricing: Pricing,
    ) -> None:
        self.reactor = reactor
        self.counting = counting
        self.labels = labels
        self.pricing = pricing
        self.countedRoutes = frozenset() if counting is None else COUNTED_ROUTES

    def health(self) -> dict[str, Any]:
        if self.counting is None:
            return {"enabled": False}
        counter = self.counting.counter
        return {"enabled": True, "counter": counter.name, "encoding": counter.encoding}

    # -- counting -----------------------------------------------------------

    def countInput(self, dialect: Dialect, body: RequestBody) -> Deferred[int]:
        """
        Tokens of everything the request makes the model read; small
        bodies on the reactor thread, large ones (parsing included) in a
        thread.
        """
        assert self.counting is not None
        counting = self.counting

        def count() -> int:
            return counting.countNow(dialectModule(dialect).requestTexts(json.loads(body.read())))

        if body.size <= INLINE_BODY_BYTES:
            return maybeDeferred(count)
        return counting.inThread(count)

    def countTexts(self, texts: list[str]) -> Deferred[int]:
        assert self.counting is not None
        return self.counting.count(texts)

    # -- billing ------------------------------------------------------------

    def bill(self, exchange: Exchange, usage: Usage, source: str, responseModel: str | None) -> Billed:
        """
        One answer's tokens, priced at this moment's tier.
        """
        model = self.labels.label(exchange.model)
        now = self.reactor.seconds()
        tier = self.pricing.tier(now)
        pricing = self.pricing
        costs = {
            direction: pricing.cost(model, direction, tokens, tier)
            for direction, tokens in usage.directions().items()
            if tokens > 0
        }
        outputRate = None
        if usage.output > 0 and exchange.firstByteAt is not None:
            generating = now - exchange.firstByteAt
            if generating > 0:
                outputRate = usage.output / generating
        return Billed(usage, source, model, responseModel, tier, costs, outputRate)
