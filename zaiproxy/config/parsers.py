# -*- test-case-name: tests.test_settings -*-
"""
Value parsers for settings: each takes the raw text of a variable and
returns its value, or raises C{ValueError} with a phrase saying what is
accepted (L{zaiproxy.config.settings} adds the variable's name and value,
unless it is a secret).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import LogLevel

from zaiproxy.ledger.store import sqlitePath
from zaiproxy.limits.redislink import RedisAddress

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parseBool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true/false, 1/0, yes/no or on/off")


def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    try:
        value = kind(text.strip())
    except ValueError:
        raise ValueError(f"expected {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected {what}")
    return value


def parsePositiveInt(text: str) -> int:
    value: int = _number(text, int, "a whole number greater than 0")
    if value <= 0:
        raise ValueError("expected a whole number greater than 0")
    return value


def parseNonNegativeInt(text: str) -> int:
    value: int = _number(text, int, "a whole number, 0 or more")
    if value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def parsePositiveFloat(text: str) -> float:
    value: float = _number(text, float, "a number greater than 0")
    if value <= 0:
        raise ValueError("expected a number greater than 0")
    return value


def parseFraction(low: float, high: float, closedHigh: bool) -> Callable[[str], float]:
    what = f"a number in ({low:g}, {high:g}{']' if closedHigh else ')'}"

    def parse(text: str) -> float:
        value: float = _number(text, float, what)
        if not (low < value < high or (closedHigh and value == high)):
            raise ValueError(f"expected {what}")
        return value

    return parse


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parseDuration(text: str) -> float:
    """
    Seconds, as a plain number (C{2.5}) or Go-style units (C{1m30s},
    C{300ms}, C{6h}), since the Go zai-proxy used Go durations.
    """
    what = "seconds greater than 0, e.g. 30, 2.5, 1m30s, 300ms or 6h"
    stripped = text.strip()
    try:
        seconds = float(stripped)
    except ValueError:
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(stripped):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(stripped) or pos == 0:
            raise ValueError(f"expected {what}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected {what}")
    return seconds


def parseGrace(text: str) -> float:
    """
    A duration as L{parseDuration} reads it, or C{0} for none.
    """
    if text.strip() in ("0", "0s", "0.0"):
        return 0.0
    try:
        return parseDuration(text)
    except ValueError:
        raise ValueError("expected 0 or seconds, e.g. 5, 2.5, 10s or 500ms") from None


_SIZE = re.compile(r"(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parseByteSize(text: str) -> int:
    """
    Bytes, with an optional binary suffix (C{32MiB}, C{512k}).
    """
    match = _SIZE.match(text.strip())
    if match is None or int(match.group(1)) <= 0:
        raise ValueError("expected bytes greater than 0, e.g. 33554432, 512KiB or 32MiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)[:1].lower()]


def parseURL(text: str) -> str:
    """
    An absolute http(s) base URL without query or fragment; a trailing slash
    is dropped so that joining a path never doubles it.
    """
    what = "an http:// or https:// URL with a host, without query or fragment"
    stripped = text.strip()
    try:
        parts = urlsplit(stripped)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"expected {what}") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        raise ValueError(f"expected {what}")
    return stripped.rstrip("/")


def parseText(text: str) -> str:
    if any(c in text for c in "\r\n\x00"):
        raise ValueError("expected a single line of text")
    return text.strip()


def parseChoice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return lowered

    return parse


_LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def parseLogLevel(text: str) -> LogLevel:
    try:
        return _LEVELS[text.strip().lower()]
    except KeyError:
        raise ValueError("expected debug, info, warn, error or critical") from None


def parseOptionalPath(text: str) -> str | None:
    """
    A file path, or C{off} to turn the feature off (the Go zai-proxy could not).
    """
    stripped = text.strip()
    if stripped.lower() in ("off", "none", "false"):
        return None
    if "\x00" in stripped:
        raise ValueError("expected a file path or off")
    return stripped


_PRICE = re.compile(r"\s*([^=,\s]+)\s*=\s*([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+)\s*\Z")


def parsePrices(text: str) -> tuple[tuple[str, tuple[float, float, float, float]], ...]:
    """
    C{model=input/output/cache_read/cache_write} entries in USD per million
    tokens, comma-separated; C{*} is every other model.
    """
    what = "entries like *=0.60/2.20/0.11/0,glm-4.5-air=0.20/1.10/0.03/0 (USD per million tokens)"
    entries = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        match = _PRICE.match(entry)
        if match is None:
            raise ValueError(f"expected {what}")
        model, inputPrice, outputPrice, readPrice, writePrice = match.groups()
        try:
            prices = (float(inputPrice), float(outputPrice), float(readPrice), float(writePrice))
        except ValueError:
            raise ValueError(f"expected {what}") from None
        entries.append((model.lower(), prices))
    if not entries:
        raise ValueError(f"expected {what}")
    return tuple(entries)


_HOUR = r"([01]?\d|2[0-4])(?::([0-5]\d))?"
_HOURS = re.compile(rf"\s*{_HOUR}\s*-\s*{_HOUR}\s*\Z")


def parseHours(text: str) -> tuple[float, float]:
    """
    A daily window C{HH[:MM]-HH[:MM]} (may wrap past midnight), or C{off}.
    """
    if text.strip().lower() in ("off", "none"):
        return (0.0, 0.0)
    match = _HOURS.match(text)
    if match is None:
        raise ValueError("expected a window like 02:00-06:00, or off")
    h1, m1, h2, m2 = match.groups()
    return (int(h1) + int(m1 or 0) / 60.0, int(h2) + int(m2 or 0) / 60.0)


def parseUTCOffset(text: str) -> float:
    value: float = _number(text, float, "hours from UTC between -14 and 14, e.g. -5 or 5.5")
    if not -14 <= value <= 14:
        raise ValueError("expected hours from UTC between -14 and 14, e.g. -5 or 5.5")
    return value


def parseNames(text: str) -> tuple[str, ...]:
    """
    Comma-separated names (empty entries ignored).
    """
    return tuple(name.strip() for name in text.split(",") if name.strip())


def parseSecret(text: str) -> str:
    stripped = text.strip()
    if any(c.isspace() for c in stripped) or any(ord(c) < 32 for c in stripped):
        # Never echo the value: it is a secret.
        raise ValueError("must be a single token without spaces or control characters")
    return stripped


def parseLedgerURL(text: str) -> str:
    """
    C{LEDGER_URL}: C{sqlite:///path/to/ledger.sqlite3} or
    C{postgresql://user:password@host/database} (empty: the default,
    filled in from the state folder when the settings are loaded).
    """
    url = text.strip()
    if not url or url.startswith(("postgresql://", "postgres://")):
        return url
    try:
        sqlitePath(url)
    except ValueError:
        raise ValueError(
            "expected sqlite:///path/to/ledger.sqlite3 or postgresql://user:password@host/database"
        ) from None
    return url


def parseRedisURL(text: str) -> str:
    """
    C{REDIS_URL}: C{redis://[:password@]host[:port][/db]} (empty: unset).
    """
    url = text.strip()
    if url:
        RedisAddress.fromURL(url)
    return url
