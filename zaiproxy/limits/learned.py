# -*- test-case-name: tests.test_limiter -*-
"""
What the rate limiter learns from (a window's totals) and what it has
learned, as text fields: the form shared limits
keep in a Redis hash, so the proxy that judges a window can hand its
conclusions to the others, and a proxy that joins takes them on.

Each field names one attribute of L{zaiproxy.limits.limiter.RateLimiter};
the rate and the limit are set back through its setters by the limiter,
which also clamps them to its own bounds.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

__all__ = ["WindowSharing", "WindowTotals", "adoptFields", "learnedFields"]


@attrs.frozen
class WindowTotals:
    """
    What one window's calls came to.

    @ivar concurrencyAt: the fewest calls in flight when Z.AI answered 1302.
    @ivar accepted: calls Z.AI took per second, over the span calls went.
    @ivar rateSaturated: callers waited for the rate (demand met it).
    @ivar slotSaturated: callers waited for a concurrency slot.
    """

    successes: int
    frequency: int
    concurrency: int
    concurrencyAt: int | None
    accepted: float
    rateSaturated: bool
    slotSaturated: bool


class WindowSharing(Protocol):
    """
    What the limiter asks of shared limits (L{zaiproxy.limits.shared}).
    """

    @property
    def shared(self) -> bool:
        """Sharing now (Redis answers); otherwise the limiter judges alone."""

    @property
    def slotsTaken(self) -> int:
        """Concurrency slots taken by every proxy, as last seen."""

    def windowEnded(self) -> None:
        """The limiter's window clock ticked: report (or judge) the window."""

    def holdQuota(self, error: Any) -> None:
        """Z.AI said the quota is gone: every proxy should hold."""

    def reset(self) -> None:
        """An operator reset the limiter: forget what all proxies learned."""


#: Redis field, limiter attribute, type.
FIELDS: tuple[tuple[str, str, type], ...] = (
    ("rate", "rate", float),
    ("ceiling", "ceiling", float),
    ("ceiling_updated_at", "ceilingUpdatedAt", float),
    ("limit", "limit", int),
    ("limit_ceiling", "limitCeiling", int),
    ("learned", "_learned", bool),
    ("probing", "_probing", bool),
    ("tail", "_tail", bool),
    ("gain", "_gain", float),
    ("clean", "_clean", int),
    ("limit_clean", "_limitClean", int),
    ("limit_probing", "_limitProbing", bool),
    ("limit_step", "_limitStep", int),
)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


def learnedFields(limiter: Any) -> dict[str, str]:
    return {field: _text(getattr(limiter, attribute)) for field, attribute, _ in FIELDS}


def adoptFields(limiter: Any, fields: dict[str, str]) -> None:
    """
    Set each attribute whose field is there; a field that does not parse
    (another version's, or garbage) is left alone.
    """
    for field, attribute, kind in FIELDS:
        text = fields.get(field)
        if text is None:
            continue
        if text == "":
            if attribute == "ceilingUpdatedAt":
                setattr(limiter, attribute, None)
            continue
        try:
            value: Any = text == "1" if kind is bool else kind(float(text)) if kind is int else kind(text)
        except ValueError:
            continue
        setattr(limiter, attribute, value)
