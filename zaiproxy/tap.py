# -*- test-case-name: tests.test_tap -*-
"""
C{twistd zaiproxy}: command-line options and the service they build.

This is the one module that touches the global reactor, and only inside
L{makeService}, after twistd has installed the reactor it was asked for.

With C{--workers N} (N > 1) this process is worker 0 and supervises
workers 1..N-1, each the same command with C{--worker-index K}; every worker
binds the C{--listen} port itself with C{SO_REUSEPORT} and the kernel
spreads the connections (L{zaiproxy.workers} says why that mechanism).
"""

from __future__ import annotations

import gc
import os
import re
import socket
import sys
import textwrap
from collections.abc import Sequence
from typing import IO, Any, ClassVar

import attrs
from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from zaiproxy import __version__
from zaiproxy.config.activation import ListenChoice, Listener, chooseListeners
from zaiproxy.config.settings import Settings, SettingsError, loadSettings, settingSpecs
from zaiproxy.observe.logs import buildObserver
from zaiproxy.workers import (
    ParentWatch,
    Supervisor,
    TCPAddress,
    WorkerCommand,
    adminListenFor,
    instanceName,
    workerHealth,
    workersProblem,
)

__all__ = ["Options", "ProcessService", "makeService"]

DEFAULT_LISTEN = "tcp:8080"

log = Logger()


