"""
Tests for L{zaiproxy.config.settings}.
"""

from __future__ import annotations

import os

import pytest
from twisted.logger import LogLevel

from zaiproxy.config.reference import environmentTemplate
from zaiproxy.config.settings import (
    Settings,
    SettingsError,
    loadSettings,
    settingSpecs,
    stateDirectory,
)

BASE = {"ZAI_API_KEY": "k.secret"}


def load(**env: str) -> Settings:
    settings, _ = loadSettings({**BASE, **env})
    return settings


def test_defaults() -> None:
    """
    With only the key set, every default is the seed's.
    """
    s = load()
    assert s.zaiApiKey == "k.secret"
    assert s.zaiTargetURL == "https://api.z.ai/api/anthropic"
    assert s.zaiOpenAITargetURL == "https://api.z.ai/api/coding/paas/v4"
    assert s.tokenCountingEnabled is True
    assert s.tokenizerModel == "glm-4"
    assert s.maxWorkers == 10
    assert s.maxRetries == 3
    assert (s.rateLimitInitial, s.rateLimitMin, s.rateLimitMax) == (10.0, 1.0, 50.0)
    # BASE sets no HOME, XDG_STATE_HOME or STATE_DIRECTORY.
    assert s.rateLimitStateFile == os.path.expanduser("~/.local/state/zaiproxy/ceiling.json")
    assert s.deploymentVariant == "production"
    assert s.logLevel is LogLevel.info
    assert s.logFormat == "text"
    assert s.maxRequestBytes == 32 * 1024 * 1024
    assert s.upstreamConnectTimeout == 10.0
    assert s.upstreamFirstByteTimeout == 300.0
    assert s.upstreamIdleTimeout == 120.0
    assert s.drainTimeout == 30.0


def test_everySpecHasADefaultThatParses() -> None:
    """
    Each documented default parses with its own parser (the README table is
    built from these).
    """
    for spec in settingSpecs():
        if spec.default is not None:
            spec.parse(spec.default)
        assert spec.help.endswith(".")


@pytest.mark.parametrize(
    "env, attribute, value",
    [
        ({"TOKEN_COUNTING_ENABLED": "no"}, "tokenCountingEnabled", False),
        ({"TOKEN_COUNTING_ENABLED": "0"}, "tokenCountingEnabled", False),
        ({"TOKEN_COUNTING_ENABLED": "YES"}, "tokenCountingEnabled", True),
        ({"TOKEN_COUNTING_ENABLED": "1"}, "tokenCountingEnabled", True),
        ({"MAX_WORKERS": " 25 "}, "maxWorkers", 25),
        ({"MAX_RETRIES": "0"}, "maxRetries", 0),
        ({"MAX_REQUEST_BYTES": "1MiB"}, "maxRequestBytes", 1048576),
        ({"MAX_REQUEST_BYTES": "512k"}, "maxRequestBytes", 524288),
        ({"MAX_REQUEST_BYTES": "1000"}, "maxRequestBytes", 1000),
        ({"UPSTREAM_IDLE_TIMEOUT": "1m30s"}, "upstreamIdleTimeout", 90.0),
        ({"UPSTREAM_IDLE_TIMEOUT": "2.5"}, "upstreamIdleTimeout", 2.5),
        ({"UPSTREAM_IDLE_TIMEOUT": "300ms"}, "upstreamIdleTimeout", 0.3),
        ({"DRAIN_TIMEOUT": "1h"}, "drainTimeout", 3600.0),
        ({"LOG_LEVEL": "DEBUG"}, "logLevel", LogLevel.debug),
        ({"LOG_LEVEL": "warning"}, "logLevel", LogLevel.warn),
        ({"LOG_FORMAT": "JSON"}, "logFormat", "json"),
        (
            {"ZAI_TARGET_URL": "http://127.0.0.1:9/api/anthropic/"},
            "zaiTargetURL",
            "http://127.0.0.1:9/api/anthropic",
        ),
        ({"RATE_LIMIT_STATE_FILE": "off"}, "rateLimitStateFile", None),
        ({"RATE_LIMIT_STATE_FILE": "/tmp/x.json"}, "rateLimitStateFile", "/tmp/x.json"),
        ({"MAX_WORKERS": ""}, "maxWorkers", 10),
    ],
)
def test_values(env: dict[str, str], attribute: str, value: object) -> None:
    """
    Accepted spellings parse to the expected values; an empty value is unset.
    """
    assert getattr(load(**env), attribute) == value


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("MAX_WORKERS", "ten", "a whole number greater than 0"),
        ("MAX_WORKERS", "0", "a whole number greater than 0"),
        ("MAX_WORKERS", "2.5", "a whole number greater than 0"),
        ("MAX_RETRIES", "-1", "a whole number, 0 or more"),
        ("TOKEN_COUNTING_ENABLED", "off-ish", "true/false, 1/0, yes/no"),
        ("RATE_LIMIT_MAX", "nan", "a number greater than 0"),
        ("RATE_LIMIT_MIN", "-3", "a number greater than 0"),
        ("UPSTREAM_CONNECT_TIMEOUT", "soon", "seconds greater than 0"),
        ("UPSTREAM_CONNECT_TIMEOUT", "0", "seconds greater than 0"),
        ("UPSTREAM_CONNECT_TIMEOUT", "5x", "seconds greater than 0"),
        ("MAX_REQUEST_BYTES", "lots", "bytes greater than 0"),
        ("LOG_LEVEL", "loud", "debug, info, warn, error or critical"),
        ("LOG_FORMAT", "xml", "one of text, json"),
        ("ZAI_TARGET_URL", "ftp://x", "http:// or https:// URL"),
        ("ZAI_TARGET_URL", "https://", "http:// or https:// URL"),
        ("ZAI_OPENAI_TARGET_URL", "https://h/v4?x=1", "without query"),
        ("ZAI_TARGET_URL", "https://user:pw@h/", "http:// or https:// URL"),
    ],
)
def test_invalidValues(name: str, value: str, accepted: str) -> None:
    """
    A bad value is one line naming the variable, the value and what is
    accepted: never a silent default.
    """
    with pytest.raises(SettingsError) as raised:
        load(**{name: value})
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{name}={value!r} is not valid: expected")
    assert accepted in message


