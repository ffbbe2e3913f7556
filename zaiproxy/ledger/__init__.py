"""
The usage ledger: one row per finished request, rolled up by minute and
hour, written off the reactor thread and read by the dashboard's API.
"""
