"""
The front door: the HTTP site, routing, client keys and the proxy's own endpoints.

Everything here runs before a request is handed to L{zaiproxy.relay}, or
instead of it (refusals, /health, /metrics).
"""
