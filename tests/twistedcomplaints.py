"""
A pytest plugin (loaded by conftest.py) that fails a test whose log holds
a complaint of Twisted's own, which pytest-twisted would let pass: a
warning or error that Twisted (or any library but the proxy) logged, a
failure nobody handled ("Unhandled error in Deferred", found by a garbage
collection at the test's end), or a Python warning attributed to Twisted's
code, the proxy's or the tests' (Twisted's C{"Warning! request.finish
called twice."} names its caller).

What the proxy logs itself (namespace C{zaiproxy} and below), at any level,
is its behaviour under test, not a complaint. A test that provokes a
complaint on purpose says which with the C{twistedComplaints} fixture's
L{Complaints.expect}; a Python warning it expects, with C{pytest.warns}.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

import twisted
import zaiproxy

__all__ = ["Complaints", "complaintIn", "twistedComplaints"]

#: Log namespaces whose events are the proxy's own.
OURS = "zaiproxy"

#: Python warnings attributed to code in these folders (Twisted's, the
#: proxy's, the tests') are complaints; a library's own deprecations are not.
_WARNING_FOLDERS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (twisted.__file__, zaiproxy.__file__, __file__)
)

_frozen: list[bool] = []


def complaintIn(event: dict[str, Any]) -> str | None:
    """
    The text of a log event that is a complaint, or L{None}: anything not
    logged by the proxy that carries a failure or is at C{warn} or above
    (legacy C{log.err} events arrive at C{critical}).
    """
    namespace = event.get("log_namespace") or ""
    if namespace == OURS or namespace.startswith(OURS + "."):
        return None
    failure = event.get("log_failure")
    level = event.get("log_level")
    if failure is None and (level is None or level < LogLevel.warn):
        return None
    text = f"[{namespace}] {formatEvent(event)}"
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


@implementer(ILogObserver)
class Complaints:
    """
    The complaints of one test's log, so far (a log observer).
    """

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        text = complaintIn(event)
        if text is not None:
            self.texts.append(text)

    def expect(self, fragment: str) -> None:
        """
        Take back the complaints that mention C{fragment}: this test
        provokes them on purpose. There must be at least one.
        """
        kept = [text for text in self.texts if fragment not in text]
        assert len(kept) < len(self.texts), f"no complaint mentions {fragment!r}: {self.texts}"
        self.texts = kept


@pytest.fixture(autouse=True)
def twistedComplaints() -> Iterator[Complaints]:
    """
    Collect this test's complaints; fail it at its teardown if any is left.
    """
    if not _frozen:
        # What is alive before the first test (modules, the reactor) is
        # not collected again: the collection at each test's end then
        # costs a few milliseconds, not tens.
        _frozen.append(True)
        gc.collect()
        gc.freeze()
    complaints = Complaints()
    globalLogPublisher.addObserver(complaints)
    try:
        # Inside pytest's own catch (which spans the whole test), with its
        # filters; what is caught here is handed on to it at the end.
        with warnings.catch_warnings(record=True) as caught:
            yield complaints
            # A Deferred whose failure nobody handled says so when collected.
            gc.collect()
            # What survives is frozen too, so the next test's collection
            # walks only what that test made (the heap grows as tests import
            # the SDKs and hypothesis: unfrozen, a collection cost 0.2 s).
            gc.freeze()
    finally:
        globalLogPublisher.removeObserver(complaints)
    for warning in caught:
        if os.path.abspath(warning.filename).startswith(_WARNING_FOLDERS):
            complaints.texts.append(
                f"{warning.filename}:{warning.lineno}: {warning.category.__name__}: {warning.message}"
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if complaints.texts:
        pytest.fail("Twisted complained during this test:\n\n" + "\n\n".join(complaints.texts), pytrace=False)
