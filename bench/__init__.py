"""
The proxy's benchmarks, as tooling: one command per question, each run
from the repository root with the venv's interpreter (its twistd runs the
proxy, so install the tree first: C{pip install .}):

    .venv/bin/python -m bench.relay      # the proxy against the fake and a raw Agent relay
    .venv/bin/python -m bench.counting   # token counting on vs off; tiktoken's speed
    .venv/bin/python -m bench.memory     # RSS with many slow streams, and across one large one
    .venv/bin/python -m bench.streams    # time to the first SSE event
    .venv/bin/python -m bench.layers     # treq's layers on the raw relay
    .venv/bin/python -m bench.hotspots   # where the proxy's CPU goes (py-spy)

L{bench.harness} starts the processes and measures (with L{bench.load}'s
load generators), L{bench.report} turns the figures into Markdown, and
L{bench.session} holds what the commands share. Each command prints its
report and writes it, with the raw figures as JSON and every process's
log, to bench/out/ (git-ignored). bench/fakeserver.py, bench/minirelay.py
and bench/streamclient.py are the processes the harness starts.
"""
