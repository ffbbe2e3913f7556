# -*- test-case-name: tests.test_tap -*-
"""
C{twistd zaiproxy}: command-line options and the service they build.

This is the one module that touches the global reactor, and only inside
L{makeService}, after twistd has installed the reactor it was asked for.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import textwrap
from typing import IO, Any, ClassVar

from twisted.application.service import IService
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.logfile import LogFile

from zaiproxy import __version__
from zaiproxy.config.activation import chooseListeners
from zaiproxy.config.settings import Settings, SettingsError, loadSettings, settingSpecs
from zaiproxy.observe.logs import buildObserver

__all__ = ["Options", "makeService"]

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
    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "config",
            "c",
            None,
            "A KEY=VALUE file in systemd EnvironmentFile syntax (e.g. "
            "/etc/zaiproxy/zaiproxy.env); variables in the process environment "
            "override it. Re-read (with the client key file) on SIGHUP.",
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


def makeService(options: Options) -> IService:
    """
    Load and check the settings, then build the proxy service.
    """
    # Before anything imports twisted.internet.endpoints, which deletes
    # LISTEN_PID and LISTEN_FDS from the environment.
    environ = dict(os.environ)
    from twisted.internet import reactor

    from zaiproxy.front.clientkeys import ClientKeysError
    from zaiproxy.ledger.migrations import LedgerError
    from zaiproxy.service import BuildInfo, ProxyService

    try:
        settings, warnings = loadSettings(os.environ, options["config"])
    except SettingsError as e:
        _fail(str(e))
    observer = chooseObserver(getattr(options, "parent", None), settings, sys.stdout, reactor)
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
    try:
        service = ProxyService(
            reactor,
            settings,
            choice.listen,
            observer,
            [*warnings, *choice.warnings],
            build,
            adminListen=options["admin-listen"],
            configPath=options["config"],
            environ=os.environ,
            handleSignals=True,
        )
    except (ClientKeysError, LedgerError) as e:
        _fail(str(e))
        raise
    except (IndexError, KeyError):
        # The systemd: parser, asked for a descriptor that was not passed.
        _fail("invalid --listen: systemd passed no such socket (is zaiproxy.socket active?)")
        raise
    freezeStartupHeap()
    return service


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
