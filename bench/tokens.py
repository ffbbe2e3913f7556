"""
Tokens counted per CPU-second, in this process, with
C{zaiproxy.usage.tokens.loadCounter}, on a deterministic ~1 MB mixed corpus
(English prose, Python code, JSON tool calls, Chinese): one big text,
~20-character pieces (an SSE delta), C{INLINE_CHARS} pieces through
C{Counting.count}, and two threads at once (tiktoken releases the GIL).

The C{tokens} section of C{python -m bench.counting}.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.harness import DISTURBED, Harness, cpuTimes, memory

_WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which have not but "
    "can all will one would there their been has more if when who what so up out about into than them "
    "only other new some could time these two may then do first any like now my such make over our even "
    "most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very world still own see men work long "
    "get here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three request response server client proxy "
    "stream token model function error value return handler connection timeout retry budget latency "
    "upstream deploy config cache memory thread buffer parser header payload message review change test "
    "failure branch commit merge release version module interface install package library migration"
).split()

_IDENTS = (
    "request response body headers stream chunk buffer parser reader writer count total usage tokens "
    "model client pool agent reactor deferred result error reason status payload config settings item "
    "items index offset limit size data text line lines path name value key keys cache state"
).split()

_CHINESE = (
    "我们 需要 这个 函数 代码 问题 用户 数据 请求 服务器 模型 返回 错误 修改 文件 测试 结果 "
    "可以 应该 如果 因为 所以 但是 然后 已经 没有 一个 一些 现在 时候 重新 处理 检查 配置 "
    "接口 参数 日志 性能 内存 线程 连接 超时 重试 部署 版本 更新 实现 支持 使用 调用 输出 输入 "
    "流式 响应 令牌 计数 统计 费用 缓存 读取 写入 关闭 打开 启动 停止 运行 失败 成功 分析 优化"
).split()


def _english(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    n = 0
    while n < size:
        sentences = []
        for _ in range(rng.randint(3, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 22))]
            if rng.random() < 0.4:
                words[rng.randrange(len(words))] += ","
            if rng.random() < 0.15:
                words.insert(rng.randrange(len(words)), str(rng.randint(2, 2048)))
            sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
        paragraph = " ".join(sentences)
        parts.append(paragraph)
        n += len(paragraph) + 2
    return "\n\n".join(parts)


def _code(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    n = 0
    while n < size:
        name = "_".join(rng.sample(_IDENTS, 2))
        a, b, c = rng.sample(_IDENTS, 3)
        limit = rng.randint(1, 65536)
        block = (
            f"def {name}({a}: dict[str, Any], {b}: int = {limit}) -> list[str]:\n"
            f'    """\n    {_english(rng, 60).strip()}\n    """\n'
            f"    {c} = {a}.get({b!r:}, None) or []\n"
            f"    if len({c}) > {b}:\n"
            f'        raise ValueError(f"{{len({c})}} {rng.choice(_WORDS)} over {{{b}}}")\n'
            f"    out: list[str] = []\n"
            f"    for i, {a}_{c} in enumerate({c}[:{rng.randint(2, 512)}]):\n"
            f"        if i % {rng.randint(2, 9)} == 0 and {a}_{c}.strip():\n"
            f'            out.append("{rng.choice(_IDENTS)}=" + str({a}_{c}))\n'
            f"        elif {a}_{c} is None:\n"
            f"            continue\n"
            f"    return sorted(out, key=len)  # {rng.choice(_WORDS)} {rng.choice(_WORDS)}\n\n\n"
        )
        parts.append(block)
        n += len(block)
    return "".join(parts)


def _json(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    n = 0
    while n < size:
        record = {
            "id": "toolu_" + "".join(rng.choice("0123456789abcdefABCDEF") for _ in range(24)),
            "type": "tool_use",
            "name": rng.choice(("read_file", "edit_file", "run_command", "search", "list_dir")),
            "input": {
                "path": "/src/" + "/".join(rng.sample(_IDENTS, 3)) + ".py",
                "line": rng.randint(1, 4000),
                "replace_all": rng.random() < 0.5,
                "old_string": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))),
                "new_string": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))),
                "scores": [round(rng.random(), 4) for _ in range(rng.randint(1, 6))],
            },
        }
        text = json.dumps(record, indent=2 if rng.random() < 0.5 else None, ensure_ascii=False) + "\n"
        parts.append(text)
        n += len(text)
    return "".join(parts)


def _chinese(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    n = 0
    while n < size:
        sentence = "".join(rng.choice(_CHINESE) for _ in range(rng.randint(4, 14)))
        if rng.random() < 0.3:
            # Chinese text takes the full-width comma, question and exclamation marks.
            sentence += "，" + "".join(rng.choice(_CHINESE) for _ in range(rng.randint(3, 8)))  # noqa: RUF001
        sentence += rng.choice("。。。？！")  # noqa: RUF001
        parts.append(sentence)
        n += len(sentence)
    return "".join(parts)


#: Shares of the corpus by characters.
CORPUS_MIX = (
    ("English prose", _english, 0.4),
    ("Python code", _code, 0.3),
    ("JSON", _json, 0.2),
    ("Chinese", _chinese, 0.1),
)


def buildCorpus(chars: int, seed: int = 20261123) -> tuple[str, dict[str, int]]:
    """
    A deterministic mix of English, code, JSON and Chinese of about C{chars}
    characters, in blocks of 1-4 K characters in a shuffled order (as a
    conversation would interleave them).
    """
    rng = random.Random(seed)
    blocks: list[tuple[str, str]] = []
    shares: dict[str, int] = {}
    for label, make, share in CORPUS_MIX:
        want = int(chars * share)
        made = 0
        while made < want:
            block = make(rng, min(rng.randint(1000, 4000), want - made))
            blocks.append((label, block))
            made += len(block)
        shares[label] = made
    rng.shuffle(blocks)
    return "\n".join(block for _, block in blocks), shares


def _rss() -> int:
    return memory(os.getpid())["VmRSS"]


class Cpu:
    """
    Process CPU and wall time over a block, and what else ran on the CPUs.
    """

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus

    def __enter__(self) -> Cpu:
        self._machine = cpuTimes()
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self._cpu
        self.wall = time.perf_counter() - self._wall
        after = cpuTimes()
        busy = sum(after[c][0] - self._machine[c][0] for c in self.cpus)
        steal = sum(after[c][1] - self._machine[c][1] for c in self.cpus)
        # Busy time on our CPUs that was not ours, as a share of the wall time.
        self.others = max(0.0, busy - self.cpu) / self.wall / len(self.cpus)
        self.steal = steal / self.wall / len(self.cpus)


class Workers:
    """
    Long-lived counting threads, as the reactor's thread pool keeps its
    threads: tiktoken keeps per-thread regex state that a new thread must
    warm up first, which a fresh thread per measurement would time too.
    """

    def __init__(self, counter: Any, n: int) -> None:
        self._count = counter.count
        self._inboxes: list[queue.Queue[list[str] | None]] = [queue.Queue() for _ in range(n)]
        self._results: queue.Queue[int] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._loop, args=(box,), daemon=True) for box in self._inboxes
        ]
        for thread in self._threads:
            thread.start()

    def _loop(self, inbox: queue.Queue[list[str] | None]) -> None:
        count = self._count
        while (pieces := inbox.get()) is not None:
            self._results.put(sum(count(p) for p in pieces))

    def run(self, pieces: list[str], n: int) -> tuple[int, int]:
        """
        The first C{n} threads each count every piece, at once.
        """
        for box in self._inboxes[:n]:
            box.put(pieces)
        return sum(self._results.get() for _ in range(n)), n * sum(len(p) for p in pieces)

    def close(self) -> None:
        for box in self._inboxes:
            box.put(None)
        for thread in self._threads:
            thread.join()


Work = Callable[[], tuple[int, int]]


def _attempt(harness: Harness, work: Work, cpus: set[int], times: int) -> dict[str, Any]:
    """
    Run C{work} C{times} in a row after a quiet machine; its tokens,
    characters, CPU and wall time, and what else ran on C{cpus}.
    """
    # Only the CPUs this measurement uses need to be quiet.
    harness.waitForQuiet(cpus=tuple(sorted(cpus)))
    tokens = chars = 0
    with Cpu(cpus) as c:
        for _ in range(times):
            t, n = work()
            tokens += t
            chars += n
    return {
        "tokens": tokens,
        "chars": chars,
        "cpu": c.cpu,
        "wall": c.wall,
        "tokensPerCpuSecond": tokens / c.cpu if c.cpu else float("nan"),
        "tokensPerWallSecond": tokens / c.wall,
        "charsPerCpuSecond": chars / c.cpu if c.cpu else float("nan"),
        "others": c.others,
        "steal": c.steal,
    }


def measureWorks(
    harness: Harness, works: dict[str, Work], reps: int, cpus: set[int], times: int = 1
) -> dict[str, dict[str, Any]]:
    """
    Each work returns (tokens, characters). C{reps} rounds of every work,
    interleaved (the order reversed every other round) so drift in the
    machine's speed hits them alike; the quietest of the attempts of each
    is kept, and the median of each figure over the rounds.
    """
    os.sched_setaffinity(0, cpus)
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in works}
    for rep in range(reps):
        for label in list(works) if rep % 2 == 0 else list(works)[::-1]:
            attempts: list[dict[str, Any]] = []
            for _ in range(1 + max(0, harness.plan.retries)):
                attempts.append(_attempt(harness, works[label], cpus, times))
                if attempts[-1]["others"] <= DISTURBED and attempts[-1]["steal"] <= DISTURBED:
                    break
                time.sleep(5)  # someone else's test run started meanwhile: let it pass
            row = min(attempts, key=lambda r: r["others"] + r["steal"])
            rows[label].append({**row, "attempts": len(attempts)})
    return {label: _medians(harness, label, each) for label, each in rows.items()}


def _medians(harness: Harness, label: str, each: list[dict[str, Any]]) -> dict[str, Any]:
    x: dict[str, Any] = {k: statistics.median(r[k] for r in each) for k in each[0]}
    x["min"] = min(r["tokensPerCpuSecond"] for r in each)
    x["max"] = max(r["tokensPerCpuSecond"] for r in each)
    x["rows"] = each
    x["maxOthers"] = max(r["others"] for r in each)
    x["maxSteal"] = max(r["steal"] for r in each)
    if x["maxOthers"] > DISTURBED or x["maxSteal"] > DISTURBED:
        harness.problem(
            f"tokens, {label}: up to {x['maxOthers']:.0%} of the CPUs used by other processes and "
            f"{x['maxSteal']:.0%} stolen by the host in a run"
        )
    harness.say(
        f"  {label}: {x['tokensPerCpuSecond'] / 1e6:.2f} M tokens/CPU-s, "
        f"{x['tokensPerWallSecond'] / 1e6:.2f} M tokens/wall-s ({x['tokens']:.0f} tokens)"
    )
    return x


def loadTokenizer(harness: Harness, cpu: int | None) -> tuple[Any, dict[str, Any]]:
    """
    C{loadCounter({})}, timed, with the RSS it adds.
    """
    from zaiproxy.usage.tokens import loadCounter

    cpus = {cpu} if cpu is not None else set(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)
    harness.waitForQuiet(cpus=tuple(sorted(cpus)))
    rss = _rss()
    with Cpu(cpus) as load:
        counter, problems = loadCounter({})
    added = _rss() - rss
    if counter.name != "tiktoken":
        harness.problem(f"loadCounter gave the {counter.name} counter: {problems}")
    harness.say(f"  loadCounter: {counter.name} in {load.wall * 1e3:.0f} ms, +{added / 2**20:.1f} MiB RSS")
    info = {"counter": f"{counter.name} ({counter.encoding})", "problems": problems, "cpu": load.cpu}
    return counter, {**info, "wall": load.wall, "rss": added}


def singleThread(harness: Harness, counter: Any, corpus: str, reps: int, cpus: set[int]) -> dict[str, Any]:
    """
    One thread: the whole corpus at once, in 20-character pieces, and in
    C{INLINE_CHARS} pieces through C{Counting.count}.
    """
    from zaiproxy.usage.tokens import INLINE_CHARS, Counting

    short = [corpus[i : i + 20] for i in range(0, len(corpus), 20)]
    inline = [corpus[i : i + INLINE_CHARS] for i in range(0, len(corpus), INLINE_CHARS)]
    counting = Counting(None, counter)

    def big() -> tuple[int, int]:
        return counter.count(corpus), len(corpus)

    def shorts() -> tuple[int, int]:
        count = counter.count
        return sum(count(text) for text in short), len(corpus)

    def inlines() -> tuple[int, int]:
        totals: list[int] = []
        for piece in inline:
            counting.count([piece]).addCallback(totals.append)
        return sum(totals), len(corpus)

    # Warm this thread's tokenizer state up on every kind of text first.
    big()
    shorts()
    works: dict[str, Work] = {"big": big, "short": shorts, "inline": inlines}
    results: dict[str, Any] = dict(measureWorks(harness, works, reps, cpus))
    results["short"].update(texts=len(short), perCallUs=results["short"]["cpu"] / len(short) * 1e6)
    results["inline"]["texts"] = len(inline)
    results["inlineChars"] = INLINE_CHARS
    return results


def twoThreads(harness: Harness, counter: Any, corpus: str, reps: int, cpus: set[int]) -> dict[str, Any]:
    """
    The thread-pool path: two long-lived threads counting at once against
    one, interleaved, free to use every CPU of C{cpus}.
    """
    short = [corpus[i : i + 20] for i in range(0, len(corpus), 20)]
    chunks = [corpus[i : i + 65536] for i in range(0, len(corpus), 65536)]
    os.sched_setaffinity(0, cpus)
    workers = Workers(counter, 2)
    results: dict[str, Any] = {}
    try:
        for pieces in (chunks, short):
            workers.run(pieces, 2)
        for name, pieces in (("threadsBig", chunks), ("threadsShort", short)):
            works: dict[str, Work] = {
                f"{name} 1 thread": lambda p=pieces: workers.run(p, 1),  # type: ignore[misc]
                f"{name} 2 threads": lambda p=pieces: workers.run(p, 2),  # type: ignore[misc]
            }
            both = measureWorks(harness, works, max(reps, 5), cpus, times=2)
            one, two = both[f"{name} 1 thread"], both[f"{name} 2 threads"]
            speedups = [
                t["tokensPerWallSecond"] / o["tokensPerWallSecond"]
                for o, t in zip(one["rows"], two["rows"], strict=True)
            ]
            results[name] = {"one": one, "two": two, "texts": len(pieces), "pieceChars": len(pieces[0])}
            results[name].update(speedup=statistics.median(speedups), speedups=speedups)
    finally:
        workers.close()
    return results


def measureTokens(harness: Harness, corpusChars: int, reps: int) -> dict[str, Any]:
    """
    The whole section: the tokenizer's load, one thread pinned to the SUT
    CPU, then two threads on every CPU; back on the load CPU at the end.
    """
    cpus = harness.cpus
    sut = {cpus.sut} if cpus.sut is not None else set(os.sched_getaffinity(0))
    every = set(cpus.all()) or sut
    counter, load = loadTokenizer(harness, cpus.sut)
    corpus, shares = buildCorpus(corpusChars)
    results: dict[str, Any] = {"load": load}
    results["corpus"] = {
        "chars": len(corpus),
        "bytes": len(corpus.encode()),
        "shares": shares,
        "sha256": hashlib.sha256(corpus.encode()).hexdigest()[:12],
    }
    results.update(singleThread(harness, counter, corpus, reps, sut))
    results.update(twoThreads(harness, counter, corpus, reps, every))
    if cpus.load is not None:
        os.sched_setaffinity(0, {cpus.load})
    return results
