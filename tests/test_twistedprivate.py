"""
Tests for L{zaiproxy.twistedprivate}: the private Twisted APIs the proxy
relies on still exist with the shape it relies on.

Each failure names the Twisted API that changed, so an upgrade that breaks
one says so here instead of as a hang or a wrong exit status elsewhere.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from twisted.application import app
from twisted.internet import base
from twisted.internet.task import Clock
from twisted.web.client import URI, Agent, HTTPConnectionPool

from zaiproxy.relay.upstream import EndpointCache
from zaiproxy.twistedprivate import TargetCachingAgent, forgetExitSignal

#: Each private Agent method TargetCachingAgent calls or overrides, with the
#: parameters it passes, in order.
AGENT_METHODS = {
    "_init": ["self", "reactor", "endpointFactory", "pool"],
    "_getEndpoint": ["self", "uri"],
    "_computeHostValue": ["self", "scheme", "host", "port"],
    "_requestWithEndpoint": [
        "self",
        "key",
        "endpoint",
        "method",
        "parsedURI",
        "headers",
        "bodyProducer",
        "requestPath",
    ],
}


def _parameters(owner: type, name: str) -> list[str]:
    method = getattr(owner, name, None)
    assert callable(method), (
        f"Twisted no longer has {owner.__name__}.{name}, which zaiproxy.twistedprivate uses"
    )
    return list(inspect.signature(method).parameters)


@pytest.mark.parametrize("name", sorted(AGENT_METHODS))
def test_agentPrivateMethods(name: str) -> None:
    """
    Agent still has each private method TargetCachingAgent uses, taking
    the parameters it passes.
    """
    found = _parameters(Agent, name)
    assert found == AGENT_METHODS[name], (
        f"Twisted changed the private Agent.{name} that zaiproxy.twistedprivate.TargetCachingAgent "
        f"uses: parameters {found}, expected {AGENT_METHODS[name]}"
    )


@pytest.mark.parametrize("construct", ["init", "usingEndpointFactory"])
def test_agentConstructorsCallInit(construct: str) -> None:
    """
    Both of Agent's constructors end in C{_init}, where TargetCachingAgent
    makes its cache; the cached target is what C{_requestWithEndpoint} and
    the plain C{request} would compute.
    """
    clock = Clock()
    pool = HTTPConnectionPool(clock, persistent=False)
    if construct == "init":
        agent = TargetCachingAgent(clock, pool=pool)
    else:
        agent = TargetCachingAgent.usingEndpointFactory(clock, EndpointCache(clock, 1.0), pool=pool)
    assert getattr(agent, "_targets", None) == {}, (
        f"Twisted's Agent {construct} no longer calls Agent._init, which "
        "zaiproxy.twistedprivate.TargetCachingAgent overrides"
    )
    url = b"https://api.z.ai:8443/api/anthropic/v1/messages?beta=true"
    parsed = URI.fromBytes(url)
    assert agent._computeHostValue(parsed.scheme, parsed.host, parsed.port) == b"api.z.ai:8443", (
        "Twisted changed what the private Agent._computeHostValue returns"
    )


def test_exitSignal() -> None:
    """
    Reactors still record the stopping signal in C{_exitSignal}, and
    twistd's runner still reads it from there.
    """
    assert "_exitSignal" in vars(base.ReactorBase), (
        "Twisted's ReactorBase no longer has _exitSignal, which "
        "zaiproxy.twistedprivate.forgetExitSignal clears"
    )
    assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner), (
        "twistd's ApplicationRunner no longer reads reactor._exitSignal, which "
        "zaiproxy.twistedprivate.forgetExitSignal clears"
    )


def test_forgetExitSignal() -> None:
    """
    A recorded signal is forgotten; a reactor without the attribute is left
    as it is.
    """

    class Reactor:
        _exitSignal: Any = 15

    reactor: Any = Reactor()
    forgetExitSignal(reactor)
    assert reactor._exitSignal is None
    bare: Any = Clock()
    forgetExitSignal(bare)
    assert not hasattr(bare, "_exitSignal")
