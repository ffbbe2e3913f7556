"""
twistd plugins: C{twistd zaiproxy} and C{twistd zaiproxy-fake}.

Import-light on purpose: the real modules load only when twistd runs the
command, after it has installed the reactor it was asked for.
"""

from twisted.application.service import ServiceMaker

zaiproxy = ServiceMaker(
    "zaiproxy",
    "zaiproxy.tap",
    "Streaming reverse proxy for the Z.AI (GLM) API",
    "zaiproxy",
)

zaiproxyFake = ServiceMaker(
    "zaiproxy-fake",
    "zaiproxy.fake.tap",
    "A fake Z.AI API (both dialects) for tests, benchmarks and demos",
    "zaiproxy-fake",
)
