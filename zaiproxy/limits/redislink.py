# -*- test-case-name: tests.test_redislink -*-
"""
The one connection to Redis that the shared limits use, and where it is.

Every call is bounded by C{REDIS_TIMEOUT}: txredisapi queues a command
while it reconnects, without a limit, and a proxy whose limiter waits on a
Redis that went away would hang its clients. A call that times out or
fails raises L{RedisAway}; the shared limits then go on alone.

Scripts are sent with EVALSHA (their SHA-1, not their text, on each call);
a Redis that restarted and forgot them gets them again with SCRIPT LOAD.

txredisapi imports the global reactor when it is imported, so this module
imports it only when a link is opened, inside twistd's running process.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["RedisAddress", "RedisAway", "RedisLink", "RedisRefused", "Script"]


class RedisAway(Exception):
    """
    Redis did not answer in time, or the connection failed.
    """


class RedisRefused(Exception):
    """
    Redis answered with an error.
    """


@attrs.frozen
class RedisAddress:
    """
    A parsed C{REDIS_URL}; C{masked} is what logs and C{/health} show.
    """

    host: str
    port: int
    db: int
    password: str | None = attrs.field(repr=False)

    @classmethod
    def fromURL(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError("expected redis://[:password@]host[:port][/db]")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError("the database after the host must be a number, as in redis://host:6379/0")
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, int(path or 0), password)

    @property
    def masked(self) -> str:
        auth = ":***@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"


@attrs.frozen
class Script:
    """
    A Lua script shipped in C{zaiproxy/limits/scripts/}, and its SHA-1.
    """

    name: str
    text: str
    sha: str

    @classmethod
    def named(cls, name: str) -> Script:
        text = (
            resources.files("zaiproxy.limits").joinpath("scripts").joinpath(name + ".lua").read_text("utf-8")
        )
        return cls(name, text, hashlib.sha1(text.encode("utf-8")).hexdigest())


class RedisLink:
    """
    A reconnecting txredisapi connection whose every call ends in time.

    @ivar connected: whether the last call (or connection attempt) worked.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, address: RedisAddress, timeout: float) -> None:
        self._clock = clock
        self.address = address
        self.timeout = timeout
        self._handler: Any = None
        self.connected = False

    def open(self) -> None:
        """
        Start connecting (and reconnecting, for as long as the link is open).
        """
        import txredisapi

        factory_ = txredisapi.lazyConnection(
            host=self.address.host,
            port=self.address.port,
            dbid=self.address.db,
            password=self.address.password,
            reconnect=True,
            connectTimeout=self.timeout,
            # Replies as Redis sent them: a field that reads like a number
            # stays text, as the scripts' callers expect.
            convertNumbers=False,
        )
        # Reconnect quickly: an outage's end should rejoin within a second
        # or two, not after txredisapi's default back-off of up to 10 s.
        factory_._factory.maxDelay = 1.0
        factory_._factory.initialDelay = 0.2
        # txredisapi reports a refused password (or database) here, once,
        # and stops reconnecting: say so, or the only sign would be "away".
        factory_._connected.addErrback(self._refused)
        self._handler = factory_

    def _refused(self, reason: Any) -> None:
        self.log.error(
            "Redis at {redis} refused this proxy: {why}; fix REDIS_URL and restart",
            redis=self.address.masked,
            why=reason.getErrorMessage(),
        )

    def close(self) -> Deferred[Any]:
        handler, self._handler = self._handler, None
        if handler is None:
            d: Deferred[Any] = Deferred()
            d.callback(None)
            return d
        closed: Deferred[Any] = handler.disconnect()
        return closed

    def _bounded(self, d: Deferred[Any]) -> Deferred[Any]:
        def failed(reason: Any) -> Any:
            import txredisapi

            if reason.check(txredisapi.ResponseError):
                # Redis answered, with an error (NOSCRIPT, a script's own).
                self.connected = True
                raise RedisRefused(reason.getErrorMessage())
            self.connected = False
            if reason.check(TimeoutError):
                raise RedisAway(f"Redis did not answer within {self.timeout:g} s")
            raise RedisAway(reason.getErrorMessage() or reason.type.__name__)

        def worked(result: Any) -> Any:
            self.connected = True
            return result

        d.addTimeout(self.timeout, self._clock)
        return d.addCallbacks(worked, failed)

    def command(self, name: str, *args: Any) -> Deferred[Any]:
        """
        One plain command, e.g. C{command("ping")}.
        """
        if self._handler is None:
            return _failed(RedisAway("the Redis link is closed"))
        try:
            d = self._handler.execute_command(name.upper(), *args)
        except Exception as e:
            return _failed(RedisAway(str(e)))
        return self._bounded(d)

    @inlineCallbacks
    def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """
        Run a script by its SHA-1, loading it first if Redis does not
        know it (a fresh or restarted Redis).
        """
        try:
            result = yield self.command("evalsha", script.sha, len(keys), *keys, *args)
        except RedisRefused as e:
            if "NOSCRIPT" not in str(e):
                raise
            yield self.command("script", "load", script.text)
            result = yield self.command("evalsha", script.sha, len(keys), *keys, *args)
        return result


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
