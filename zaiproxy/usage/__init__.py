"""
The usage side room: what each answer costs in tokens, read as it passes.

Nothing here writes to the client or to metrics; it hands values back.
"""
