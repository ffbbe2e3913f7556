# -*- test-case-name: tests.test_envfile -*-
"""
A reader for systemd's EnvironmentFile= syntax.

The same file feeds systemd (C{EnvironmentFile=/etc/zaiproxy/zaiproxy.env})
and C{twistd zaiproxy --config}, so it must be read the way systemd reads it
(C{parse_env_file} in systemd's C{env-file.c}): C{KEY=VALUE} lines, C{#} and
C{;} comments at the start of a line, single quotes taken literally, double
quotes with backslash escapes, and a trailing backslash joining lines.
"""

from __future__ import annotations

import re

__all__ = ["EnvironmentFileError", "parseEnvironmentFile", "readEnvironmentFile"]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WHITESPACE = " \t\r"
_COMMENTS = "#;"
# Inside double quotes a backslash escapes only these (as in a shell).
_DOUBLE_QUOTE_ESCAPES = '"\\`$'


class EnvironmentFileError(ValueError):
    """
    The file cannot be read as an environment file; the message names the
    line.
    """


def parseEnvironmentFile(text: str, source: str = "<config>") -> dict[str, str]:
    """
    Parse C{text} as systemd parses an EnvironmentFile.

    Lines without C{=} are ignored, as systemd ignores them; a key that is
    not a valid variable name is an error here (systemd skips it with a
    warning, which is how typos go unnoticed).

    @param source: names the file in error messages.
    @return: the assignments in file order; a later one wins.
    """
    parser = _Parser(source)
    for char in text + "\n":
        parser.feed(char)
    return parser.finish()


class _Parser:
    """
    systemd's EnvironmentFile parser (C{parse_env_file_internal}), one
    method per state, a character at a time.
    """

    def __init__(self, source: str) -> None:
        self._source = source
        self.result: dict[str, str] = {}
        self._state = self._preKey
        self._key: list[str] = []
        self._value: list[str] = []
        # Length of value that must survive trailing-whitespace trimming:
        # quoted and escaped characters are never trimmed.
        self._keep = 0
        self._line = 1
        self._keyLine = 1

    def feed(self, char: str) -> None:
        self._state(char)
        if char == "\n":
            self._line += 1

    def finish(self) -> dict[str, str]:
        if self._state in (self._singleQuote, self._doubleQuote, self._doubleQuoteEscape):
            raise EnvironmentFileError(
                f"{self._source}:{self._keyLine}: unterminated quote in the value of {''.join(self._key)}"
            )
        return self.result

    def _assign(self) -> None:
        name = "".join(self._key).rstrip(_WHITESPACE)
        text = "".join(self._value)
        cut = len(text.rstrip(_WHITESPACE))
        text = text[: max(cut, self._keep)]
        if not _KEY.match(name):
            raise EnvironmentFileError(
                f"{self._source}:{self._keyLine}: {name!r} is not a valid variable name"
            )
        self.result[name] = text
        self._state = self._preKey

    def _preKey(self, char: str) -> None:
        if char in _COMMENTS:
            self._state = self._comment
        elif char != "\n" and char not in _WHITESPACE:
            self._state = self._inKey
            self._key = [char]
            self._value = []
            self._keep = 0
            self._keyLine = self._line

    def _inKey(self, char: str) -> None:
        if char == "\n":
            # A line without "=": systemd ignores it.
            self._state = self._preKey
        elif char == "=":
            self._state = self._preValue
        else:
            self._key.append(char)

    def _preValue(self, char: str) -> None:
        if char == "\n":
            self._assign()
        elif char == "'":
            self._state = self._singleQuote
        elif char == '"':
            self._state = self._doubleQuote
        elif char == "\\":
            self._state = self._valueEscape
        elif char not in _WHITESPACE:
            self._value.append(char)
            self._state = self._inValue

    def _inValue(self, char: str) -> None:
        if char == "\n":
            self._assign()
        elif char == "\\":
            self._state = self._valueEscape
        else:
            self._value.append(char)

    def _valueEscape(self, char: str) -> None:
        if char != "\n":
            self._value.append(char)
            self._keep = len(self._value)
        self._state = self._inValue

    def _singleQuote(self, char: str) -> None:
        if char == "'":
            self._keep = len(self._value)
            self._state = self._preValue
        else:
            self._value.append(char)

    def _doubleQuote(self, char: str) -> None:
        if char == '"':
            self._keep = len(self._value)
            self._state = self._preValue
        elif char == "\\":
            self._state = self._doubleQuoteEscape
        else:
            self._value.append(char)

    def _doubleQuoteEscape(self, char: str) -> None:
        if char in _DOUBLE_QUOTE_ESCAPES:
            self._value.append(char)
        elif char != "\n":
            self._value.append("\\")
            self._value.append(char)
        self._state = self._doubleQuote

    def _comment(self, char: str) -> None:
        if char == "\\":
            self._state = self._commentEscape
        elif char == "\n":
            self._state = self._preKey

    def _commentEscape(self, char: str) -> None:
        self._state = self._comment


def readEnvironmentFile(path: str) -> dict[str, str]:
    """
    Read and parse the environment file at C{path}.

    @raise EnvironmentFileError: if it cannot be read or parsed; the message
        never quotes a value, which may be a secret.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise EnvironmentFileError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise EnvironmentFileError(f"config file {path} is not UTF-8 text") from None
    return parseEnvironmentFile(text, path)
