"""
Tests for L{zaiproxy.fake.scenario}: the Scenario value and its spec syntax.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zaiproxy.fake.scenario import (
    ENVELOPES,
    MODES,
    USAGES,
    Scenario,
    formatScenario,
    parseScenario,
)


def test_defaults() -> None:
    """
    The defaults are a short, healthy, Z.AI-flavoured stream.
    """
    s = Scenario()
    assert (s.mode, s.events, s.deltaText, s.deltaSize) == ("ok", 5, "hello ", 0)
    assert (s.interval, s.firstByteDelay, s.split, s.splitDelay) == (0.0, 0.0, False, 0.005)
    assert (s.code, s.status, s.envelope, s.resetIn) == ("1302", 0, "native", 3600.0)
    assert (s.retryAfter, s.retryAfterHeader, s.usage, s.cacheRead) == (0.0, 0.0, "reported", 0)
    assert (s.thinking, s.tool, s.after, s.cookie) == (False, False, None, False)
    assert (s.model, s.msgPrefix, s.stopReason, s.done) == ("glm-4.7", True, "", True)


def test_emptySpec() -> None:
    """
    An empty or blank spec changes nothing.
    """
    assert parseScenario("") == Scenario()
    assert parseScenario("  \t ,, ") == Scenario()


def test_separators() -> None:
    """
    Pairs may be separated by commas, spaces, or both.
    """
    expected = Scenario(events=20, interval=0.05, split=True)
    assert parseScenario("events=20,interval=0.05,split=true") == expected
    assert parseScenario("events=20 interval=0.05\tsplit=true") == expected
    assert parseScenario(" events=20 , interval=0.05,  split=true ") == expected


def test_everyField() -> None:
    """
    Every field can be set from a spec, converted to its type.
    """
    spec = (
        "mode=stall-mid events=7 deltaText=abc deltaSize=1000 interval=0.25 "
        "firstByteDelay=1.5 split=yes splitDelay=0.01 code=1308 status=503 "
        "envelope=openai resetIn=60 retryAfter=2.5 retryAfterHeader=3 usage=start "
        "cacheRead=12 thinking=1 tool=on after=4 cookie=true model=glm-5 "
        "msgPrefix=false stopReason=model_context_window_exceeded done=false"
    )
    assert parseScenario(spec) == Scenario(
        mode="stall-mid",
        events=7,
        deltaText="abc",
        deltaSize=1000,
        interval=0.25,
        firstByteDelay=1.5,
        split=True,
        splitDelay=0.01,
        code="1308",
        status=503,
        envelope="openai",
        resetIn=60.0,
        retryAfter=2.5,
        retryAfterHeader=3.0,
        usage="start",
        cacheRead=12,
        thinking=True,
        tool=True,
        after=4,
        cookie=True,
        model="glm-5",
        msgPrefix=False,
        stopReason="model_context_window_exceeded",
        done=False,
    )


def test_keysAreCaseInsensitive() -> None:
    """
    Header values may be rewritten by tools; keys match in any case.
    """
    assert parseScenario("DELTATEXT=x firstbytedelay=2") == Scenario(deltaText="x", firstByteDelay=2.0)


def test_percentDecoding() -> None:
    """
    String values are percent-decoded, so they can hold spaces, commas and
    any UTF-8 text.
    """
    assert parseScenario("deltaText=h%C3%A9llo%2C%20w%C3%B6rld").deltaText == "héllo, wörld"
    assert parseScenario("deltaText=").deltaText == ""


def test_baseAndLastWins() -> None:
    """
    Unnamed fields keep the base's values; a repeated key takes the last.
    """
    base = Scenario(events=3, tool=True)
    assert parseScenario("events=9 events=4", base) == Scenario(events=4, tool=True)


def test_afterDefault() -> None:
    """
    C{after} defaults to 0 for in-band errors and to 2 for the mid-stream
    failures; C{after=none} restores the default.
    """
    assert Scenario(mode="inband-error").effectiveAfter == 0
    for mode in ("reset-mid", "stall-mid", "truncate"):
        assert Scenario(mode=mode).effectiveAfter == 2
    assert Scenario(mode="inband-error", after=3).effectiveAfter == 3
    assert parseScenario("after=none", Scenario(after=5)).after is None


@pytest.mark.parametrize(
    "spec, words",
    [
        ("bogus=1", ["bogus", "1"]),
        ("mode=explode", ["mode", "explode"]),
        ("events=many", ["events", "many"]),
        ("events=-1", ["events", "-1"]),
        ("interval=soon", ["interval", "soon"]),
        ("interval=-0.5", ["interval", "-0.5"]),
        ("interval=nan", ["interval", "nan"]),
        ("split=maybe", ["split", "maybe"]),
        ("usage=some", ["usage", "some"]),
        ("envelope=xml", ["envelope", "xml"]),
        ("status=99", ["status", "99"]),
        ("code=", ["code"]),
        ("after=two", ["after", "two"]),
        ("deltaText=%FF", ["deltaText", "%FF"]),
        ("events", ["events"]),
    ],
)
def test_badSpecs(spec: str, words: list[str]) -> None:
    """
    Unknown keys and bad values raise L{ValueError} naming them.
    """
    with pytest.raises(ValueError) as info:
        parseScenario(spec)
    for word in words:
        assert word in str(info.value)


def test_constructorValidates() -> None:
    """
    The value itself refuses nonsense, not only the parser.
    """
    with pytest.raises(ValueError):
        Scenario(mode="nope")
    with pytest.raises(ValueError):
        Scenario(events=-1)
    with pytest.raises(ValueError):
        Scenario(split="yes")  # type: ignore[arg-type]


def test_frozen() -> None:
    """
    Scenarios are values: shared safely between requests.
    """
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Scenario().events = 3  # type: ignore[misc]


_words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc"), blacklist_characters=","),
    min_size=1,
    max_size=12,
).filter(lambda s: s.isprintable())
_times = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)

scenarios = st.builds(
    Scenario,
    mode=st.sampled_from(sorted(MODES)),
    events=st.integers(0, 10**6),
    deltaText=st.text(max_size=20),
    deltaSize=st.integers(0, 10**5),
    interval=_times,
    firstByteDelay=_times,
    split=st.booleans(),
    splitDelay=_times,
    code=_words,
    status=st.sampled_from([0, 200, 400, 401, 429, 500, 529]),
    envelope=st.sampled_from(sorted(ENVELOPES)),
    resetIn=_times,
    retryAfter=_times,
    retryAfterHeader=_times,
    usage=st.sampled_from(sorted(USAGES)),
    cacheRead=st.integers(0, 10**9),
    thinking=st.booleans(),
    tool=st.booleans(),
    after=st.none() | st.integers(0, 100),
    cookie=st.booleans(),
    model=_words,
    msgPrefix=st.booleans(),
    stopReason=st.text(max_size=30),
    done=st.booleans(),
)


@given(scenarios)
def test_formatRoundTrips(scenario: Scenario) -> None:
    """
    L{formatScenario} writes a spec that L{parseScenario} reads back exactly,
    whatever the strings contain.
    """
    assert parseScenario(formatScenario(scenario)) == scenario


@given(scenarios, scenarios)
def test_formatAgainstBase(scenario: Scenario, base: Scenario) -> None:
    """
    A spec relative to a base names only the differences.
    """
    spec = formatScenario(scenario, base)
    assert parseScenario(spec, base) == scenario


def test_helpListsEveryModeAndKey() -> None:
    """
    C{python -m zaiproxy.fake --help} lists every mode and every scenario
    key with its default, as README says.
    """
    import subprocess
    import sys

    import attrs

    from zaiproxy.fake.scenario import MODES, Scenario

    result = subprocess.run(
        [sys.executable, "-m", "zaiproxy.fake", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Modes: " + ", ".join(sorted(MODES)) + "." in text
    for field in attrs.fields(Scenario):
        assert f"\n  {field.name} (default " in text, field.name
    assert "\n  mode (default ok)\n" in text
    assert "\n  after (default none)\n" in text
    assert "[default: ]" not in text
