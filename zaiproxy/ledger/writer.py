# -*- test-case-name: tests.test_ledger_writer -*-
"""
Ledger rows leave the reactor thread through a bounded queue and are
written by one thread, in batches.

The relay never waits for the ledger: L{LedgerWriter.add} appends a
record to the queue or, when the queue is full, drops it and counts the
drop. The writer thread commits a batch when 500 rows are waiting or 250
ms after the first of them, whichever comes first: one transaction (one
fsync) per batch instead of one per request, the lesson every gateway with
a usage table learned. Stopping flushes what is queued.

The queue is a C{deque} the writer looks at every 25 ms, not a
C{queue.Queue}: a Queue wakes its consumer on every put, and handing the
GIL to the writer thread for each request cost the relay more than the
writes themselves.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from zaiproxy.ledger.migrations import LedgerAway, LedgerError
from zaiproxy.ledger.rows import GaugeSample, Origin
from zaiproxy.ledger.store import LedgerStore, Retention
from zaiproxy.observe.record import Record

__all__ = ["BATCH_ROWS", "BATCH_SECONDS", "LedgerWriter"]

#: A batch is committed at this many rows...
BATCH_ROWS = 500
#: ...or this long after its first row.
BATCH_SECONDS = 0.25
#: How often rows past their retention are deleted.
PRUNE_SECONDS = 3600.0
#: How often the writer looks at the queue.
LOOK_SECONDS = 0.025
#: The longest wait between tries while the database is away.
MAX_RETRY_SECONDS = 30.0


class LedgerWriter:
    """
    The queue and the thread that writes it to the store.

    @param onDropped: called on the reactor thread with a count and a
        reason (C{queue_full}, C{write_error}) for rows that were lost.
    @param onWritten: called on the writer thread with each batch's size.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: LedgerStore,
        origin: Origin,
        retention: Retention,
        capacity: int = 10_000,
        onDropped: Callable[[int, str], None] = lambda n, why: None,
        onWritten: Callable[[int], None] = lambda n: None,
        wallClock: Callable[[], float] = time.time,
        retryBase: float = 0.5,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._origin = origin
        self._retention = retention
        self._queue: deque[Record | GaugeSample] = deque()
        self._capacity = capacity
        self._onDropped = onDropped
        self._onWritten = onWritten
        self._wallClock = wallClock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._nextPrune = 0.0
        #: Why the database could not be reached at start, while it cannot.
        self.away: str | None = None
        #: Transient write failures in a row, and the first wait after one.
        self._failing = 0
        self._retryBase = retryBase
        #: The schema version, once opened.
        self.schema = 0

    @property
    def path(self) -> str:
        return self._store.path

    @property
    def queued(self) -> int:
        return len(self._queue)

    def open(self) -> int:
        """
        Open and migrate the store now (at start-up, so a bad path or a
        newer schema stops the proxy with a clear error); return the
        schema version, 0 when the database cannot be reached yet: the
        writer thread then keeps trying, and rows wait in the queue.

        @raise LedgerError: the store cannot be used.
        """
        try:
            self.schema = self._store.open()
        except LedgerAway as e:
            self.away = str(e)
            return 0
        return self.schema

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zaiproxy-ledger", daemon=True)
        self._thread.start()

    def add(self, record: Record) -> None:
        """
        Queue one record (the reporter's sink); never blocks.
        """
        self._put(record)

    def addGauges(self, sample: GaugeSample) -> None:
        self._put(sample)

    def _put(self, item: Record | GaugeSample) -> None:
        # deque.append and len are atomic: no lock, and no wake-up.
        if len(self._queue) >= self._capacity:
            self._onDropped(1, "queue_full")
        else:
            self._queue.append(item)

    def stop(self) -> Deferred[None]:
        """
        Write what is queued, close the store, end the thread; fires when
        it has.
        """
        if self._stopped is None:
            self._stopped = Deferred()
            if self._thread is None:
                # Never started: what was queued cannot be written now.
                lost = sum(isinstance(item, Record) for item in self._queue)
                if lost:
                    self._onDropped(lost, "write_error")
                self._store.close()
                self._stopped.callback(None)
            else:
                self._stopping.set()
        return self._stopped

    # -- the writer thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.away is not None:
                self._reach()
            while not (self._stopping.is_set() and not self._queue):
                batch = self._collect()
                if batch:
                    self._commit(batch)
                self._maybePrune()
        finally:
            self._store.close()
            self._reactor.callFromThread(self._ended)

    def _reach(self) -> None:
        """
        The database was away at start: try again, further apart each time,
        until it answers or the proxy stops (rows queue meanwhile).
        """
        tries = 0
        while not self._stopping.is_set():
            try:
                self.schema = self._store.open()
            except LedgerError:
                tries += 1
                self._pause(self._retryBase * 2 ** min(tries - 1, 6))
                continue
            self.away = None
            self._reactor.callFromThread(self.log.info, "Ledger reached after {n} tries", n=tries + 1)
            return

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + min(MAX_RETRY_SECONDS, seconds)
        while not self._stopping.is_set() and time.monotonic() < deadline:
            time.sleep(LOOK_SECONDS)

    def _ended(self) -> None:
        assert self._thread is not None and self._stopped is not None
        self._thread.join()
        self._stopped.callback(None)

    def _collect(self) -> list[Record | GaugeSample]:
        """
        The next batch: once a row is waiting, whatever comes within the
        batch interval, up to L{BATCH_ROWS} (all at once when stopping).
        """
        waiting = self._queue
        if not waiting:
            time.sleep(LOOK_SECONDS)
            if not waiting:
                return []
        deadline = time.monotonic() + BATCH_SECONDS
        while len(waiting) < BATCH_ROWS and not self._stopping.is_set() and time.monotonic() < deadline:
            time.sleep(LOOK_SECONDS)
        batch = []
        for _ in range(min(len(waiting), BATCH_ROWS)):
            batch.append(waiting.popleft())
        return batch

    def _commit(self, batch: list[Record | GaugeSample]) -> None:
        records = [item for item in batch if isinstance(item, Record)]
        gauges = [item for item in batch if isinstance(item, GaugeSample)]
        try:
            self._store.write(records, gauges, self._origin)
        except Exception as e:
            failure = Failure()
            if self._stopping.is_set() or not self._store.transient(e):
                if self._stopping.is_set():
                    # Stopping with the database away: no more tries.
                    records += [item for item in self._queue if isinstance(item, Record)]
                    self._queue.clear()
                self._reactor.callFromThread(self._failed, failure, len(records))
                return
            self._keep(batch, failure)
            return
        if self._failing:
            self._reactor.callFromThread(
                self.log.info, "Ledger writes resumed after {n} failed tries", n=self._failing
            )
            self._failing = 0
        self._onWritten(len(records))

    def _keep(self, batch: list[Record | GaugeSample], failure: Failure) -> None:
        """
        The database is away (a transient error): put the batch back at the
        head of the queue, as far as the queue has room (the rest is
        dropped and counted), and wait before the next try, longer each
        time up to 30 s. Requests go on meanwhile.
        """
        if not self._failing:
            self._reactor.callFromThread(
                self.log.failure,
                "Ledger writes are failing; rows wait in the queue (LEDGER_QUEUE_SIZE) and are retried",
                failure,
            )
        self._failing += 1
        kept = batch[: max(0, self._capacity - len(self._queue))]
        lost = sum(isinstance(item, Record) for item in batch[len(kept) :])
        self._queue.extendleft(reversed(kept))
        if lost:
            self._reactor.callFromThread(self._onDropped, lost, "queue_full")
        self._pause(self._retryBase * 2 ** min(self._failing - 1, 6))

    def _failed(self, failure: Failure, lost: int) -> None:
        self.log.failure("writing {n} ledger row(s) failed; they are lost", failure=failure, n=lost)
        if lost:
            self._onDropped(lost, "write_error")

    def _maybePrune(self) -> None:
        now = self._wallClock()
        if now < self._nextPrune:
            return
        self._nextPrune = now + PRUNE_SECONDS
        try:
            deleted = self._store.prune(now, self._retention)
        except Exception:
            self._reactor.callFromThread(self.log.failure, "pruning the ledger failed", Failure())
            return
        if deleted:
            self._reactor.callFromThread(
                self.log.info, "Ledger: deleted {n} row(s) past their retention", n=deleted
            )
