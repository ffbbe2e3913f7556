"""
A smoke test of the bench harness (bench/harness.py): start the fake and
the proxy as the benchmarks do, put one second of load through each, get
figures back and render them. It asserts their structure and sanity, never
a speed: how fast anything ran says nothing about the code on a shared
machine, and the benchmarks themselves measure that.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# bench/ is tooling beside the package, not installed with it. The suite
# imports the installed zaiproxy (twistd runs that copy): the repository
# root goes last on the path, so it adds bench without shadowing it.
if importlib.util.find_spec("bench") is None:
    sys.path.append(str(ROOT))

from bench.harness import DIRECT_PATH, PROXY_PATH, Cpus, Harness, Summary  # noqa: E402
from bench.load import Load, Plan, chooseTool  # noqa: E402
from bench.report import footer, header, latencyTable, throughputTable  # noqa: E402
from bench.session import machineFacts, runInfo, toJson, treeState  # noqa: E402


@pytest.mark.timeout(60)
def test_harnessSmoke(tmp_path: Path) -> None:
    """
    One second of JSON POSTs through the proxy (wrk if installed, else the
    Python client) and half a second of the Python client direct to the
    fake: every request answered, CPU read for each process, a report with
    its tables, and every process stopped at the end.
    """
    started = time.monotonic()
    plan = Plan(duration=1.0, warmup=0.0, retries=0, quietWait=0.0, tool=chooseTool("auto"))
    # Unpinned: the suite's own scheduling is not the test's to change.
    harness = Harness(tmp_path, "smoke", plan, Cpus(None, None), say=lambda text: None)
    with harness:
        fake = harness.startFake()
        proxy = harness.startProxy(fake, "proxy", {"LOG_LEVEL": "info"})
        viaProxy = harness.measure(
            "proxy", proxy.url(PROXY_PATH), 4, {"sut": proxy.child, "fake": fake.child}, Load.post()
        )
        harness.plan = Plan(duration=0.5, warmup=0.0, retries=0, quietWait=0.0, tool="python")
        direct = harness.measure("direct", fake.url(DIRECT_PATH), 2, {"fake": fake.child}, Load.post())
        children = [fake.child, proxy.child]
    assert not any(child.alive() for child in children)

    for measured in (viaProxy, direct):
        assert measured.load.requests > 0
        assert measured.load.errors == 0, measured.load.errorLines
        assert 0 < measured.load.p50 <= measured.load.p99 <= measured.load.max
        assert measured.cpu["fake"] > 0
    assert viaProxy.load.tool == plan.tool and direct.load.tool == "python"
    assert viaProxy.cpuPerRequestUs("sut") > 0
    assert harness.problems == []

    info = runInfo(harness, "pytest tests/test_bench.py", started, machineFacts(), treeState(), {})
    [proxyLog] = [log for log in info.logs if log.name == "proxy"]
    assert proxyLog.statuses.get("200", 0) > 0
    assert info.allProblems == []

    summaries = {"direct to the fake": Summary.of([direct]), "zaiproxy": Summary.of([viaProxy])}
    text = "\n".join(
        [*header("smoke", info), *throughputTable(summaries), *latencyTable(summaries), *footer(info)]
    )
    assert "| target | req/s | req/s range | its CPU us/request |" in text
    assert "| zaiproxy | " in text and "| direct to the fake | " in text
    assert "No load errors" in text
    assert toJson(summaries["zaiproxy"])["runs"][0]["load"]["requests"] == viaProxy.load.requests


@pytest.mark.timeout(60)
def test_ledgerRowsSmoke(tmp_path: Path) -> None:
    """
    bench.ledger's rows part at 3,000 rows: every row and its rollups
    written, each question answered from the table its span calls for, a
    real proxy on the file answering over HTTP, and a report.
    """
    from bench.ledger import QUESTIONS, measureRows, rowsReport

    plan = Plan(duration=0.0, warmup=0.0, retries=0, quietWait=0.0, tool="python")
    harness = Harness(tmp_path / "out", "smoke", plan, Cpus(None, None), say=lambda text: None)
    folder = tmp_path / "ledger"
    folder.mkdir()
    with harness:
        results = measureRows(3_000, harness, folder)
    assert results.tableRows["requests"] == 3_000
    # 30 days of minutes and hours, every one with traffic in it.
    assert results.tableRows["usage_hour"] >= 720
    resolutions = {name: resolution for name, (_, _, resolution) in results.questions.items()}
    assert resolutions["30 days by client"] == "hour"
    assert resolutions["24 hours by model"] == "minute"
    assert resolutions["1 hour by client (request rows)"] == "request"
    assert set(results.questions) == set(QUESTIONS)
    assert all(worst >= median > 0 for median, worst in results.http.values())
    assert "| 30 days by client | hour rows |" in "\n".join(rowsReport(results))
