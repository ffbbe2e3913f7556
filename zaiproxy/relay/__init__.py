"""
The spine: one request forwarded to Z.AI and its answer relayed back,
chunk by chunk, with backpressure.
"""
