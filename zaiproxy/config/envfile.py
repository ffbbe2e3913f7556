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
    result: dict[str, str] = {}
    state = "preKey"
    key: list[str] = []
    value: list[str] = []
    # Length of value that must survive trailing-whitespace trimming:
    # quoted and escaped characters are never trimmed.
    keep = 0
    line = 1
    keyLine = 1

    def assign() -> None:
        name = "".join(key).rstrip(_WHITESPACE)
        text = "".join(value)
        cut = len(text.rstrip(_WHITESPACE))
        text = text[: max(cut, keep)]
        if not _KEY.match(name):
            raise EnvironmentFileError(f"{source}:{keyLine}: {name!r} is not a valid variable name")
        result[name] = text

    for char in text + "\n":
        if state == "preKey":
            if char in _COMMENTS:
                state = "comment"
            elif char == "\n":
                pass
            elif char not in _WHITESPACE:
                state = "key"
                key = [char]
                value = []
                keep = 0
                keyLine = line
        elif state == "key":
            if char == "\n":
                # A line without "=": systemd ignores it.
                state = "preKey"
            elif char == "=":
                state = "preValue"
            else:
                key.append(char)
        elif state == "preValue":
            if char == "\n":
                assign()
                state = "preKey"
            elif char == "'":
                state = "singleQuote"
            elif char == '"':
                state = "doubleQuote"
            elif char == "\\":
                state = "valueEscape"
            elif char not in _WHITESPACE:
                value.append(char)
                state = "value"
        elif state == "value":
            if char == "\n":
                assign()
                state = "preKey"
            elif char == "\\":
                state = "valueEscape"
            else:
                value.append(char)
        elif state == "valueEscape":
            if char != "\n":
                value.append(char)
                keep = len(value)
            state = "value"
        elif state == "singleQuote":
            if char == "'":
                keep = len(value)
                state = "preValue"
            else:
                value.append(char)
        elif state == "doubleQuote":
            if char == '"':
                keep = len(value)
                state = "preValue"
            elif char == "\\":
                state = "doubleQuoteEscape"
            else:
                value.append(char)
        elif state == "doubleQuoteEscape":
            if char in _DOUBLE_QUOTE_ESCAPES:
                value.append(char)
            elif char != "\n":
                value.append("\\")
                value.append(char)
            state = "doubleQuote"
        elif state == "comment":
            if char == "\\":
                state = "commentEscape"
            elif char == "\n":
                state = "preKey"
        elif state == "commentEscape":
            state = "comment"
        if char == "\n":
            line += 1

    if state in ("singleQuote", "doubleQuote", "doubleQuoteEscape"):
        raise EnvironmentFileError(f"{source}:{keyLine}: unterminated quote in the value of {''.join(key)}")
    return result


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
