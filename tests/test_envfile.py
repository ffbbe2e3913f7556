"""
Tests for L{zaiproxy.config.envfile}: systemd's EnvironmentFile syntax.
"""

from __future__ import annotations

import pytest

from zaiproxy.config.envfile import EnvironmentFileError, parseEnvironmentFile, readEnvironmentFile


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A=1\nB=two\n", {"A": "1", "B": "two"}),
        ("# comment\n; other comment\n\nA=1", {"A": "1"}),
        ("  A = spaced value  \n", {"A": "spaced value"}),
        ("A='single # quoted  '\n", {"A": "single # quoted  "}),
        ('A="double \\"escaped\\" \\\\ \\$HOME"\n', {"A": 'double "escaped" \\ $HOME'}),
        ('A="keeps \\n unknown escapes"\n', {"A": "keeps \\n unknown escapes"}),
        ("A=one\\\ntwo\n", {"A": "onetwo"}),
        ('A="multi\nline"\n', {"A": "multi\nline"}),
        ("A=x#not-a-comment\n", {"A": "x#not-a-comment"}),
        ("A=\n", {"A": ""}),
        ("A=1\nA=2\n", {"A": "2"}),
        ("no equals sign here\nA=1\n", {"A": "1"}),
        ("A=trailing\\ \n", {"A": "trailing "}),
        ("# continued comment \\\nB=still comment\nC=3\n", {"C": "3"}),
        ("A='a'\"b\"c\n", {"A": "abc"}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
    ],
)
def test_parse(text: str, expected: dict[str, str]) -> None:
    """
    Assignments are read the way systemd reads them.
    """
    assert parseEnvironmentFile(text) == expected


def test_invalidKeyNamesTheLine() -> None:
    """
    A key that is not a variable name is an error naming file and line.
    """
    with pytest.raises(EnvironmentFileError, match=r"zaiproxy.env:3: '1BAD' is not a valid"):
        parseEnvironmentFile("A=1\n\n1BAD=2\n", "zaiproxy.env")


def test_unterminatedQuote() -> None:
    """
    A quote left open is an error, and the message does not quote the value.
    """
    with pytest.raises(EnvironmentFileError) as raised:
        parseEnvironmentFile('ZAI_API_KEY="secret-value\n', "f")
    assert "unterminated quote" in str(raised.value)
    assert "secret-value" not in str(raised.value)


def test_readMissingFile(tmp_path: pytest.TempPathFactory) -> None:
    """
    A missing file is a one-line error naming it.
    """
    path = f"{tmp_path}/absent.env"
    with pytest.raises(EnvironmentFileError, match=r"cannot read config file .*absent\.env"):
        readEnvironmentFile(path)


def test_readFile(tmp_path: pytest.TempPathFactory) -> None:
    """
    A file on disk is read as UTF-8.
    """
    path = f"{tmp_path}/z.env"
    with open(path, "w", encoding="utf-8") as f:
        f.write("DEPLOYMENT_VARIANT=canary-é\n")
    assert readEnvironmentFile(path) == {"DEPLOYMENT_VARIANT": "canary-é"}
