# -*- test-case-name: tests.test_fake_scenario -*-
"""
What the fake Z.AI should do with one request, and the little language that
says so.

A L{Scenario} is a frozen value; tests build one directly, queue it on the
fake, or send it as an C{x-fake-scenario} header so that a request made
through the proxy (or by an SDK with C{extra_headers}) can choose its own
fate. The header form is a list of C{key=value} pairs separated by commas or
whitespace, for example C{mode=error code=1308} or
C{events=20,interval=0.05,split=true}. String values are percent-decoded, so
C{deltaText=h%C3%A9llo%20} means C{"héllo "}.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

import attrs

__all__ = [
    "ENVELOPES",
    "MODES",
    "USAGES",
    "Scenario",
    "formatScenario",
    "parseScenario",
    "scenarioHelp",
]

#: Every behaviour the fake knows; see L{Scenario.mode}.
MODES = frozenset(
    {
        "ok",
        "error",
        "inband-error",
        "hang",
        "reset",
        "reset-mid",
        "stall-mid",
        "truncate",
        "not-found",
    }
)

#: How usage is reported; see L{Scenario.usage}.
USAGES = frozenset({"reported", "start", "none"})

#: Which error envelope to use; see L{Scenario.envelope}.
ENVELOPES = frozenset({"native", "openai", "anthropic"})

#: Modes that fail part-way through a body; C{after} defaults to 2 for them.
MID_MODES = frozenset({"reset-mid", "stall-mid", "truncate"})


def _nonNegativeInt(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer, not {value!r}")


def _nonNegativeFloat(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


def _optionalNonNegativeInt(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None:
        _nonNegativeInt(instance, attribute, value)


def _isBool(instance: object, attribute: attrs.Attribute[Any], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be a boolean, not {value!r}")


def _isStr(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be a string, not {value!r}")


def _oneOf(choices: frozenset[str]) -> Callable[[object, attrs.Attribute[Any], str], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(sorted(choices))}, not {value!r}")

    return check


def _code(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
        raise ValueError(f"{attribute.name} must be a non-empty word, not {value!r}")


def _status(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 100 <= value <= 599):
        raise ValueError(f"{attribute.name} must be 0 or an HTTP status, not {value!r}")


@attrs.frozen
class Scenario:
    """
    One request's script.

    @ivar mode: C{ok}; C{error} (an HTTP error with a Z.AI body for C{code});
        C{inband-error} (HTTP 200, then an error frame after C{after}
        content deltas, then a clean end); C{hang} (never answer, no timers);
        C{reset} (abort the TCP connection before the headers);
        C{reset-mid}, C{stall-mid}, C{truncate} (headers and C{after}
        content deltas, then abort / go silent / finish without the closing
        events); C{not-found} (404).
    @ivar events: how many text deltas. "Content deltas" below means the
        thinking, text and tool-argument deltas together.
    @ivar deltaText: the text of each delta.
    @ivar deltaSize: if > 0, each delta is C{deltaText} repeated or cut to
        exactly this many characters.
    @ivar interval: seconds between content deltas (the first one and the
        frames around the deltas are not delayed).
    @ivar firstByteDelay: seconds before the status line is sent (for
        C{reset}: before the abort; ignored by C{hang}).
    @ivar split: write every frame in two or more pieces, C{splitDelay}
        seconds apart, cut at varying places.
    @ivar splitDelay: seconds between the pieces of a split frame.
    @ivar code: Z.AI business code for C{error} and C{inband-error}.
    @ivar status: HTTP status for C{error}; 0 means from the code.
    @ivar envelope: C{native} (the endpoint's own), C{openai} or
        C{anthropic}.
    @ivar resetIn: seconds from now to the reset stamp in 1308/1310 messages.
    @ivar retryAfter: if > 0, a C{retry_after} field inside C{error}.
    @ivar retryAfterHeader: if > 0, a C{Retry-After} header on C{error}.
    @ivar usage: C{reported} (Z.AI: 0/0 in C{message_start}, real numbers at
        the end), C{start} (the vendor's own way) or C{none}.
    @ivar cacheRead: cached input tokens to report.
    @ivar thinking: emit a thinking block / C{reasoning_content} first.
    @ivar tool: emit a tool call after the text.
    @ivar after: content deltas sent before a mid-stream failure or an
        in-band error; L{None} means 2 for C{reset-mid}, C{stall-mid} and
        C{truncate} and 0 for C{inband-error} (whose error then comes
        before any other frame, as Z.AI sends it). On a non-streamed answer
        the failures cut the JSON body in half instead.
    @ivar cookie: add a C{Set-Cookie} header.
    @ivar model: the model name reported.
    @ivar msgPrefix: Anthropic message ids start with C{msg_}.
    @ivar stopReason: overrides the final C{stop_reason} / C{finish_reason}.
    @ivar done: end an OpenAI stream with C{data: [DONE]}, as Z.AI does;
        C{false} ends it after the C{finish_reason} chunk (and the usage
        chunk of C{usage=start}), a complete answer all the same.
    """

    mode: str = attrs.field(default="ok", validator=_oneOf(MODES))
    events: int = attrs.field(default=5, validator=_nonNegativeInt)
    deltaText: str = attrs.field(default="hello ", validator=_isStr)
    deltaSize: int = attrs.field(default=0, validator=_nonNegativeInt)
    interval: float = attrs.field(default=0.0, validator=_nonNegativeFloat)
    firstByteDelay: float = attrs.field(default=0.0, validator=_nonNegativeFloat)
    split: bool = attrs.field(default=False, validator=_isBool)
    splitDelay: float = attrs.field(default=0.005, validator=_nonNegativeFloat)
    code: str = attrs.field(default="1302", validator=_code)
    status: int = attrs.field(default=0, validator=_status)
    envelope: str = attrs.field(default="native", validator=_oneOf(ENVELOPES))
    resetIn: float = attrs.field(default=3600.0, validator=_nonNegativeFloat)
    retryAfter: float = attrs.field(default=0.0, validator=_nonNegativeFloat)
    retryAfterHeader: float = attrs.field(default=0.0, validator=_nonNegativeFloat)
    usage: str = attrs.field(default="reported", validator=_oneOf(USAGES))
    cacheRead: int = attrs.field(default=0, validator=_nonNegativeInt)
    thinking: bool = attrs.field(default=False, validator=_isBool)
    tool: bool = attrs.field(default=False, validator=_isBool)
    after: int | None = attrs.field(default=None, validator=_optionalNonNegativeInt)
    cookie: bool = attrs.field(default=False, validator=_isBool)
    model: str = attrs.field(default="glm-4.7", validator=_code)
    msgPrefix: bool = attrs.field(default=True, validator=_isBool)
    stopReason: str = attrs.field(default="", validator=_isStr)
    done: bool = attrs.field(default=True, validator=_isBool)

    @property
    def effectiveAfter(self) -> int:
        """
        C{after}, or its default for this mode: an in-band error comes first,
        as Z.AI sends it; the other failures let a little content through.
        """
        if self.after is not None:
            return self.after
        return 0 if self.mode == "inband-error" else 2


_FIELDS: dict[str, attrs.Attribute[Any]] = {a.name: a for a in attrs.fields(Scenario)}
_BY_LOWER: dict[str, str] = {name.lower(): name for name in _FIELDS}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_SEPARATORS = re.compile(r"[\s,]+")


def _convert(name: str, raw: str) -> Any:
    """
    Turn one spec value into the field's type, or raise L{ValueError}.
    """
    # Annotations are strings here (postponed evaluation).
    kind = str(_FIELDS[name].type)
    if kind == "bool":
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("expected true or false")
    if kind == "int":
        return int(raw, 10)
    if kind == "int | None":
        if raw.lower() in {"", "none", "default"}:
            return None
        return int(raw, 10)
    if kind == "float":
        return float(raw)
    return unquote(raw, errors="strict")


def parseScenario(spec: str, base: Scenario = Scenario()) -> Scenario:
    """
    Read a scenario spec; fields it does not name keep C{base}'s values.

    Keys are matched case-insensitively; a key given twice takes the last
    value.

    @raise ValueError: naming the key and value at fault.
    """
    changes: dict[str, Any] = {}
    for token in _SEPARATORS.split(spec.strip()):
        if not token:
            continue
        key, sep, raw = token.partition("=")
        if not sep:
            raise ValueError(f"scenario: {token!r} is not key=value")
        name = _BY_LOWER.get(key.lower())
        if name is None:
            raise ValueError(f"scenario: unknown key {key!r} (value {raw!r})")
        try:
            changes[name] = _convert(name, raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"scenario: bad value {raw!r} for {name}: {e}") from None
    try:
        return attrs.evolve(base, **changes)
    except ValueError as e:
        raise ValueError(f"scenario: {e} (in {spec!r})") from None


def _formatValue(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float)):
        return repr(value)
    return quote(value, safe="")


def formatScenario(scenario: Scenario, base: Scenario = Scenario()) -> str:
    """
    The spec that turns C{base} into C{scenario}: what to put in an
    C{x-fake-scenario} header. C{parseScenario(formatScenario(s)) == s}.
    """
    return " ".join(
        f"{name}={_formatValue(getattr(scenario, name))}"
        for name in _FIELDS
        if getattr(scenario, name) != getattr(base, name)
    )


_IVAR = re.compile(r"@ivar (\w+): (.*?)(?=\n\s*@ivar |\Z)", re.DOTALL)
_MARKUP = re.compile(r"[CL]\{([^}]*)\}")


def scenarioHelp(width: int = 79) -> str:
    """
    Every scenario key with its default and meaning, and every mode, for
    C{--help}: read from L{Scenario}'s own fields and docstring, so the
    list cannot drift from what the parser accepts.
    """
    documented = {
        name: " ".join(_MARKUP.sub(r"\1", text).split())
        for name, text in _IVAR.findall(Scenario.__doc__ or "")
    }
    lines = [
        "Scenario keys (--scenario and the x-fake-scenario header; key=value pairs",
        "separated by spaces or commas; booleans true/false; strings percent-decoded):",
        "",
    ]
    for field in attrs.fields(Scenario):
        shown = "none" if field.default is None else _formatValue(field.default) or "(empty)"
        lines.append(f"  {field.name} (default {shown})")
        lines.extend(
            textwrap.wrap(
                documented[field.name],
                width,
                initial_indent="      ",
                subsequent_indent="      ",
                break_on_hyphens=False,
            )
        )
    lines += ["", "Modes: " + ", ".join(sorted(MODES)) + "."]
    return "\n".join(lines)
