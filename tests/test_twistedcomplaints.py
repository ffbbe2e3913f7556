"""
Tests for the plugin that fails a test on a complaint of Twisted's own
(L{twistedcomplaints}): inner test runs in a pytest subprocess, and the
event classifier on its own.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twistedcomplaints import Complaints, complaintIn

pytest_plugins = ["pytester"]

INNER = """
import pytest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.test.requesthelper import DummyChannel


def test_finishTwice():
    request = server.Request(DummyChannel(), False)
    request.finish()
    request.finish()


def test_unhandledDeferred():
    d = Deferred()
    d.errback(ZeroDivisionError("nobody handles this"))
    del d


def test_twistedWarns():
    Logger(namespace="twisted.web.http").warn("something odd")


def test_proxyLogsErrors():
    log = Logger(namespace="zaiproxy.relay.relay")
    log.error("an upstream error the test provoked")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("a failure the proxy handled")


def test_expected(twistedComplaints):
    Logger(namespace="twisted.web.http").warn("something odd, on purpose")
    twistedComplaints.expect("on purpose")


def test_finishTwiceExpected():
    request = server.Request(DummyChannel(), False)
    request.finish()
    with pytest.warns(UserWarning, match="finish called twice"):
        request.finish()
"""


def test_innerRun(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A test whose log holds "request.finish called twice", an unhandled
    error in a Deferred or a warning Twisted logged errors at its teardown,
    with the complaint in the report; what the proxy logs itself, and a
    complaint a test expects, pass.
    """
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))
    pytester.makeconftest("from twistedcomplaints import twistedComplaints\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=6, errors=3)
    output = result.stdout.str()
    for name in ("test_finishTwice", "test_unhandledDeferred", "test_twistedWarns"):
        assert f"ERROR test_inner.py::{name} - Failed: Twisted complained" in output
    for name in ("test_proxyLogsErrors", "test_expected", "test_finishTwiceExpected"):
        assert f"ERROR test_inner.py::{name} " not in output
    assert "UserWarning: Warning! request.finish called twice." in output
    assert "Unhandled error in Deferred" in output
    assert "ZeroDivisionError: nobody handles this" in output
    assert "[twisted.web.http] something odd" in output


def _event(namespace: str, level: LogLevel, failure: Any = None) -> dict[str, Any]:
    event: dict[str, Any] = {}
    observer: Any = event.update
    Logger(namespace=namespace, observer=observer).emit(level, "message {n}", n=1, log_failure=failure)
    if failure is None:
        del event["log_failure"]
    return event


@pytest.mark.parametrize(
    "namespace, level, failed, complaint",
    [
        ("twisted.web.http", LogLevel.warn, False, True),
        ("twisted.internet.defer", LogLevel.critical, False, True),
        ("twisted.web.server", LogLevel.info, False, False),
        ("twisted.web.server", LogLevel.info, True, True),
        ("log_legacy", LogLevel.error, False, True),
        ("zaiproxy", LogLevel.critical, True, False),
        ("zaiproxy.relay.relay.Relay", LogLevel.error, True, False),
        ("zaiproxy.fake.server", LogLevel.warn, False, False),
        ("zaiproxyish", LogLevel.warn, False, True),
    ],
)
def test_complaintIn(namespace: str, level: LogLevel, failed: bool, complaint: bool) -> None:
    """
    A complaint is an event from outside the proxy's namespaces with a
    failure, or at warn or above.
    """
    failure = Failure(ZeroDivisionError("boom")) if failed else None
    text = complaintIn(_event(namespace, level, failure))
    if not complaint:
        assert text is None
        return
    assert text is not None
    assert text.startswith(f"[{namespace}] message 1")
    assert ("ZeroDivisionError: boom" in text) is failed


def test_expect() -> None:
    """
    L{Complaints.expect} takes back the complaints that mention a
    fragment, and insists there is one.
    """
    complaints = Complaints()
    complaints(_event("twisted.web", LogLevel.warn))
    complaints(_event("twisted.web", LogLevel.info))
    assert len(complaints.texts) == 1
    with pytest.raises(AssertionError):
        complaints.expect("not there")
    complaints.expect("message 1")
    assert complaints.texts == []
