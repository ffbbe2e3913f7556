# -*- test-case-name: tests.test_twistedprivate -*-
"""
Every use the proxy makes of Twisted's private APIs, and nothing else.

Each is here because a measurement showed it is needed;
tests/test_twistedprivate.py checks that each still exists with the
shape relied on, so a Twisted release that changes one fails there, by
name, rather than somewhere deep in a relay or shutdown test.

  - C{Agent._init}, C{Agent._getEndpoint}, C{Agent._computeHostValue},
    C{Agent._requestWithEndpoint}: L{TargetCachingAgent} parses each upstream
    URL once. The work it skips costs about 22 us a request on the
    benchmark VM (URL parsing, the endpoint, the Host value, a header copy),
    2.5% of the proxy's 856 us of CPU a request (bench/RESULTS.md); the
    hotspot profile there put it at 5% on the reference machine.
  - C{reactor._exitSignal}: after a stopping signal twistd kills itself with
    that signal once the reactor stops, so that the exit status reads
    "killed by SIGTERM"; L{forgetExitSignal} makes a completed drain a
    clean exit (status 0), which systemd and the SIGTERM test expect.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint
from twisted.web.client import URI, Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

__all__ = ["TargetCachingAgent", "forgetExitSignal"]

_Target = tuple[tuple[bytes, bytes, int], IStreamClientEndpoint, URI, bytes, bytes]


class TargetCachingAgent(Agent):
    """
    An Agent that parses each upstream URL once.

    L{Agent.request} re-parses and re-validates the URL, recomputes the
    Host value and copies the headers to add it, on every request; the
    relay only ever sends to a handful of URLs.
    """

    _MAX_TARGETS = 512

    def _init(self, *args: Any, **kwargs: Any) -> None:
        # Agent's constructors (both) end here.
        super()._init(*args, **kwargs)
        self._targets: dict[bytes, _Target] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        target = self._targets.get(uri)
        if target is None:
            parsed = URI.fromBytes(uri)
            target = (
                (parsed.scheme, parsed.host, parsed.port),
                self._getEndpoint(parsed),
                parsed,
                parsed.originForm,
                self._computeHostValue(parsed.scheme, parsed.host, parsed.port),
            )
            if len(self._targets) < self._MAX_TARGETS:
                self._targets[uri] = target
        key, endpoint, parsed, path, host = target
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers.setRawHeaders(b"host", [host])
        return self._requestWithEndpoint(key, endpoint, method, parsed, headers, bodyProducer, path)


def forgetExitSignal(reactor: IReactorCore) -> None:
    """
    Make twistd exit with status 0 after it was stopped by a signal.
    """
    # Reactors that capture the signal (ReactorBase and its subclasses)
    # have the attribute; others have nothing to forget.
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None  # type: ignore[attr-defined]  # private, see the module docstring
