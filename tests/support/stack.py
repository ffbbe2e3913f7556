"""
The proxy under test and the fake Z.AI behind it, as the C{makeStack}
fixture starts them.
"""

from __future__ import annotations

import attrs
from twisted.internet.address import IPv4Address

from zaiproxy.fake import FakeZai
from zaiproxy.fake.testing import RunningFake
from zaiproxy.service import ProxyService

__all__ = ["UPSTREAM_KEY", "Stack"]

#: The upstream key the proxy injects in tests; it must never reach a client.
UPSTREAM_KEY = "zai-upstream-SECRET-7f3a9"


@attrs.define
class Stack:
    """
    The fake upstream and the proxy in front of it.
    """

    fake: FakeZai
    upstream: RunningFake
    proxy: ProxyService

    @property
    def port(self) -> int:
        address = self.proxy.ports[0].getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def sample(self, name: str, **labels: str) -> float | None:
        """
        The current value of one metric sample of the proxy.
        """
        return self.proxy.metrics.registry.get_sample_value(name, labels)
