"""
What leaves the proxy about each request: the record, the reporter that
fans it out, metrics, log lines, the quota poller.
"""
