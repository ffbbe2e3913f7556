"""
What token accounting costs, in one run: two proxies that differ only in
C{TOKEN_COUNTING_ENABLED} (true / false), measured alternately on the same
machine, then tiktoken's own speed in this process.

The setup is bench/run.py's: one fake upstream (bench/fakeserver.py) and wrk
and every client on CPU 1; both proxies pinned to CPU 0, started together
and loaded one at a time (never concurrently), in an order that swaps every
round, so drift in the machine's speed hits both alike. A run disturbed by
other processes on CPU 0 is measured again (run.py's C{measure}). Sections:

- throughput and proxy CPU per request at 32 connections (wrk, ~1 KB
  POSTs) for each answer kind: C{json} (the cost is holding the body and
  parsing its usage), C{stream} (the fake's default short SSE stream, 5
  text deltas: the cost is parsing every SSE event), and, as extras, the
  same with C{x-fake-scenario: usage=none}, where Z.AI reports no usage and
  the proxy counts the prompt and the answer with tiktoken (the worst case);
- time to the first SSE event, sequential streams on new connections,
  alternating between the two proxies request by request;
- tokens counted per CPU-second (C{time.process_time}), in-process, with
  C{zaiproxy.usage.tokens.loadCounter}, on a deterministic ~1 MB mixed corpus
  (English prose, Python code, JSON, Chinese): one big text, ~20-character
  pieces (an SSE delta), C{INLINE_CHARS} pieces through C{Counting.count},
  and two threads at once (tiktoken releases the GIL).

    .venv/bin/python bench/counting.py                  # everything, ~8 minutes
    .venv/bin/python bench/counting.py --only tokens    # tiktoken alone, ~1 minute
    .venv/bin/python bench/counting.py --modes json,stream --rounds 1 --duration 5
    .venv/bin/python bench/counting.py --modes "" --rounds 16 --control  # A/A: the bench's noise

The report goes to stdout and to bench/out/counting-<stamp>.md, with the raw
figures as JSON and both proxies' logs next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from run import (
    LIMITS_ENV,
    LOAD_CPU,
    OUT,
    PROXY_PATH,
    ROOT,
    SUT_CPU,
    TWISTD,
    BenchError,
    Child,
    Children,
    Run,
    cpuTimes,
    disturbance,
    machineFacts,
    measure,
    memory,
    percentile,
    prepareProcess,
    requestBody,
    scanLog,
    spawnProxy,
    startFake,
    streamRequest,
    treeState,
    verdict,
    waitForQuiet,
    waitReady,
    writeWrkScript,
)

#: The issue's targets.
TARGET_THROUGHPUT_RATIO = 0.85

#: Answer kinds under wrk: (streamed?, x-fake-scenario or None).
MODES: dict[str, tuple[bool, str | None]] = {
    "json": (False, None),
    "stream": (True, None),
    "json-nousage": (False, "usage=none"),
    "stream-nousage": (True, "usage=none"),
}
#: The kinds the targets are about; the others are shown for context.
TARGET_MODES = ("json", "stream")
MODE_TEXT = {
    "json": "JSON answer (usage reported)",
    "stream": "SSE stream, 5 deltas (usage reported)",
    "json-nousage": "JSON answer, no usage: counted",
    "stream-nousage": "SSE stream, no usage: counted",
}

#: Run.py's TTFB scenario: 5 deltas 2 ms apart.
TTFB_SCENARIO = "events=5 interval=0.002"

SIDES = ("on", "off")


# -- the proxies -----------------------------------------------------------------


def proxyPhase(run: Run, children: Children, results: dict[str, Any]) -> None:
    args = run.args
    fake, fakePort = startFake(children, run)

    def startProxies() -> tuple[dict[str, Child], dict[str, int]]:
        # Both proxies start at once and load their code from the same tree.
        spawned = {
            side: spawnProxy(
                children,
                run,
                fakePort,
                f"proxy-counting-{side}",
                {"TOKEN_COUNTING_ENABLED": "true" if side == "on" and not run.args.control else "false"},
            )
            for side in SIDES
        }
        for child, port in spawned.values():
            waitReady(child, port, "/readyz", {})
        ports = {side: spawned[side][1] for side in SIDES}
        # A few streams through each, so both have imported and warmed every path.
        for _ in range(10):
            for side in SIDES:
                streamRequest(ports[side], PROXY_PATH, "events=5", False)
        time.sleep(0.5)
        return {side: spawned[side][0] for side in SIDES}, ports

    proxies, ports = startProxies()
    urls = {side: f"http://127.0.0.1:{ports[side]}{PROXY_PATH}" for side in SIDES}
    results["rssStart"] = {side: memory(proxies[side].pid)["VmRSS"] for side in SIDES}

    scripts: dict[str, Path] = {}
    for mode in args.modes:
        stream, scenario = MODES[mode]
        headers = {"x-fake-scenario": scenario} if scenario else None
        scripts[mode] = writeWrkScript(
            OUT / f"counting-{run.stamp}-{mode}.lua", requestBody(stream=stream), headers
        )

    # Kept in the results as they grow, so an interrupted run still reports.
    load: dict[str, dict[str, list[dict[str, Any]]]] = {m: {s: [] for s in SIDES} for m in args.modes}
    ttfb: list[dict[str, list[float]]] = []
    ttfbFailed = {side: 0 for side in SIDES}
    results["load"] = load
    results["ttfb"] = ttfb
    results["ttfbFailed"] = ttfbFailed
    results["proxyLogs"] = {side: str(proxies[side].logPath) for side in SIDES}
    for round in range(args.rounds):
        if round and not args.same_processes:
            # Two processes of the same code differ by up to ~0.05 ms of
            # TTFB and a few % of throughput (memory layout, hash seeds):
            # new ones every round sample that instead of keeping one draw.
            reportDead(run, proxies)
            for side in SIDES:
                children.stop(proxies[side])
            proxies, ports = startProxies()
            urls = {side: f"http://127.0.0.1:{ports[side]}{PROXY_PATH}" for side in SIDES}
        # Swap the order every round: whatever drifts within a round
        # favours each side equally often.
        order = SIDES if round % 2 == 0 else SIDES[::-1]
        run.say(f"round {round + 1} of {args.rounds} (order: {', '.join(order)})")
        for mode in args.modes:
            for side in order:
                load[mode][side].append(
                    measure(
                        run,
                        f"{mode} {side}",
                        urls[side],
                        args.connections,
                        {"proxy": proxies[side], "fake": fake},
                        scripts[mode],
                    )
                )
        if args.ttfb_requests:
            times, failed = ttfbRound(run, ports, order)
            ttfb.append(times)
            for side in SIDES:
                ttfbFailed[side] += failed[side]
            p50 = {side: percentile(times[side], 50) for side in SIDES}
            run.say(
                f"  TTFB p50 on {p50['on'] * 1e3:.3f} ms, off {p50['off'] * 1e3:.3f} ms, "
                f"added {(p50['on'] - p50['off']) * 1e3:+.3f} ms"
            )
    for side in SIDES:
        if ttfbFailed[side]:
            run.problem(
                f"TTFB: {ttfbFailed[side]} streams via the counting-{side} proxy failed or ended early"
            )
    results["rssEnd"] = {side: memory(proxies[side].pid)["VmRSS"] for side in SIDES}
    reportDead(run, proxies)
    children.stopAll()


def reportDead(run: Run, proxies: dict[str, Child]) -> None:
    for side in SIDES:
        if not proxies[side].alive():
            run.problem(f"the counting-{side} proxy died during the run:\n{proxies[side].tail()}")


def ttfbRound(
    run: Run, ports: dict[str, int], order: tuple[str, ...]
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """
    Sequential streams, alternating between the proxies request by request
    (and which goes first, pair by pair).
    """
    waitForQuiet(run)
    for _ in range(10):
        for side in SIDES:
            streamRequest(ports[side], PROXY_PATH, TTFB_SCENARIO, False)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    # on - off of the two streams of each pair, sent back to back: what
    # drifts over a round (the machine, the fake) cancels out.
    times["pairs"] = []
    failed = {side: 0 for side in SIDES}
    for i in range(run.args.ttfb_requests):
        pair: dict[str, float] = {}
        for side in order if i % 2 == 0 else order[::-1]:
            seconds, ok = streamRequest(ports[side], PROXY_PATH, TTFB_SCENARIO, False)
            if ok:
                times[side].append(seconds)
                pair[side] = seconds
            else:
                failed[side] += 1
        if len(pair) == 2:
            times["pairs"].append(pair["on"] - pair["off"])
    return times, failed


# -- tiktoken in-process -------------------------------------------------------------

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


def _measureWorks(
    run: Run, works: dict[str, Any], reps: int, cpus: set[int], times: int = 1
) -> dict[str, dict[str, Any]]:
    """
    Each C{work()} returns (tokens, characters). Run every work C{times}
    times in a row, C{reps} rounds, the works interleaved (their order
    reversed every other round) so that drift in the machine's speed hits
    them alike; each after a quiet machine. Keep the median of each figure.
    """
    os.sched_setaffinity(0, cpus)
    quietOn = tuple(sorted(cpus))
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in works}
    for rep in range(reps):
        for label in list(works) if rep % 2 == 0 else list(works)[::-1]:
            attempts = []
            for _attempt in range(1 + max(0, run.args.retries)):
                # Only the CPUs this measurement uses need to be quiet.
                waitForQuiet(run, cpus=quietOn)
                tokens = chars = 0
                with Cpu(cpus) as c:
                    for _ in range(times):
                        t, n = works[label]()
                        tokens += t
                        chars += n
                attempts.append(
                    {
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
                )
                if c.others <= 0.05 and c.steal <= 0.05:
                    break
                # Someone else's test run started meanwhile: let it pass.
                time.sleep(5)
            # The quietest attempt, as run.py's measure() keeps.
            row = min(attempts, key=lambda r: r["others"] + r["steal"])
            row["attempts"] = len(attempts)
            rows[label].append(row)
    out: dict[str, dict[str, Any]] = {}
    for label, each in rows.items():
        x: dict[str, Any] = {k: statistics.median(r[k] for r in each) for k in each[0]}
        x["min"] = min(r["tokensPerCpuSecond"] for r in each)
        x["max"] = max(r["tokensPerCpuSecond"] for r in each)
        x["rows"] = each
        x["maxOthers"] = max(r["others"] for r in each)
        x["maxSteal"] = max(r["steal"] for r in each)
        if x["maxOthers"] > 0.05 or x["maxSteal"] > 0.05:
            run.problem(
                f"tokens, {label}: up to {x['maxOthers'] * 100:.0f}% of the CPUs used by other processes and "
                f"{x['maxSteal'] * 100:.0f}% stolen by the host in a run"
            )
        run.say(
            f"  {label}: {x['tokensPerCpuSecond'] / 1e6:.2f} M tokens/CPU-s, "
            f"{x['tokensPerWallSecond'] / 1e6:.2f} M tokens/wall-s ({x['tokens']:.0f} tokens)"
        )
        out[label] = x
    return out


def tokensPhase(run: Run, results: dict[str, Any]) -> None:
    from zaiproxy.usage.tokens import INLINE_CHARS, Counting, loadCounter

    args = run.args
    os.sched_setaffinity(0, {SUT_CPU})
    waitForQuiet(run, cpus=(SUT_CPU,))
    rss = _rss()
    with Cpu({SUT_CPU}) as load:
        counter, problems = loadCounter({})
    results["load"] = {
        "counter": f"{counter.name} ({counter.encoding})",
        "problems": problems,
        "cpu": load.cpu,
        "wall": load.wall,
        "rss": _rss() - rss,
    }
    if counter.name != "tiktoken":
        run.problem(f"loadCounter gave the {counter.name} counter: {problems}")
    run.say(
        f"  loadCounter: {counter.name} in {load.wall * 1e3:.0f} ms, +{(_rss() - rss) / 2**20:.1f} MiB RSS"
    )

    corpus, shares = buildCorpus(int(args.corpus_mb * 1_000_000))
    results["corpus"] = {
        "chars": len(corpus),
        "bytes": len(corpus.encode()),
        "shares": shares,
        "sha256": hashlib.sha256(corpus.encode()).hexdigest()[:12],
    }
    short = [corpus[i : i + 20] for i in range(0, len(corpus), 20)]
    inline = [corpus[i : i + INLINE_CHARS] for i in range(0, len(corpus), INLINE_CHARS)]
    chunks = [corpus[i : i + 65536] for i in range(0, len(corpus), 65536)]
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
    single = _measureWorks(run, {"big": big, "short": shorts, "inline": inlines}, args.token_reps, {SUT_CPU})
    results.update(single)
    results["short"]["texts"] = len(short)
    results["short"]["perCallUs"] = results["short"]["cpu"] / len(short) * 1e6
    results["inline"]["texts"] = len(inline)
    results["inlineChars"] = INLINE_CHARS

    # The thread-pool path: texts over INLINE_CHARS, two threads at once,
    # against one thread, interleaved. The workers inherit this thread's
    # CPUs: both.
    os.sched_setaffinity(0, {SUT_CPU, LOAD_CPU})
    workers = Workers(counter, 2)
    try:
        for pieces in (chunks, short):
            workers.run(pieces, 2)
        for name, pieces in (("threadsBig", chunks), ("threadsShort", short)):
            both = _measureWorks(
                run,
                {
                    f"{name} 1 thread": lambda p=pieces: workers.run(p, 1),
                    f"{name} 2 threads": lambda p=pieces: workers.run(p, 2),
                },
                max(args.token_reps, 5),
                {SUT_CPU, LOAD_CPU},
                times=2,
            )
            one, two = both[f"{name} 1 thread"], both[f"{name} 2 threads"]
            speedups = [
                t["tokensPerWallSecond"] / o["tokensPerWallSecond"]
                for o, t in zip(one["rows"], two["rows"], strict=True)
            ]
            results[name] = {
                "one": one,
                "two": two,
                "texts": len(pieces),
                "pieceChars": len(pieces[0]),
                "speedup": statistics.median(speedups),
                "speedups": speedups,
            }
    finally:
        workers.close()
    os.sched_setaffinity(0, {LOAD_CPU})


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


# -- the report ----------------------------------------------------------------------


def ratioRows(load: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """
    Per round, on/off of req/s and of CPU per request (the two sides of one
    round ran back to back), and their medians and ranges.
    """
    rounds = list(zip(load["on"], load["off"], strict=True))
    rps = [on["rps"] / off["rps"] for on, off in rounds]
    cpu = [on["proxyCpuPerRequestUs"] / off["proxyCpuPerRequestUs"] for on, off in rounds]
    added = [on["proxyCpuPerRequestUs"] - off["proxyCpuPerRequestUs"] for on, off in rounds]

    def med(side: str, key: str) -> float:
        return float(statistics.median(r[key] for r in load[side]))

    return {
        "rps": {s: med(s, "rps") for s in SIDES},
        "rpsRange": {s: (min(r["rps"] for r in load[s]), max(r["rps"] for r in load[s])) for s in SIDES},
        "cpu": {s: med(s, "proxyCpuPerRequestUs") for s in SIDES},
        "core": {s: med(s, "proxyCore") for s in SIDES},
        "fakeCpu": {s: med(s, "fakeCpuPerRequestUs") for s in SIDES},
        "p50": {s: med(s, "p50") for s in SIDES},
        "p99": {s: med(s, "p99") for s in SIDES},
        "rpsRatio": statistics.median(rps),
        "rpsRatios": rps,
        "cpuRatio": statistics.median(cpu),
        "cpuRatios": cpu,
        "addedUs": statistics.median(added),
        "addedUsAll": added,
        "errors": sum(r["errors"] for s in SIDES for r in load[s]),
        "requests": {s: sum(r["requests"] for r in load[s]) for s in SIDES},
        "maxOthers": max(r["sutCpuOthers"] for s in SIDES for r in load[s]),
        "maxSteal": max(r["sutCpuSteal"] for s in SIDES for r in load[s]),
        "maxLoadOthers": max(r["loadCpuOthers"] for s in SIDES for r in load[s]),
        "maxLoadSteal": max(r["loadCpuSteal"] for s in SIDES for r in load[s]),
        "attempts": sum(r["attempts"] for s in SIDES for r in load[s]),
        "runs": sum(len(load[s]) for s in SIDES),
    }


def bootstrapMedianDiff(on: list[float], off: list[float], n: int = 2000) -> tuple[float, float]:
    """
    A 95% bootstrap interval of median(on) - median(off), fixed seed.
    """
    rng = random.Random(1)
    diffs = sorted(
        statistics.median(rng.choices(on, k=len(on))) - statistics.median(rng.choices(off, k=len(off)))
        for _ in range(n)
    )
    return diffs[int(n * 0.025)], diffs[int(n * 0.975) - 1]


#: Student's t, two-sided 95%, by degrees of freedom (1-20).
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
)


def tInterval(values: list[float]) -> tuple[float, float]:
    """
    The 95% t interval of the mean of C{values} (at least two).
    """
    n = len(values)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * statistics.stdev(values) / n**0.5
    mean = statistics.fmean(values)
    return mean - half, mean + half


def fmtRange(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)} to {format(max(values), fmt)}"


def report(run: Run, facts: dict[str, str], command: str, elapsed: float, treeEnd: dict[str, str]) -> str:
    args = run.args
    R = run.results
    tree = run.treeAtStart
    if treeEnd == tree:
        endText = ", the same at the end"
    else:
        endText = (
            f"; at the end: commit {treeEnd['commit']}, changes {treeEnd['changed']} "
            f"(digest {treeEnd['digest']})"
        )
    lines = [
        f"# zaiproxy: the cost of token accounting, {facts['date']}",
        "",
        f"Command: `{command}` ({elapsed:.0f} s)",
        "",
        f"Machine: {facts['nproc']} CPUs, {facts['cpu']}, Linux {facts['kernel']}; Python {facts['python']}, "
        f"Twisted {facts['twisted']}, {facts['wrk']}; load average at start {facts['loadavg']}.",
        "",
        f"Code: commit {tree['commit']}; uncommitted changes under zaiproxy/: {tree['changed']} "
        f"(digest {tree['digest']}) at the start{endText}.",
        "",
    ]
    summary: list[str] = []
    if "proxies" in R:
        P = R["proxies"]
        lines += [
            f"Setup: two proxies started together "
            f"({'once for the whole run' if args.same_processes else 'anew every round'}), identical "
            f"(LOG_LEVEL=info, {', '.join(f'{k}={v}' for k, v in LIMITS_ENV.items())}: the rate limiter out "
            f"of the way, admission still runs; other settings default{''.join(', ' + e for e in args.env)}) "
            + (
                'and both with TOKEN_COUNTING_ENABLED=false (--control: an A/A run, "on" is a second "off"; '
                "what it finds is the bench's own noise)"
                if args.control
                else 'except TOKEN_COUNTING_ENABLED=true ("on") / false ("off")'
            )
            + f", both pinned to CPU {SUT_CPU}; the fake (bench/fakeserver.py), wrk and "
            f"the TTFB client on CPU {LOAD_CPU}; loopback. {args.rounds} rounds; in each, every answer kind "
            "is measured on one proxy then the other (the order swaps every round), never both at once. "
            f"wrk: one thread, {args.connections} connections, {args.duration:g} s after a {args.warmup:g} "
            "s warm-up, ~1 KB POST bodies.",
            "",
        ]
        # Only answer kinds with at least one complete on/off pair (a run
        # that was interrupted may have fewer).
        modes = [m for m in args.modes if all(P["load"][m][side] for side in SIDES)]
        ratios = {mode: ratioRows(P["load"][mode]) for mode in modes}
        P["ratios"] = ratios
        if not modes:
            lines += [
                "(No throughput runs: time to first byte only.)"
                if not args.modes
                else "(No complete on/off pair was measured.)",
                "",
            ]
        else:
            lines += [
                f"## Throughput and proxy CPU at {args.connections} connections",
                "",
                "Medians over the rounds; the on/off ratios are taken round by round (the two runs of a "
                "round were back to back) and their median and range are shown.",
                "",
                "| answer | req/s on | req/s off | on/off req/s (range) | CPU us/req on | CPU us/req off | "
                "on/off CPU (range) | added us/req (range) | p50 ms on / off | p99 ms on / off |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for mode in modes:
                x = ratios[mode]
                lines.append(
                    f"| {MODE_TEXT[mode]} | {x['rps']['on']:.0f} | {x['rps']['off']:.0f} | "
                    f"{x['rpsRatio']:.3f} ({fmtRange(x['rpsRatios'], '.3f')}) | {x['cpu']['on']:.0f} | "
                    f"{x['cpu']['off']:.0f} | {x['cpuRatio']:.3f} ({fmtRange(x['cpuRatios'], '.3f')}) | "
                    f"{x['addedUs']:+.0f} ({fmtRange(x['addedUsAll'], '+.0f')}) | "
                    f"{x['p50']['on'] / 1e3:.2f} / {x['p50']['off'] / 1e3:.2f} | "
                    f"{x['p99']['on'] / 1e3:.2f} / {x['p99']['off'] / 1e3:.2f} |"
                )
            lines += [
                "",
                "Proxy share of its core (median): "
                + "; ".join(
                    f"{mode} {ratios[mode]['core']['on'] * 100:.0f}% on / "
                    f"{ratios[mode]['core']['off'] * 100:.0f}% off"
                    for mode in modes
                )
                + ". Below 100%, the proxy and the fake take turns and req/s understates a CPU difference; "
                "CPU per request is the direct measure of what accounting costs.",
                "",
            ]
            for mode in TARGET_MODES:
                if mode in ratios:
                    ok = ratios[mode]["rpsRatio"] >= TARGET_THROUGHPUT_RATIO
                    summary.append(
                        f"| throughput on/off, {MODE_TEXT[mode]} | >= {TARGET_THROUGHPUT_RATIO} | "
                        f"{ratios[mode]['rpsRatio']:.3f} (rounds "
                        f"{fmtRange(ratios[mode]['rpsRatios'], '.3f')}); CPU/request on/off "
                        f"{ratios[mode]['cpuRatio']:.3f} | {verdict(ok)} |"
                    )
            interference = max(ratios[m]["maxOthers"] for m in modes)
            steal = max(ratios[m]["maxSteal"] for m in modes)
            loadInterference = max(ratios[m]["maxLoadOthers"] for m in modes)
            loadSteal = max(ratios[m]["maxLoadSteal"] for m in modes)
            attempts = sum(ratios[m]["attempts"] for m in modes)
            runs = sum(ratios[m]["runs"] for m in modes)
            lines += [
                "Round by round (interference: the largest share of CPU 0 or CPU 1 taken by other processes "
                "or the host during the run kept, on / off):",
                "",
                "| answer | round | req/s on | req/s off | on/off | CPU us/req on | CPU us/req off | on/off "
                "| interference |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for mode in modes:
                for i, (on, off) in enumerate(
                    zip(P["load"][mode]["on"], P["load"][mode]["off"], strict=True)
                ):
                    lines.append(
                        f"| {mode} | {i + 1} | {on['rps']:.0f} | {off['rps']:.0f} | "
                        f"{on['rps'] / off['rps']:.3f} | {on['proxyCpuPerRequestUs']:.0f} | "
                        f"{off['proxyCpuPerRequestUs']:.0f} | "
                        f"{on['proxyCpuPerRequestUs'] / off['proxyCpuPerRequestUs']:.3f} | "
                        f"{disturbance(on) * 100:.0f}% / {disturbance(off) * 100:.0f}% |"
                    )
            lines += [
                "",
                f"Interference in the runs kept: on CPU {SUT_CPU} (the proxies) other processes up to "
                f"{interference * 100:.0f}%, host steal up to {steal * 100:.0f}%; on CPU {LOAD_CPU} (wrk, "
                f"the fake) other processes up to {loadInterference * 100:.0f}%, host steal up to "
                f"{loadSteal * 100:.0f}%. {attempts} wrk runs for {runs} kept (a run above 5% is measured "
                f"again, up to --retries times); the run waited for a quiet machine {run.quietWaits} times.",
                "",
            ]
        lines += [
            f"Proxy RSS at start: on {P['rssStart']['on'] / 2**20:.1f} MiB, off "
            f"{P['rssStart']['off'] / 2**20:.1f} MiB (the difference is mostly the cl100k_base encoding)"
            + (
                f"; at the end: on {P['rssEnd']['on'] / 2**20:.1f} MiB, off "
                f"{P['rssEnd']['off'] / 2**20:.1f} MiB."
                if "rssEnd" in P
                else "."
            ),
            "",
        ]
        if P["ttfb"]:
            T = P["ttfb"]
            pooled = {side: [t for r in T for t in r[side]] for side in SIDES}
            perRound = [
                {side: (percentile(r[side], 50), percentile(r[side], 99)) for side in SIDES} for r in T
            ]
            diffs = [x["on"][0] - x["off"][0] for x in perRound]
            lo, hi = bootstrapMedianDiff(pooled["on"], pooled["off"])
            p50 = {side: percentile(pooled[side], 50) for side in SIDES}
            p99 = {side: percentile(pooled[side], 99) for side in SIDES}
            added = p50["on"] - p50["off"]
            spreadOff = max(x["off"][0] for x in perRound) - min(x["off"][0] for x in perRound)
            pairs = [d for r in T for d in r.get("pairs", [])]
            paired = statistics.median(pairs) if pairs else float("nan")
            roundPaired = [statistics.median(r["pairs"]) for r in T if r.get("pairs")]
            if len(roundPaired) >= 2:
                # Rounds, not streams, are the independent samples: each has
                # its own two processes (unless --same-processes).
                plo, phi = tInterval(roundPaired)
            else:
                plo, phi = float("nan"), float("nan")
            P["ttfbSummary"] = {
                "p50": p50,
                "p99": p99,
                "added": added,
                "ci": (lo, hi),
                "roundDiffs": diffs,
                "n": {s: len(pooled[s]) for s in SIDES},
                "offP50Spread": spreadOff,
                "paired": paired,
                "pairedCI": (plo, phi),
                "pairs": len(pairs),
                "roundPaired": roundPaired,
            }
            lines += [
                "## Time to the first SSE event",
                "",
                f"Scenario `{TTFB_SCENARIO}`; per round {args.ttfb_requests} sequential streams through each "
                f"proxy, alternating request by request, each on a new connection, after 10 warm-ups each; "
                f"time from sending the request to the first `event:` bytes.",
                "",
                "| round | p50 ms on | p50 ms off | added p50 ms | p99 ms on | p99 ms off | added p99 ms |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for i, x in enumerate(perRound):
                lines.append(
                    f"| {i + 1} | {x['on'][0] * 1e3:.3f} | {x['off'][0] * 1e3:.3f} | "
                    f"{(x['on'][0] - x['off'][0]) * 1e3:+.3f} | {x['on'][1] * 1e3:.3f} | "
                    f"{x['off'][1] * 1e3:.3f} | {(x['on'][1] - x['off'][1]) * 1e3:+.3f} |"
                )
            lines += [
                f"| all ({len(pooled['on'])} / {len(pooled['off'])}) | {p50['on'] * 1e3:.3f} | "
                f"{p50['off'] * 1e3:.3f} | {added * 1e3:+.3f} | {p99['on'] * 1e3:.3f} | "
                f"{p99['off'] * 1e3:.3f} | {(p99['on'] - p99['off']) * 1e3:+.3f} |",
                "",
                f"Added p50 with counting on: {added * 1e3:+.3f} ms over all streams (95% bootstrap interval "
                f"{lo * 1e3:+.3f} to {hi * 1e3:+.3f} ms); round by round "
                f"{fmtRange([d * 1e3 for d in diffs], '+.3f')} ms. For scale: the p50 of the counting-off "
                f"proxy alone moved by {spreadOff * 1e3:.3f} ms between rounds.",
                "",
                f"Paired: on - off of the two streams of each pair, sent back to back, cancels what drifts "
                f"within a round (the machine, the fake). Its median per round: "
                f"{', '.join(f'{d * 1e3:+.3f}' for d in roundPaired)} ms; over all {len(pairs)} pairs "
                f"{paired * 1e3:+.3f} ms. "
                + (
                    "Each round had its own two proxy processes, and two processes of the same code differ "
                    "by themselves, so the rounds are the samples: their mean is "
                    f"{statistics.fmean(roundPaired) * 1e3:+.3f} ms (95% t interval {plo * 1e3:+.3f} to "
                    f"{phi * 1e3:+.3f} ms). The verdict uses it."
                    if not args.same_processes
                    else f"One pair of processes served every round (--same-processes): the interval "
                    f"{plo * 1e3:+.3f} to {phi * 1e3:+.3f} ms over rounds does not cover how two processes "
                    f"differ by themselves."
                ),
                "",
            ]
            measurable = not (plo <= 0 <= phi)
            summary.append(
                f"| added TTFB with counting on | no measurable difference | paired, mean over rounds "
                f"{statistics.fmean(roundPaired) * 1e3 if roundPaired else float('nan'):+.3f} ms "
                f"(95% interval {plo * 1e3:+.3f} to {phi * 1e3:+.3f}); p50 on - p50 off {added * 1e3:+.3f} "
                f"ms (interval {lo * 1e3:+.3f} to {hi * 1e3:+.3f}; rounds "
                f"{fmtRange([d * 1e3 for d in diffs], '+.3f')}) | "
                f"{verdict(not measurable)}{'' if not measurable else ' (the paired interval excludes 0)'} |"
            )
    if "tokens" in R:
        K = R["tokens"]
        C = K["corpus"]
        mix = ", ".join(f"{k} {v / C['chars'] * 100:.0f}%" for k, v in C["shares"].items())
        lines += [
            "## Tokens counted per CPU-second (in-process tiktoken)",
            "",
            f"Counter: `loadCounter({{}})` gave {K['load']['counter']}, loaded in "
            f"{K['load']['wall'] * 1e3:.0f} ms ({K['load']['cpu'] * 1e3:.0f} ms CPU), "
            f"+{K['load']['rss'] / 2**20:.1f} MiB "
            f"RSS{'; problems: ' + '; '.join(K['load']['problems']) if K['load']['problems'] else ''}.",
            f"Corpus: {C['chars']:,} characters ({C['bytes']:,} bytes UTF-8, sha256 {C['sha256']}), built "
            "deterministically (seeded) from English prose, Python code, JSON tool calls and Chinese, in "
            f"shuffled 1-4 K blocks: {mix} of the characters. CPU is `time.process_time()` (all threads); "
            f"single-threaded runs pinned to CPU {SUT_CPU}, medians of {args.token_reps} runs (the three "
            "kinds interleaved), each after a quiet machine.",
            "",
            "| what | texts | tokens | M tokens / CPU-s (range) | M chars / CPU-s | chars per token |",
            "|---|---:|---:|---:|---:|---:|",
        ]

        def row(label: str, x: dict[str, Any], texts: int) -> str:
            return (
                f"| {label} | {texts:,} | {x['tokens']:,.0f} | {x['tokensPerCpuSecond'] / 1e6:.2f} "
                f"({x['min'] / 1e6:.2f}-{x['max'] / 1e6:.2f}) | {x['charsPerCpuSecond'] / 1e6:.2f} | "
                f"{x['chars'] / x['tokens']:.2f} |"
            )

        if "inline" not in K or "threadsShort" not in K:
            lines += ["(The tiktoken measurements did not finish.)", ""]
            K = {}
    if "tokens" in R and K:
        lines += [
            row("one big text, `counter.count`", K["big"], 1),
            row("~20-char texts (an SSE delta), `counter.count` each", K["short"], K["short"]["texts"]),
            row(
                f"{K['inlineChars']}-char texts (INLINE_CHARS), `Counting.count` each",
                K["inline"],
                K["inline"]["texts"],
            ),
            "",
            f"A 20-character count costs {K['short']['perCallUs']:.1f} us of CPU per call; cut into "
            f"20-character pieces the corpus gives {K['short']['tokens'] / K['big']['tokens']:.2f}x the "
            "tokens of the whole text (the proxy counts the accumulated text once, not delta by delta).",
            "",
            "Two threads at once (two long-lived threads, warmed up, free to use both CPUs; each counts "
            "every text; tokens per wall-second is the throughput, tokens per CPU-second the efficiency):",
            "",
            "| texts | threads | M tokens / wall-s | M tokens / CPU-s | 2 threads / 1, wall (range over "
            "runs) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, label in (
            ("threadsBig", "64 K-char texts (the thread-pool path)"),
            ("threadsShort", "20-char texts"),
        ):
            x = K[name]
            for n, key in ((1, "one"), (2, "two")):
                y = x[key]
                speed = f"{x['speedup']:.2f}x ({fmtRange(x['speedups'], '.2f')})" if n == 2 else ""
                lines.append(
                    f"| {label}, {x['texts']:,} | {n} | {y['tokensPerWallSecond'] / 1e6:.2f} | "
                    f"{y['tokensPerCpuSecond'] / 1e6:.2f} | {speed} |"
                )
        lines += [
            "",
            f"Each of the {len(K['threadsBig']['speedups'])} runs per row counts the texts twice per "
            "thread; one- and two-thread runs alternate. The ratio is taken run by run.",
            "",
        ]
        summary.append(
            f"| tokens counted per CPU-second (report) | - | {K['big']['tokensPerCpuSecond'] / 1e6:.2f} M "
            f"one big text; {K['short']['tokensPerCpuSecond'] / 1e6:.2f} M in 20-char texts; 2 threads "
            f"{K['threadsBig']['speedup']:.2f}x "
            f"one on 64 K texts | |"
        )
    lines += ["## Errors and warnings", ""]
    for name, path in run.logs.items():
        if name.startswith("proxy"):
            scanned = scanLog(path)
            side = name.rsplit("-", 1)[1]
            # wrk drops its connections with requests in flight at the end of
            # every run (warm-up and measured): up to this many 499s.
            expected = 2 * args.connections * len(args.modes) * args.rounds
            statuses = scanned["statuses"]
            lines.append(
                f"- `{path.relative_to(ROOT)}`: access-log statuses {statuses}; {len(scanned['bad'])} "
                "warn/error lines"
            )
            for line in scanned["bad"][:5]:
                lines.append(f"  - `{line[:200]}`")
            others = {k: v for k, v in statuses.items() if k not in ("200", "499")}
            if others:
                run.problems.append(f"{name}: non-200 statuses in the access log: {statuses}")
            if statuses.get("499", 0) > expected:
                run.problems.append(
                    f"{name}: {statuses['499']} requests logged as 499 (client gone), over {expected}"
                )
            elif statuses.get("499"):
                lines.append(
                    f"  - the {statuses['499']} 499s are wrk closing its connections with requests in "
                    f"flight as each run ends (up to {expected} expected)"
                )
            if scanned["bad"]:
                run.problems.append(f"{name} ({side}): {len(scanned['bad'])} warn/error lines in its log")
        else:
            text = path.read_text(errors="replace") if path.exists() else ""
            bad = [
                line
                for line in text.splitlines()
                if "Traceback" in line or "#error" in line or "#critical" in line
            ]
            lines.append(f"- `{path.relative_to(ROOT)}`: {len(bad)} error lines")
            if bad:
                run.problems.append(f"{name}: {len(bad)} error lines in its log")
    lines.append("")
    if run.problems:
        lines += ["Problems seen:", ""] + [f"- {p}" for p in run.problems] + [""]
    else:
        lines += ["No wrk socket errors, no non-2xx responses, no failed streams, no proxy warnings.", ""]
    if summary:
        head = [
            "## Targets",
            "",
            *(
                [
                    "**Control run (--control): counting is off in both proxies, so any verdict below is "
                    "the bench's own noise, not a cost.**",
                    "",
                ]
                if args.control
                else []
            ),
            "| target | wanted | result | verdict |",
            "|---|---|---|---|",
            *summary,
            "",
        ]
        at = next(i for i, line in enumerate(lines) if line.startswith("## "))
        lines[at:at] = head
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="The cost of token accounting: counting on vs off, in one run."
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk warm-up before each (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, on and off alternating; medians (3)")
    parser.add_argument(
        "--retries", type=int, default=1, help="measure a wrk run again if CPU 0 was disturbed (1)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--modes",
        default="json,stream,json-nousage,stream-nousage",
        help=f"answer kinds under wrk, among {', '.join(MODES)} (all)",
    )
    parser.add_argument(
        "--same-processes",
        action="store_true",
        help="keep the two proxies for the whole run (default: new ones every round)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="both proxies with counting off (an A/A run: the bench's own noise)",
    )
    parser.add_argument(
        "--ttfb-requests", type=int, default=200, help="sequential streams per proxy per round (200)"
    )
    parser.add_argument(
        "--corpus-mb", type=float, default=1.0, help="size of the token corpus, million characters (1)"
    )
    parser.add_argument(
        "--token-reps", type=int, default=3, help="runs of each tiktoken measurement; medians (3)"
    )
    parser.add_argument("--only", default="proxies,tokens", help="comma-separated sections: proxies, tokens")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each measurement, wait up to this long for other processes to leave the CPUs (60)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for both proxies (repeatable); TOKEN_COUNTING_ENABLED is set per proxy",
    )
    parser.add_argument(
        "--fake", choices=("quiet", "twistd"), default="quiet", help="as in bench/run.py (quiet)"
    )
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= set(MODES) or not (args.modes or args.ttfb_requests):
        parser.error(f"--modes must be among {', '.join(MODES)} (empty: time to first byte only)")
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if not sections or not sections <= {"proxies", "tokens"}:
        parser.error("--only takes proxies, tokens")
    if any("=" not in item for item in args.env):
        parser.error("--env takes NAME=VALUE")
    if "proxies" in sections:
        for tool in ("wrk", "taskset"):
            if shutil.which(tool) is None:
                print(f"counting: {tool} is not installed", file=sys.stderr)
                return 2
        if not Path(TWISTD).exists():
            print(
                f"counting: {TWISTD} not found; create the venv and pip install -e . first", file=sys.stderr
            )
            return 2
    if not {SUT_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print("counting: needs CPUs 0 and 1", file=sys.stderr)
        return 2

    prepareProcess()

    run = Run(args)
    facts = machineFacts()
    command = ".venv/bin/python bench/counting.py" + (
        "" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])
    )
    started = time.monotonic()
    children = Children()
    resultsPath = OUT / f"counting-results-{run.stamp}.json"
    try:
        if "proxies" in sections:
            run.say("counting on vs off, through two proxies:")
            run.results["proxies"] = {}
            proxyPhase(run, children, run.results["proxies"])
            resultsPath.write_text(json.dumps(run.results, indent=2, default=str))
        if "tokens" in sections:
            run.say("tokens per CPU-second, in-process:")
            run.results["tokens"] = {}
            tokensPhase(run, run.results["tokens"])
    except BenchError as e:
        run.problem(f"aborted: {e}")
    except (KeyboardInterrupt, SystemExit):
        # Still report what was measured before the interruption.
        run.problem("aborted: interrupted; the figures below are partial")
    finally:
        children.stopAll()
    treeEnd = treeState()
    if treeEnd != run.treeAtStart:
        run.problem(
            f"the code changed during the run: commit {run.treeAtStart['commit']} / "
            f"{run.treeAtStart['digest']} at the start, {treeEnd['commit']} / {treeEnd['digest']} at the "
            "end (both proxies loaded theirs at the start)"
        )
    resultsPath.write_text(json.dumps(run.results, indent=2, default=str))
    try:
        text = report(run, facts, command, time.monotonic() - started, treeEnd)
    except Exception as e:  # a partial run: keep what can be said
        if not any(p.startswith("aborted") for p in run.problems):
            raise
        text = "\n".join(
            [
                "# counting.py aborted",
                "",
                *[f"- {p}" for p in run.problems],
                "",
                f"(no full report from partial results: {e!r}; raw figures in "
                f"{resultsPath.relative_to(ROOT)})",
                "",
            ]
        )
    path = OUT / f"counting-{run.stamp}.md"
    path.write_text(text)
    print(text)
    run.say(f"report written to {path.relative_to(ROOT)}")
    return 1 if any(p.startswith("aborted") for p in run.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
