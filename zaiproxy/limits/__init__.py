"""
Pacing to Z.AI's limits: admission, the adaptive ceiling, retries, and
what Z.AI's error codes mean.
"""
