"""
A fake Z.AI (GLM) upstream for testing, benchmarking and demonstrating
zaiproxy: L{FakeZai} imitates the Anthropic- and OpenAI-compatible
endpoints, and a L{Scenario} says how each request is answered.
"""

from .content import Usage, inputTokensFor, usageFor
from .scenario import Scenario, formatScenario, parseScenario
from .server import SCENARIO_HEADER, FakeZai, ReceivedRequest

__all__ = [
    "SCENARIO_HEADER",
    "FakeZai",
    "ReceivedRequest",
    "Scenario",
    "Usage",
    "formatScenario",
    "inputTokensFor",
    "parseScenario",
    "usageFor",
]
