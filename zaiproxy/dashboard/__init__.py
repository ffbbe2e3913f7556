"""
The proxy's own live dashboard and its JSON API: usage from the ledger,
live points from the reporter, served under C{/dashboard} and C{/api/}.
"""
