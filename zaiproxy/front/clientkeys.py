# -*- test-case-name: tests.test_clientkeys -*-
"""
Client keys: who may spend the upstream quota through the proxy.

Keys come from C{PROXY_API_KEYS_FILE} (one C{name:key} per line) and
C{PROXY_API_KEYS} (a comma-separated C{name:key} list). A key may be stored
as C{sha256:<64 hex digits>}, so the file need not hold the key itself.
Every key is kept only as its SHA-256 digest, and a presented key is hashed
and compared with every stored digest in constant time, without stopping
at a match, so neither timing nor order tells which entry matched.

The name is what the rest of the proxy sees: the C{client} metric label,
the access log's C{client} field and the admission queue's fairness key.
It is never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from collections.abc import Iterable

import attrs
from twisted.web.http_headers import Headers

__all__ = [
    "UNAUTHORIZED",
    "ClientKey",
    "ClientKeys",
    "ClientKeysError",
    "buildClientKeys",
    "parseInlineKeys",
    "presentedKeys",
    "readKeyFile",
]

#: The C{client} value of requests refused for a missing or unknown key.
UNAUTHORIZED = "unauthorized"

# Metric-label-safe and short: the name ends up in Prometheus and log lines.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_HASHED = "sha256:"
_HEX = re.compile(r"[0-9a-fA-F]{64}\Z")
#: Plain keys shorter than this are accepted with a warning.
_SHORT_KEY = 16
#: Names the proxy uses itself.
_RESERVED = frozenset([UNAUTHORIZED, "-"])


class ClientKeysError(ValueError):
    """
    A key list or key file is invalid; C{str()} is one line that names the
    place and never quotes a key.
    """


@attrs.frozen
class ClientKey:
    """
    One client: its name and the SHA-256 digest of its key.

    @ivar where: where it was defined (C{"/etc/zaiproxy/keys line 3"}), for
        error messages.
    """

    name: str
    digest: bytes = attrs.field(repr=False)
    where: str = attrs.field(eq=False)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _parseEntry(text: str, where: str, warnings: list[str]) -> ClientKey:
    """
    One C{name:key} or C{name:sha256:<hex>} entry.
    """
    name, sep, key = text.partition(":")
    name, key = name.strip(), key.strip()
    if not sep:
        raise ClientKeysError(f"{where}: expected name:key")
    if not name:
        raise ClientKeysError(f"{where}: the name is empty")
    if not _NAME.match(name):
        raise ClientKeysError(
            f"{where}: name {name!r} is not valid: use 1 to 64 letters, digits, '_', '.' "
            "or '-', starting with a letter or digit"
        )
    if name.lower() in _RESERVED:
        raise ClientKeysError(f"{where}: name {name!r} is reserved by the proxy")
    if not key:
        raise ClientKeysError(f"{where}: the key of {name!r} is empty")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise ClientKeysError(f"{where}: the key of {name!r} contains spaces or control characters")
    if key.lower().startswith(_HASHED):
        hexDigest = key[len(_HASHED) :]
        if not _HEX.match(hexDigest):
            raise ClientKeysError(
                f"{where}: the key of {name!r} starts with sha256: but is not 64 hex digits after it"
            )
        return ClientKey(name, bytes.fromhex(hexDigest), where)
    if len(key) < _SHORT_KEY:
        warnings.append(
            f"{where}: the key of {name!r} is shorter than {_SHORT_KEY} characters and easy to guess"
        )
    return ClientKey(name, _digest(key), where)


def parseInlineKeys(text: str) -> tuple[ClientKey, ...]:
    """
    C{PROXY_API_KEYS}: comma-separated C{name:key} entries (empty entries
    ignored). Used as a settings parser, so it raises L{ClientKeysError}
    (a L{ValueError}) whose text names the entry, never the key.
    """
    entries = []
    for index, entry in enumerate(text.split(","), 1):
        if entry.strip():
            entries.append(_parseEntry(entry, f"entry {index}", []))
    _checkUnique(entries)
    return tuple(entries)


def readKeyFile(path: str) -> tuple[list[ClientKey], list[str]]:
    """
    Read a key file: C{name:key} lines, blank lines and C{#} comments.

    @return: the keys and warnings (a world-readable file, short keys).
    @raise ClientKeysError: unreadable, empty, or a bad line.
    """
    warnings: list[str] = []
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read()
    except OSError as e:
        raise ClientKeysError(f"cannot read key file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientKeysError(f"key file {path} is not UTF-8 text") from None
    if mode & stat.S_IROTH:
        warnings.append(
            f"key file {path} is readable by every user (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 0640 or 0600 it"
        )
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keys.append(_parseEntry(stripped, f"{path} line {number}", warnings))
    if not keys:
        raise ClientKeysError(f"key file {path} holds no keys")
    return keys, warnings


def _checkUnique(keys: Iterable[ClientKey]) -> None:
    names: dict[str, ClientKey] = {}
    digests: dict[bytes, ClientKey] = {}
    for key in keys:
        same = names.get(key.name.lower())
        if same is not None:
            raise ClientKeysError(f"{key.where}: the name {key.name!r} is already used at {same.where}")
        same = digests.get(key.digest)
        if same is not None:
            raise ClientKeysError(f"{key.where}: the key of {key.name!r} is the same as at {same.where}")
        names[key.name.lower()] = key
        digests[key.digest] = key


def buildClientKeys(inline: Iterable[ClientKey], path: str | None) -> tuple[ClientKeys | None, list[str]]:
    """
    The key set from C{PROXY_API_KEYS} and the key file, or L{None} when
    neither configures a key (the proxy is then open, as before).
    """
    keys = list(inline)
    warnings: list[str] = []
    if path:
        fromFile, warnings = readKeyFile(path)
        keys.extend(fromFile)
    if not keys:
        return None, warnings
    _checkUnique(keys)
    return ClientKeys(tuple(keys)), warnings


@attrs.frozen
class ClientKeys:
    """
    The configured clients; look a presented key up with L{lookup}.
    """

    keys: tuple[ClientKey, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, presented: bytes) -> str | None:
        """
        The name of the client whose key is C{presented}, or L{None}.

        Every stored digest is compared (C{hmac.compare_digest}); the loop
        never stops early.
        """
        digest = hashlib.sha256(presented).digest()
        found: str | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.name
        return found

    def lookupAny(self, presented: Iterable[bytes]) -> str | None:
        """
        The client of the first of C{presented} (see L{presentedKeys}) that
        is a configured key, or L{None}; every candidate is looked up.
        """
        found: str | None = None
        for candidate in presented:
            name = self.lookup(candidate)
            if found is None:
                found = name
        return found


def presentedKeys(headers: Headers) -> list[bytes]:
    """
    The keys a client presents, as Claude Code and the SDKs send them:
    C{Authorization: Bearer <key>} (C{ANTHROPIC_AUTH_TOKEN}, the OpenAI SDK)
    and C{x-api-key: <key>} (C{ANTHROPIC_API_KEY}, the anthropic SDK).
    """
    keys = []
    for value in headers.getRawHeaders(b"authorization", ()):
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            keys.append(credentials.strip())
    for value in headers.getRawHeaders(b"x-api-key", ()):
        if value.strip():
            keys.append(value.strip())
    return keys