def test_missingKey() -> None:
    """
    Without ZAI_API_KEY the error names it.
    """
    with pytest.raises(SettingsError, match=r"^ZAI_API_KEY is required but not set$"):
        loadSettings({})
    with pytest.raises(SettingsError, match=r"^ZAI_API_KEY is required"):
        loadSettings({"ZAI_API_KEY": "  "})


def test_badKeyIsNotEchoed() -> None:
    """
    An invalid key is reported without its value.
    """
    with pytest.raises(SettingsError) as raised:
        loadSettings({"ZAI_API_KEY": "abc def-secret"})
    assert "def-secret" not in str(raised.value)
    assert "ZAI_API_KEY=(hidden)" in str(raised.value)


def test_keyNotInRepr() -> None:
    """
    The key never shows in the settings' repr (which may end up in a log).
    """
    assert "k.secret" not in repr(load())


def test_rateLimitOrder() -> None:
    """
    The initial rate must lie between the minimum and maximum.
    """
    with pytest.raises(
        SettingsError, match="RATE_LIMIT_INITIAL=100 must lie between RATE_LIMIT_MIN=1 and RATE_LIMIT_MAX=50"
    ):
        load(RATE_LIMIT_INITIAL="100")
    with pytest.raises(SettingsError, match="RATE_LIMIT_MIN=5 must not exceed RATE_LIMIT_MAX=2"):
        load(RATE_LIMIT_MIN="5", RATE_LIMIT_MAX="2", RATE_LIMIT_INITIAL="3")


def test_configFileOverlaidByEnvironment(tmp_path: pytest.TempPathFactory) -> None:
    """
    The config file supplies values; the environment overrides them; unknown
    names in the file are reported as warnings (usually typos).
    """
    path = f"{tmp_path}/zaiproxy.env"
    with open(path, "w") as f:
        f.write("ZAI_API_KEY=from-file\nMAX_WORKERS=4\nMAX_WORKER=5\nDRAIN_TIMEOUT=5s\n")
    settings, warnings = loadSettings({"MAX_WORKERS": "7", "UNRELATED": "x"}, path)
    assert settings.zaiApiKey == "from-file"
    assert settings.maxWorkers == 7
    assert settings.drainTimeout == 5.0
    assert warnings == [f"config file {path} sets MAX_WORKER, which zaiproxy does not use"]


