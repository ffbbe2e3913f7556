# -*- test-case-name: tests.test_fake_tap -*-
"""
The C{zaiproxy-fake} twistd tap: run the fake Z.AI as a server, for
benchmarks, demos and end-to-end tests of the proxy.

    twistd -n zaiproxy-fake --listen tcp:9999:interface=127.0.0.1 \\
        --api-key secret --scenario "events=20 interval=0.05"
"""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.python import usage
from twisted.web.server import Site

from .scenario import Scenario, parseScenario, scenarioHelp
from .server import FakeZai

__all__ = ["DEFAULT_LISTEN", "Options", "makeService"]

#: Where the fake listens unless told otherwise: loopback only.
DEFAULT_LISTEN = "tcp:9999:interface=127.0.0.1"


class Options(usage.Options):
    """
    Command-line options of the C{zaiproxy-fake} tap.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a fake Z.AI upstream: the Anthropic-compatible endpoint under "
        "/api/anthropic/v1/ and the OpenAI-compatible ones under /api/paas/v4/ "
        "and /api/coding/paas/v4/. A request's x-fake-scenario header (the same "
        "spec syntax as --scenario) overrides the defaults for that request."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "api-key",
            "k",
            None,
            "Require this key (x-api-key or Authorization: Bearer); without it any request is accepted.",
        ],
        [
            "scenario",
            "s",
            None,
            "Default scenario spec, e.g. 'events=20 interval=0.05' or "
            "'mode=error code=1308' (key=value pairs separated by spaces or commas).",
        ],
    ]

    def getUsage(self, width: int | None = None) -> str:
        # The scenario language, listed after twistd's reflowed longdesc.
        return super().getUsage(width) + "\n" + scenarioHelp() + "\n"

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on this strports endpoint (repeatable; default tcp:9999:interface=127.0.0.1).
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self["defaults"] = parseScenario(self["scenario"] or "")
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Any) -> IService:
    """
    A L{MultiService} with one listening port per C{--listen}, all serving
    the same L{FakeZai}.
    """
    from twisted.internet import reactor

    defaults = options.get("defaults")
    if not isinstance(defaults, Scenario):
        defaults = parseScenario(options.get("scenario") or "")
    fake = FakeZai(reactor, apiKey=options.get("api-key"), defaults=defaults)
    site = Site(fake)
    service = MultiService()
    for description in options.get("listen") or [DEFAULT_LISTEN]:
        strports.service(description, site).setServiceParent(service)
    return service
