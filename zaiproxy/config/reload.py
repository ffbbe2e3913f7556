# -*- test-case-name: tests.test_reload -*-
"""
Reloading the configuration while running (SIGHUP).

The config file (C{--config}) and the client key file are read again and
validated exactly as at start-up. Client keys, the admin token, the
rate-limit bounds and the log level change at once, for the next request;
anything else that changed is reported as needing a restart (listeners,
upstreams, pools and timers are built once). A file that does not load
leaves the running configuration untouched and logs why in one line, never
quoting a secret.

The environment is the one the process started with (it cannot change from
outside), and it still wins over the file, except where it holds exactly
what the file said at start-up: systemd's C{EnvironmentFile=} of that same
file put it there, and the file governs it (so the unit can give the file
to both). A variable set otherwise (the unit's C{Environment=}) cannot be
changed by editing the file.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

import attrs
from twisted.logger import ILogObserver, Logger

from zaiproxy.config.envfile import EnvironmentFileError, readEnvironmentFile
from zaiproxy.config.settings import Settings, SettingsError, loadSettings, settingSpecs
from zaiproxy.front.access import Credentials
from zaiproxy.front.clientkeys import ClientKeys, ClientKeysError, buildClientKeys
from zaiproxy.limits.limiter import RateLimiter
from zaiproxy.observe.logs import LevelFilteringObserver
from zaiproxy.observe.metrics import Metrics

__all__ = ["LIVE_SETTINGS", "Reloadable", "Reloader"]

#: Settings a reload applies at once (attribute names of L{Settings}); a
#: change to any other is logged as needing a restart.
LIVE_SETTINGS = (
    "proxyApiKeysFile",
    "proxyApiKeys",
    "adminToken",
    "rateLimitInitial",
    "rateLimitMin",
    "rateLimitMax",
    "logLevel",
)

_BOUNDS = (
    ("rateLimitInitial", "RATE_LIMIT_INITIAL"),
    ("rateLimitMin", "RATE_LIMIT_MIN"),
    ("rateLimitMax", "RATE_LIMIT_MAX"),
)


def _notFromFile(environ: Mapping[str, str], configPath: str | None) -> dict[str, str]:
    """
    The environment without the variables that hold what the config file
    holds now (at start-up): those came from the file (systemd's
    C{EnvironmentFile=}), and on reload the file's new values must win.
    """
    environ = dict(environ)
    if configPath is None:
        return environ
    try:
        fileValues = readEnvironmentFile(configPath)
    except EnvironmentFileError:
        return environ
    for name, value in fileValues.items():
        if environ.get(name) == value:
            del environ[name]
    return environ


def _rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _describeKeys(keys: ClientKeys | None) -> str:
    # Names only: they are labels, never secrets.
    return "none" if keys is None else f"{len(keys)} ({', '.join(keys.names)})"


class Reloadable(Protocol):
    """
    What a reload reads and changes: the running proxy's settings and the
    pieces that take new values live (L{zaiproxy.service.ProxyService}).
    """

    reactor: Any
    settings: Settings
    credentials: Credentials
    observer: ILogObserver | None
    limiter: RateLimiter
    metrics: Metrics

    def warnIfOpen(self) -> None: ...


class Reloader:
    """
    Reloads one proxy's configuration, on demand or on SIGHUP.
    """

    log = Logger()

    def __init__(self, service: Reloadable, configPath: str | None, environ: Mapping[str, str]) -> None:
        self._service = service
        self._configPath = configPath
        self._environ = _notFromFile(environ, configPath)
        self._installed = False
        self._previous: Any = None
        self._state: dict[str, Any] = {"last_at": None, "result": "never", "restart_needed": []}

    def snapshot(self) -> dict[str, Any]:
        """
        The C{/health} "reload" section: when, how it went, what waits for
        a restart.
        """
        return {**self._state, "restart_needed": list(self._state["restart_needed"])}

    def reload(self) -> bool:
        """
        Read the files again and apply what can change live.

        @return: whether the new configuration was applied.
        """
        service = self._service
        now = service.reactor.seconds()
        try:
            new, warnings = loadSettings(self._environ, self._configPath)
            keys, keyWarnings = buildClientKeys(new.proxyApiKeys, new.proxyApiKeysFile or None)
        except (SettingsError, ClientKeysError) as e:
            # Both errors name the place and never quote a secret.
            self.log.error("Reload failed; keeping the running configuration: {reason}", reason=str(e))
            service.metrics.reloaded("failed")
            self._state = {**self._state, "last_at": _rfc3339(now), "result": "failed"}
            return False
        for warning in warnings + keyWarnings:
            self.log.warn("{warning}", warning=warning)
        self._apply(new, keys, now)
        return True

    def _observer(self) -> LevelFilteringObserver | None:
        # Through object: mypy-zope finds isinstance on "ILogObserver | None"
        # never true.
        current: object = self._service.observer
        return current if isinstance(current, LevelFilteringObserver) else None

    def _changes(self, old: Settings, new: Settings, keys: ClientKeys | None) -> list[str]:
        """
        What the reload changes, for its log line (names, never secrets).
        """
        credentials = self._service.credentials
        changes = []
        if keys != credentials.clientKeys:
            changes.append(f"client keys {_describeKeys(credentials.clientKeys)} -> {_describeKeys(keys)}")
        if new.adminToken != old.adminToken:
            changes.append("ADMIN_TOKEN " + ("changed" if new.adminToken else "removed"))
        for attribute, env in _BOUNDS:
            before, after = getattr(old, attribute), getattr(new, attribute)
            if before != after:
                changes.append(f"{env} {before:g} -> {after:g}")
        if new.logLevel != old.logLevel:
            changes.append(
                f"LOG_LEVEL {old.logLevel.name} -> {new.logLevel.name}"
                + ("" if self._observer() is not None else " (not applied: twistd's own logger is in use)")
            )
        return changes

    def _apply(self, new: Settings, keys: ClientKeys | None, now: float) -> None:
        """
        Apply the live settings of C{new}; log what changed and what waits
        for a restart.
        """
        service = self._service
        old = service.settings
        credentials = service.credentials
        hadKeys = credentials.clientKeys is not None
        restart = [
            spec.env
            for spec in settingSpecs()
            if spec.attribute not in LIVE_SETTINGS
            and getattr(old, spec.attribute) != getattr(new, spec.attribute)
        ]
        changes = self._changes(old, new, keys)
        credentials.clientKeys = keys
        credentials.adminToken = new.adminToken
        service.limiter.setBounds(new.rateLimitInitial, new.rateLimitMin, new.rateLimitMax)
        service.settings = attrs.evolve(old, **{name: getattr(new, name) for name in LIVE_SETTINGS})
        service.metrics.reloaded("ok", now)
        self._state = {"last_at": _rfc3339(now), "result": "ok", "restart_needed": restart}
        self.log.info(
            "Reloaded configuration: {changes}", changes="; ".join(changes) if changes else "no changes"
        )
        if restart:
            self.log.warn(
                "Reload: {names} changed; this needs a restart to take effect", names=", ".join(restart)
            )
        if hadKeys and keys is None:
            service.warnIfOpen()
        # Last, so the lines above show under the level they were logged at.
        observer = self._observer()
        if observer is not None:
            observer.setLevel(new.logLevel)

    # -- SIGHUP ------------------------------------------------------------------

    def installSignal(self) -> None:
        """
        Reload on SIGHUP (in the real daemon; tests call L{reload}).
        """
        if not self._installed:
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._installed = True

    def restoreSignal(self) -> None:
        """
        Put back whatever handled SIGHUP before.
        """
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
            self._previous = None

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler runs between any two bytecodes of whatever the
        # reactor was doing: hand the work to the reactor's own turn.
        self._service.reactor.callFromThread(self._reloadOnSignal)

    def _reloadOnSignal(self) -> None:
        self.log.info(
            "SIGHUP: reloading {config} and the client key file",
            config=self._configPath or "the environment (no --config)",
        )
        try:
            self.reload()
        except Exception:
            self.log.failure("Reload failed unexpectedly; keeping the running configuration")
