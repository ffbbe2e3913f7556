"""
zaiproxy: a streaming reverse proxy in front of the Z.AI (GLM) API.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