def test_configFileErrors(tmp_path: pytest.TempPathFactory) -> None:
    """
    A bad config file or a bad value in it is a SettingsError.
    """
    with pytest.raises(SettingsError, match="cannot read config file"):
        loadSettings(BASE, f"{tmp_path}/missing.env")
    path = f"{tmp_path}/bad.env"
    with open(path, "w") as f:
        f.write("MAX_WORKERS=many\n")
    with pytest.raises(SettingsError, match="MAX_WORKERS='many' is not valid"):
        loadSettings(BASE, path)


def test_etcTemplateListsEverySetting() -> None:
    """
    etc/zaiproxy.env names every setting with its default (commented out),
    and with only the key filled in it loads to the defaults.
    """
    from pathlib import Path

    from zaiproxy.config.envfile import parseEnvironmentFile

    text = (Path(__file__).parent.parent / "etc" / "zaiproxy.env").read_text()
    # Regenerate it with: python -m zaiproxy.config.reference --env > etc/zaiproxy.env
    assert text == environmentTemplate() + "\n"
    lines = text.splitlines()
    for spec in settingSpecs():
        line = f"{spec.env}=" if spec.default is None else f"#{spec.env}={spec.default}"
        assert lines.count(line) == 1, line
        # Right above it, after a blank line: its help, as a one-line comment.
        at = lines.index(line)
        assert lines[at - 2 : at] == ["", "# " + spec.help], spec.env
    uncommented = "\n".join(
        line.lstrip("#") if "=" in line and not line.startswith("# ") else line for line in text.splitlines()
    )
    values = parseEnvironmentFile(uncommented.replace("ZAI_API_KEY=\n", "ZAI_API_KEY=k\n"))
    settings, warnings = loadSettings(values)
    assert warnings == []
    assert settings == load(ZAI_API_KEY="k")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"STATE_DIRECTORY": "/var/lib/zai-proxy", "XDG_STATE_HOME": "/x", "HOME": "/h"},
            "/var/lib/zai-proxy",
        ),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b", "HOME": "/h"}, "/var/lib/a"),
        ({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}, "/x/state/zaiproxy"),
        # The XDG spec says a relative path is invalid and is ignored.
        ({"XDG_STATE_HOME": "relative", "HOME": "/h"}, "/h/.local/state/zaiproxy"),
        ({"STATE_DIRECTORY": "", "XDG_STATE_HOME": "", "HOME": "/h"}, "/h/.local/state/zaiproxy"),
    ],
)
def test_stateDirectory(environ: dict[str, str], expected: str) -> None:
    """
    systemd's folder, else XDG's, else ~/.local/state/zaiproxy.
    """
    assert stateDirectory(environ) == expected


def test_stateFileDefaultsIntoTheStateFolder() -> None:
    """
    RATE_LIMIT_STATE_FILE unset or empty: ceiling.json in the state folder;
    set, it is used as it is; off turns it off.
    """
    base = {"ZAI_API_KEY": "k", "HOME": "/h"}
    assert loadSettings(base)[0].rateLimitStateFile == "/h/.local/state/zaiproxy/ceiling.json"
    systemd = {**base, "STATE_DIRECTORY": "/var/lib/zai-proxy", "RATE_LIMIT_STATE_FILE": ""}
    assert loadSettings(systemd)[0].rateLimitStateFile == "/var/lib/zai-proxy/ceiling.json"
    chosen = {**base, "RATE_LIMIT_STATE_FILE": "/srv/c.json"}
    assert loadSettings(chosen)[0].rateLimitStateFile == "/srv/c.json"
    assert loadSettings({**base, "RATE_LIMIT_STATE_FILE": "off"})[0].rateLimitStateFile is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", 0.0), ("0s", 0.0), ("5", 5.0), ("1m", 60.0), ("500ms", 0.5)]
)
def test_drainGrace(text: str, seconds: float) -> None:
    """
    DRAIN_GRACE takes 0 (close at once) or a duration; 5 s by default.
    """
    assert load(DRAIN_GRACE=text).drainGrace == seconds
    assert load().drainGrace == 5.0
    with pytest.raises(SettingsError, match="DRAIN_GRACE='-1' is not valid: expected 0 or seconds"):
        load(DRAIN_GRACE="-1")
