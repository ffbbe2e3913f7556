# -*- test-case-name: tests.test_ledger_reader -*-
"""
Reading the ledger off the reactor thread: each question runs on a small
thread pool of its own, on a read-only connection opened for it (SQLite
opens in well under a millisecond; WAL lets it read while the writer
commits).

A pool of its own, not the reactor's: a slow month-long query must not
hold up DNS lookups or the token counter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from zaiproxy.ledger.store import LedgerStore

__all__ = ["LedgerReader"]

T = TypeVar("T")


class LedgerReader:
    """
    Runs C{question(connection, *args)} on a reader thread.
    """

    def __init__(self, reactor: Any, store: LedgerStore, threads: int = 2) -> None:
        self._reactor = reactor
        self._store = store
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="zaiproxy-ledger-reader")

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """
        Wait for the questions being answered and end the threads.
        """
        self._pool.stop()

    def ask(self, question: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, self._answer, question, args)

    def _answer(self, question: Callable[..., T], args: tuple[Any, ...]) -> T:
        connection = self._store.reader()
        try:
            return question(connection, *args)
        finally:
            connection.close()
