# -*- test-case-name: tests.test_workers -*-
"""
C{twistd zaiproxy --workers N}: N worker processes serving one port.

One Twisted process relays on one core. With C{--workers N} the process
twistd started is worker 0 and also the supervisor: it starts workers 1 to
N-1 (the same command, with C{--worker-index K}), starts again one that
exits while it runs (after a back-off that grows while a worker keeps
failing), forwards SIGHUP to them, and on stop sends them SIGTERM and waits
for their drains (bounded; then SIGKILL). A worker whose supervisor is gone
(its parent pid changed) stops itself.

How the port is shared, and why: every worker binds its own listening
socket on the same address with C{SO_REUSEPORT} (L{ReusePortEndpoint}),
and the kernel spreads new connections over the sockets by a hash of each
connection's addresses, so the workers get an even share without any of
them accepting for the others. The alternatives were worse:

  - One socket, inherited by every worker (as systemd's is): all the
    workers wait on one accept queue and the kernel wakes them all, or
    whichever is already awake (the busiest) wins; the shares come out
    uneven.
  - The supervisor accepting and handing connections to the workers over
    UNIX sockets: a hop more, and the supervisor's one core caps the total.

The price of C{SO_REUSEPORT}: connections the kernel has queued for a
worker that dies before accepting them are reset, and a socket passed by
systemd (C{zaiproxy.socket}) cannot be shared this way, so C{--workers}
takes C{--listen tcp:...} only. Each socket is adopted into the reactor
with C{adoptStreamPort}, as L{zaiproxy.config.activation} adopts systemd's.

A worker keeps its own counters; each serves its own admin port
(C{--admin-listen} port + K), which Prometheus scrapes as a target of its
own, and C{sum()} gives the totals. Limits are shared through Redis
(C{REDIS_URL}), which C{--workers} therefore requires.

The reactor is always passed in; nothing here imports it, nor
C{twisted.internet.endpoints} (which clears systemd's variables).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProcessTransport,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zaiproxy.config.activation import Listener

__all__ = [
    "Backoff",
    "ParentWatch",
    "ReusePortEndpoint",
    "Supervisor",
    "TCPAddress",
    "WorkerCommand",
    "instanceName",
    "workersProblem",
]

#: Runs twistd in a child: C{python -m twisted} would run C{twist}, which
#: takes none of twistd's options.
TWISTD_MAIN = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"

log = Logger(namespace="zaiproxy.workers")


# -- TCP descriptions --------------------------------------------------------------


def _tokens(description: str) -> list[tuple[str | None, str]]:
    """
    A strports description as (key or None, value) pairs, with its
    backslash escapes (C{interface=\\:\\:1}) undone.
    """
    items: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            items.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    items.append((key, "".join(current)))
    return items


@frozen
class TCPAddress:
    """
    A C{tcp:} or C{tcp6:} server description, as its parts.
    """

    port: int
    interface: str = ""
    backlog: int = 50
    six: bool = False

    @classmethod
    def parse(cls, description: str) -> TCPAddress | None:
        """
        The parts of C{description}, or L{None} if it is not a TCP one.
        """
        (_, kind), *rest = _tokens(description)
        if kind not in ("tcp", "tcp6"):
            return None
        values: dict[str, str] = {}
        # Twisted's tcp: and tcp6: parsers take their arguments in these orders.
        positional = ["port", "backlog", "interface"] if kind == "tcp6" else ["port", "interface", "backlog"]
        for key, value in rest:
            name = key if key is not None else (positional.pop(0) if positional else "")
            if name not in ("port", "interface", "backlog"):
                return None
            values[name] = value
        try:
            port, backlog = int(values.get("port", "")), int(values.get("backlog", "50"))
        except ValueError:
            return None
        return cls(port, values.get("interface", ""), backlog, kind == "tcp6")

    @property
    def family(self) -> int:
        return socket.AF_INET6 if self.six or ":" in self.interface else socket.AF_INET

    def withPort(self, port: int) -> TCPAddress:
        return TCPAddress(port, self.interface, self.backlog, self.six)

    @property
    def description(self) -> str:
        text = f"{'tcp6' if self.six else 'tcp'}:{self.port}"
        if self.interface:
            text += ":interface=" + self.interface.replace("\\", "\\\\").replace(":", "\\:")
        if self.backlog != 50:
            text += f":backlog={self.backlog}"
        return text

    def listener(self, reactor: Any, description: str) -> Listener:
        """
        A L{Listener} that binds this address with C{SO_REUSEPORT}.
        """
        return Listener(f"{description}, SO_REUSEPORT", ReusePortEndpoint(reactor, self))


def reusePortSocket(address: TCPAddress) -> socket.socket:
    """
    A non-blocking listening socket on C{address} that other sockets with
    C{SO_REUSEPORT} (of the same user) may bind too.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        # As Twisted's own TCP ports do on POSIX: a restart binds at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        default = "::" if address.family == socket.AF_INET6 else ""
        sock.bind((address.interface or default, address.port))
        sock.listen(address.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    Listen on a L{TCPAddress} with C{SO_REUSEPORT}: bind the socket
    ourselves, then hand it to the reactor (C{adoptStreamPort}, which keeps
    a duplicate; ours is closed).
    """

    def __init__(self, reactor: Any, address: TCPAddress) -> None:
        self._reactor = reactor
        self.address = address

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        address = self.address
        try:
            sock = reusePortSocket(address)
        except OSError as e:
            return defer.fail(CannotListenError(address.interface, address.port, e))
        with sock:
            port: IListeningPort = self._reactor.adoptStreamPort(sock.fileno(), sock.family, protocolFactory)
        return defer.succeed(port)


# -- what --workers needs -------------------------------------------------------------


def instanceName(configured: str, host: str, port: int | None, index: int, count: int) -> str:
    """
    This process's name: INSTANCE_NAME, else C{host:port} (the host alone
    without a known port); with several workers, C{/index} after it, so
    each worker has a name of its own.
    """
    name = configured or (f"{host}:{port}" if port else host)
    return f"{name}/{index}" if count > 1 else name


def workersProblem(
    count: int,
    redisURL: str,
    listen: Sequence[str],
    adminListen: Sequence[str],
    source: str,
    foreground: bool,
) -> str | None:
    """
    Why C{--workers count} cannot run with these options, in one line, or
    L{None}. C{source} is where the listeners come from (C{systemd} or
    C{--listen}); C{foreground}: twistd logs to standard output.
    """
    flag = f"--workers {count}"
    if count <= 1:
        return None
    if not redisURL:
        return (
            f"{flag} needs REDIS_URL: without a shared Redis each worker would offer Z.AI the whole "
            f"rate limit ({count} times what it accepts)"
        )
    if source == "systemd":
        return (
            f"{flag} cannot share sockets passed by systemd (zaiproxy.socket): each worker binds "
            "--listen itself with SO_REUSEPORT; stop the socket unit, or run one proxy per "
            "zaiproxy@.service instance"
        )
    for description in listen:
        address = TCPAddress.parse(description)
        if address is None or address.port == 0:
            return (
                f"{flag} needs --listen tcp:PORT[:interface=...] with a fixed port, not {description!r}: "
                "every worker binds that port with SO_REUSEPORT"
            )
    if not adminListen:
        return (
            f"{flag} needs --admin-listen tcp:PORT: each worker keeps its own counters and serves "
            f"them on PORT+K (K = 0..{count - 1}); Prometheus scrapes each worker and sum() gives the totals"
        )
    for description in adminListen:
        address = TCPAddress.parse(description)
        if address is None or address.port == 0 or address.port + count - 1 > 65535:
            return (
                f"{flag} needs --admin-listen tcp:PORT[:interface=...] with a fixed port, not "
                f"{description!r}: worker K serves /metrics on PORT+K"
            )
    if not foreground:
        return (
            f"{flag} needs twistd -n (--nodaemon) logging to standard output (no --logfile, --syslog "
            "or --logger): the workers write their log lines to the supervisor's standard output"
        )
    return None


def adminListenFor(descriptions: Sequence[str], index: int) -> list[str]:
    """
    Worker C{index}'s admin descriptions: each port plus C{index}.
    """
    moved = []
    for description in descriptions:
        address = TCPAddress.parse(description)
        moved.append(description if address is None else address.withPort(address.port + index).description)
    return moved


# -- the supervisor ----------------------------------------------------------------------


@frozen
class WorkerCommand:
    """
    How to start worker K: C{executable}, C{prefix}, zaiproxy's own options
    (as twistd was given them), then C{--worker-index K}.
    """

    executable: str
    options: tuple[str, ...]
    prefix: tuple[str, ...] = ("-c", TWISTD_MAIN, "-n", "--pidfile=", "zaiproxy")

    @classmethod
    def forTwistd(cls, options: Sequence[str]) -> WorkerCommand:
        """
        The python running this twistd, in the foreground, without a pid file.
        """
        return cls(sys.executable, tuple(options))

    def argv(self, index: int) -> list[str]:
        return [self.executable, *self.prefix, *self.options, "--worker-index", str(index)]


@frozen
class Backoff:
    """
    How long to wait before starting again a worker that exited: C{first}
    seconds, doubled for each exit in a row up to C{longest}; a worker that
    ran C{settled} seconds or more starts the count over.
    """

    first: float = 1.0
    longest: float = 30.0
    settled: float = 60.0

    def delay(self, failures: int) -> float:
        return float(min(self.longest, self.first * 2 ** max(failures - 1, 0)))


def describeExit(reason: Failure) -> str:
    code = getattr(reason.value, "exitCode", None)
    number = getattr(reason.value, "signal", None)
    if number is not None:
        try:
            return f"was killed by {signal.Signals(number).name}"
        except ValueError:
            return f"was killed by signal {number}"
    return f"exited with status {code}"


class _WorkerProtocol(ProcessProtocol):
    """
    One worker process. Its stdout and stderr are ours (no pipes): its log
    lines go where the supervisor's go.
    """

    def __init__(self, index: int, ended: Callable[[int, Failure], None]) -> None:
        self.index = index
        self._ended = ended
        self.done: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self._ended(self.index, reason)
        self.done.callback(None)


@frozen
class _Running:
    process: IProcessTransport
    protocol: _WorkerProtocol
    started: float
    pid: int


class Supervisor(Service):
    """
    Starts workers 1..count-1, starts again one that exits while this
    service runs, and stops them all when it stops.
    """

    name = "workers"

    def __init__(
        self,
        reactor: Any,
        command: WorkerCommand,
        count: int,
        environ: Mapping[str, str],
        stopTimeout: float,
        backoff: Backoff = Backoff(),
        forwardHangup: bool = True,
    ) -> None:
        self._reactor = reactor
        self._command = command
        self._count = count
        self._environ = dict(environ)
        self._stopTimeout = stopTimeout
        self._backoff = backoff
        self._forwardHangup = forwardHangup
        self._previousHangup: Any = None
        self._running: dict[int, _Running] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._failures: dict[int, int] = {}

    def pids(self) -> dict[int, int]:
        """
        The running workers' pids, by index.
        """
        return {index: running.pid for index, running in sorted(self._running.items())}

    def startService(self) -> None:
        super().startService()
        if self._forwardHangup:
            self._previousHangup = signal.signal(signal.SIGHUP, self._hangup)
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        protocol = _WorkerProtocol(index, self._ended)
        process = self._reactor.spawnProcess(
            protocol,
            self._command.executable,
            self._command.argv(index),
            env=self._environ,
            childFDs={0: 0, 1: 1, 2: 2},
        )
        self._running[index] = _Running(process, protocol, self._reactor.seconds(), process.pid)
        log.info(
            "Worker {index} of {count} started (pid {pid})", index=index, count=self._count, pid=process.pid
        )

    def _ended(self, index: int, reason: Failure) -> None:
        running = self._running.pop(index)
        if not self.running:
            log.info(
                "Worker {index} (pid {pid}) {how}", index=index, pid=running.pid, how=describeExit(reason)
            )
            return
        lived = self._reactor.seconds() - running.started
        failures = 1 if lived >= self._backoff.settled else self._failures.get(index, 0) + 1
        self._failures[index] = failures
        delay = self._backoff.delay(failures)
        log.warn(
            "Worker {index} (pid {pid}) {how} after {lived:.1f} s; starting it again in {delay:g} s",
            index=index,
            pid=running.pid,
            how=describeExit(reason),
            lived=lived,
            delay=delay,
        )
        self._restarts[index] = self._reactor.callLater(delay, self._spawn, index)

    def _hangup(self, signum: int, frame: Any) -> None:
        # Between any two bytecodes: the reactor forwards it on its turn.
        previous = self._previousHangup
        if callable(previous):
            previous(signum, frame)
        self._reactor.callFromThread(self._signalAll, "HUP")

    def _signalAll(self, name: str) -> None:
        for running in self._running.values():
            try:
                running.process.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._forwardHangup:
            signal.signal(signal.SIGHUP, self._previousHangup or signal.SIG_DFL)
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        waiting = [running.protocol.done for running in self._running.values()]
        if not waiting:
            return defer.succeed(None)
        log.info(
            "Stopping {count} worker(s) (pids {pids}): SIGTERM, then SIGKILL after {timeout:g} s",
            count=len(waiting),
            pids=", ".join(str(pid) for pid in self.pids().values()),
            timeout=self._stopTimeout,
        )
        self._signalAll("TERM")
        kill = self._reactor.callLater(self._stopTimeout, self._kill)
        done = defer.gatherResults(waiting)

        def stopped(_: object) -> None:
            if kill.active():
                kill.cancel()

        return done.addCallback(stopped)

    def _kill(self) -> None:
        for index, running in self._running.items():
            log.warn(
                "Worker {index} (pid {pid}) did not stop in {timeout:g} s: SIGKILL",
                index=index,
                pid=running.pid,
                timeout=self._stopTimeout,
            )
        self._signalAll("KILL")


class ParentWatch(Service):
    """
    In worker K > 0: stop the reactor (and so drain) when the supervisor
    is gone, which the parent pid changing tells; and, with
    C{handleSignals}, take SIGTERM and SIGINT once. A worker gets two when
    a terminal's Ctrl-C or systemd's stop (KillMode=control-group) signals
    every process and the supervisor then signals it again; Twisted's own
    handler would log a traceback for the second (ReactorNotRunning).
    """

    name = "parent-watch"

    def __init__(
        self,
        reactor: Any,
        index: int,
        parent: int,
        interval: float = 1.0,
        getppid: Callable[[], int] = os.getppid,
        handleSignals: bool = False,
    ) -> None:
        self._reactor = reactor
        self._index = index
        self._parent = parent
        self._getppid = getppid
        self._interval = interval
        self._handleSignals = handleSignals
        self._stopping = False
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        if self._handleSignals:
            # Once the reactor has installed its own handlers (twistd starts
            # the services before that): these replace them.
            self._reactor.callWhenRunning(self._takeSignals)
        self._loop.start(self._interval, now=True)

    def _takeSignals(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._signalled)

    def stopService(self) -> None:
        super().stopService()
        self._stopping = True
        if self._loop.running:
            self._loop.stop()

    def _signalled(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._stop, f"received {signal.Signals(signum).name}", log.info)

    def _check(self) -> None:
        if self._getppid() != self._parent:
            self._stop(f"the supervisor (pid {self._parent}) is gone", log.warn)

    def _stop(self, why: str, say: Callable[..., None]) -> None:
        if self._stopping:
            return
        self._stopping = True
        say("Worker {index}: {why}; stopping", index=self._index, why=why)
        if self._loop.running:
            self._loop.stop()
        self._reactor.stop()


def workerHealth(
    index: int, count: int, supervisor: Supervisor | None, parent: int | None
) -> Callable[[], dict[str, Any]]:
    """
    C{/health}'s C{worker} section: which worker answers, its pid, and (in
    worker 0) the pids of the others.
    """

    def section() -> dict[str, Any]:
        found: dict[str, Any] = {"index": index, "workers": count, "pid": os.getpid()}
        if parent is not None:
            found["supervisor_pid"] = parent
        if supervisor is not None:
            found["worker_pids"] = {str(k): pid for k, pid in supervisor.pids().items()}
        return found

    return section