def _settingsHelp() -> str:
    lines = [
        "Settings come from the environment (and --config); the environment wins.",
        "",
    ]
    for spec in settingSpecs():
        default = (
            "required"
            if spec.default is None
            else f"default {spec.default}"
            if spec.default
            else "default: empty"
        )
        lines.append(f"  {spec.env} ({default})")
        lines.extend(textwrap.wrap(spec.help, 72, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


class Options(usage.Options):
    """
    C{twistd zaiproxy [--listen DESCRIPTION ...] [--admin-listen DESCRIPTION ...] [--config PATH]}
    """

    synopsis = "[--listen DESCRIPTION ...] [--admin-listen DESCRIPTION ...] [--config PATH]"
    optParameters: ClassVar[list[list[Any]]] = [
        [
            "config",
            "c",
            None,
            "A KEY=VALUE file in systemd EnvironmentFile syntax (e.g. "
            "/etc/zaiproxy/zaiproxy.env); variables in the process environment "
            "override it. Re-read (with the client key file) on SIGHUP.",
        ],
        [
            "workers",
            None,
            1,
            "Serve the --listen port with N processes (SO_REUSEPORT; the kernel spreads the "
            "connections). N > 1 needs REDIS_URL, --listen tcp:PORT and --admin-listen tcp:PORT "
            "(worker K serves its own metrics on PORT+K).",
            int,
        ],
        [
            "worker-index",
            None,
            0,
            "Internal: which worker this process is, set by the supervisor on the workers it starts.",
            int,
        ],
    ]

    longdesc = (
        f"zaiproxy {__version__}: a streaming reverse proxy in front of the Z.AI "
        "API. It injects the upstream key, relays answers as they arrive, counts "
        "tokens and exports Prometheus metrics."
    )

    def getUsage(self, width: int | None = None) -> str:
        # twistd reflows longdesc into one paragraph; the settings list
        # keeps its layout after it.
        return super().getUsage(width) + "\n" + _settingsHelp() + "\n"

    def __init__(self) -> None:
        super().__init__()
        # usage.Options takes an opt_ method's docstring as it is, indents
        # and all; reflowed, it wraps without gaps.
        self.docs = {name: " ".join(doc.split()) if doc else doc for name, doc in self.docs.items()}
        self["listen"] = []
        self["admin-listen"] = []
        #: The options as given, which the workers are started with.
        self.arguments: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, description: str) -> None:
        """
        Where to accept connections, as a strports description (e.g.
        tcp:8080:interface=127.0.0.1, unix:/run/zaiproxy.sock). Repeat to
        listen on several. Sockets passed by systemd (zaiproxy.socket) are
        used instead when there are any. [default: tcp:8080]
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_admin_listen(self, description: str) -> None:
        """
        Serve /metrics, /health, /readyz and /admin/* on this strports
        description (e.g. tcp:9090:interface=127.0.0.1) instead of the
        proxy's port, which then answers 404 for /metrics and /admin/*.
        Repeat to listen on several.
        """
        self["admin-listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["workers"] < 1:
            raise usage.UsageError(f"--workers must be 1 or more, not {self['workers']}")
        if not 0 <= self["worker-index"] < self["workers"]:
            raise usage.UsageError(f"--worker-index must be 0 to {self['workers'] - 1}")


def _fail(message: str) -> None:
    # One line and a non-zero exit: twistd has not started logging yet.
    sys.stderr.write(f"zaiproxy: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def chooseObserver(
    twistdOptions: Any, settings: Settings, stdout: IO[str], reactor: Any = None
) -> ILogObserver | None:
    """
    Our log observer, writing where twistd would have written.

    If the operator picked twistd's own logging (--logger or --syslog),
    leave it alone.
    """
    if twistdOptions is None:
        return buildObserver(stdout, settings.logFormat, settings.logLevel, reactor)
    if twistdOptions.get("logger") or twistdOptions.get("syslog"):
        return None
    logfile = twistdOptions.get("logfile") or ""
    if logfile == "-" or (not logfile and twistdOptions.get("nodaemon")):
        stream: Any = stdout
    else:
        stream = LogFile.fromFullPath(logfile or "twistd.log")
    return buildObserver(stream, settings.logFormat, settings.logLevel, reactor)


class ProcessService(MultiService):
    """
    What this process runs: the proxy and, with C{--workers}, the supervisor
    (worker 0) or the watch on it (the others). Under twistd it gives the
    application our log observer, as the proxy does when it is the top.
    """

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        if self.observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def makeService(options: Options) -> IService:
    """
    Load and check the settings, then build the proxy service (and, with
    C{--workers}, what runs beside it).
    """
    # Before anything imports twisted.internet.endpoints, which deletes
    # LISTEN_PID and LISTEN_FDS from the environment.
    environ = dict(os.environ)
    from twisted.internet import reactor

    from zaiproxy.service import BuildInfo

    try:
        settings, warnings = loadSettings(os.environ, options["config"])
    except SettingsError as e:
        _fail(str(e))
    twistdOptions = getattr(options, "parent", None)
    observer = chooseObserver(twistdOptions, settings, sys.stdout, reactor)
    build = BuildInfo(
        version=os.environ.get("ZAI_PROXY_VERSION") or __version__,
        commit=os.environ.get("ZAI_PROXY_COMMIT") or "unknown",
        buildTime=os.environ.get("ZAI_PROXY_BUILD_TIME") or "unknown",
    )
    for option in ("listen", "admin-listen"):
        for description in options[option]:
            problem = endpointProblem(reactor, description)
            if problem is not None:
                _fail(f"--{option} {description!r} is not a valid endpoint: {problem}")
    choice = chooseListeners(reactor, options["listen"], environ, os.getpid())
    for note in choice.notes:
        log.info("{note}", note=note)
    count, index = options["workers"], options["worker-index"]
    problem = workersProblem(
        count,
        settings.redisURL,
        options["listen"],
        options["admin-listen"],
        choice.source,
        foreground(twistdOptions),
    )
    if problem is not None:
        _fail(problem)
    name = instanceName(settings.instanceName, socket.gethostname(), firstPort(choice), index, count)
    settings = attrs.evolve(settings, instanceName=name)
    top = ProcessService(observer)
    proxy = _buildProxy(
        reactor,
        options,
        settings,
        _listeners(reactor, options, choice),
        observer,
        [*warnings, *choice.warnings],
        build,
    )
    proxy.setServiceParent(top)
    if count > 1:
        _addWorkerServices(reactor, options, settings, proxy, top)
    freezeStartupHeap()
    return top


def _listeners(reactor: Any, options: Options, choice: ListenChoice) -> Sequence[str | Listener]:
    """
    What the proxy listens on: the choice, or with several workers each
    C{--listen} bound with C{SO_REUSEPORT}.
    """
    if options["workers"] == 1:
        return choice.listen
    found = []
    for description in options["listen"]:
        address = TCPAddress.parse(description)
        assert address is not None  # workersProblem refused any other
        found.append(address.listener(reactor, description))
    return found


def _buildProxy(
    reactor: Any,
    options: Options,
    settings: Settings,
    listen: Sequence[str | Listener],
    observer: ILogObserver | None,
    warnings: list[str],
    build: Any,
) -> Any:
    from zaiproxy.front.clientkeys import ClientKeysError
    from zaiproxy.ledger.migrations import LedgerError
    from zaiproxy.service import ProxyService

    adminListen = options["admin-listen"]
    if options["workers"] > 1:
        adminListen = adminListenFor(adminListen, options["worker-index"])
    try:
        return ProxyService(
            reactor,
            settings,
            listen,
            observer,
            warnings,
            build,
            adminListen=adminListen,
            configPath=options["config"],
            # A reload reads the environment again: it must find the name
            # this process has, not report INSTANCE_NAME as changed.
            environ={**os.environ, "INSTANCE_NAME": settings.instanceName},
            handleSignals=True,
        )
    except (ClientKeysError, LedgerError) as e:
        _fail(str(e))
        raise
    except (IndexError, KeyError):
        # The systemd: parser, asked for a descriptor that was not passed.
        _fail("invalid --listen: systemd passed no such socket (is zaiproxy.socket active?)")
        raise


def _addWorkerServices(
    reactor: Any, options: Options, settings: Settings, proxy: Any, top: MultiService
) -> None:
    """
    Worker 0 supervises the others; the others watch that it is there.
    """
    count, index = options["workers"], options["worker-index"]
    supervisor: Supervisor | None = None
    parent: int | None = None
    if index == 0:
        # Bounded by the workers' own drain (grace, timeout, cut and flush) and a margin.
        stopTimeout = settings.drainGrace + settings.drainTimeout + 15.0
        command = WorkerCommand.forTwistd(options.arguments)
        supervisor = Supervisor(reactor, command, count, os.environ, stopTimeout)
        supervisor.setServiceParent(top)
    else:
        parent = os.getppid()
        ParentWatch(reactor, index, parent, handleSignals=True).setServiceParent(top)
    proxy.health.sections["worker"] = workerHealth(index, count, supervisor, parent)
    log.info(
        "Worker {index} of {count} (pid {pid}): instance {instance}{role}",
        index=index,
        count=count,
        pid=os.getpid(),
        instance=settings.instanceName,
        role="; supervising the others" if supervisor is not None else f"; supervisor pid {parent}",
    )


def foreground(twistdOptions: Any) -> bool:
    """
    Whether twistd logs to standard output (where the workers write theirs).
    """
    if twistdOptions is None:
        return True
    if twistdOptions.get("logger") or twistdOptions.get("syslog"):
        return False
    logfile = twistdOptions.get("logfile") or ""
    return logfile == "-" or (not logfile and bool(twistdOptions.get("nodaemon")))


def firstPort(choice: ListenChoice) -> int | None:
    """
    The port of the first C{--listen} TCP description, if that is what
    the proxy listens on.
    """
    for item in choice.listen:
        address = TCPAddress.parse(item) if isinstance(item, str) else None
        if address is not None:
            return address.port
    return None


_NOT_A_NUMBER = re.compile(r"invalid literal for int\(\) with base 10: (.*)")


def endpointProblem(reactor: Any, description: str) -> str | None:
    """
    What is wrong with an endpoint description, in words a user can act on
    (Twisted's parser says "invalid literal for int()" for a bad port), or
    L{None}. C{systemd:} descriptions are checked when they are used: only
    then is it known which sockets systemd passed.
    """
    # Imported here: twisted.internet.endpoints clears LISTEN_FDS on import.
    from twisted.internet.endpoints import serverFromString

    if description.startswith("systemd:"):
        return None
    try:
        serverFromString(reactor, description)
    except ValueError as e:
        text = str(e)
        notNumber = _NOT_A_NUMBER.fullmatch(text)
        if notNumber is not None:
            text = f"{notNumber.group(1)} is not a number"
        return f"{text} (expected e.g. tcp:8080:interface=127.0.0.1 or unix:/run/zaiproxy.sock)"
    return None


def freezeStartupHeap() -> None:
    """
    Take what start-up loaded (modules, settings, the tokenizer) out of the
    cyclic garbage collector: it lives as long as the process, and every
    full collection would walk all of it (about 50,000 objects, 20-35 ms
    on this machine, a pause every connection feels).
    """
    gc.collect()
    gc.freeze()
