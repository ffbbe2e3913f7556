# -*- test-case-name: tests.test_limiter -*-
"""
The limiter's learned ceiling on disk (C{RATE_LIMIT_STATE_FILE}), so a
restart resumes at what was learned instead of probing Z.AI from
C{RATE_LIMIT_MAX} again.

The file is the Go zai-proxy's JSON (C{ceiling}, C{hold}, C{ts}, plus
C{concurrency}), written to a temporary file and renamed into place, so a
crash mid-write never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone

import attrs
from twisted.logger import Logger

__all__ = ["CeilingState", "persistCeiling", "readCeiling", "restoreCeiling", "rfc3339", "writeCeiling"]


def rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@attrs.frozen
class CeilingState:
    """
    What the limiter learned.

    @ivar hold: the rate to resume at (just below the ceiling).
    @ivar concurrency: the concurrency limit learned, if any.
    @ivar learnedAt: when the ceiling was last moved (Unix time).
    """

    ceiling: float
    hold: float
    concurrency: int | None
    learnedAt: float


def writeCeiling(path: str, state: CeilingState) -> None:
    """
    Replace the file at C{path} with C{state}, making its folder (0700) if
    needed.

    @raise OSError: it could not be written; the old file is left as it was.
    """
    document = {
        "ceiling": state.ceiling,
        "hold": state.hold,
        "concurrency": state.concurrency,
        "ts": rfc3339(state.learnedAt),
    }
    directory = os.path.dirname(os.path.abspath(path))
    # Created on demand: the default state folder may not exist yet.
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def readCeiling(path: str) -> CeilingState:
    """
    The state in the file at C{path}; a file without C{ts} was learned when
    it was last written.

    @raise FileNotFoundError: there is none.
    @raise OSError, ValueError, KeyError, TypeError: it cannot be used.
    """
    with open(path) as f:
        state = json.load(f)
    ceiling, hold = float(state["ceiling"]), float(state["hold"])
    if not (ceiling > 0 and hold > 0):
        raise ValueError("ceiling and hold must be positive")
    stamp = state.get("ts")
    when = (
        datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        if isinstance(stamp, str)
        else os.path.getmtime(path)
    )
    concurrency = state.get("concurrency")
    return CeilingState(ceiling, hold, concurrency if isinstance(concurrency, int) else None, when)


def persistCeiling(path: str, state: CeilingState, log: Logger) -> None:
    """
    Write the state, logging (not raising) when it cannot be written.
    """
    try:
        writeCeiling(path, state)
    except OSError as e:
        log.warn("Rate limit: failed to persist ceiling state to {path}: {error}", path=path, error=str(e))
        return
    log.debug(
        "Rate limit: persisted ceiling {ceiling:.2f} req/s (hold {hold:.2f}) to {path}",
        ceiling=state.ceiling,
        hold=state.hold,
        path=path,
    )


def restoreCeiling(path: str, maxAge: float, now: float, log: Logger) -> CeilingState | None:
    """
    The state to resume at, if the file holds one young enough; otherwise
    log why not.
    """
    try:
        state = readCeiling(path)
    except FileNotFoundError:
        log.info("Rate limit: no persisted ceiling at {path}; starting from RATE_LIMIT_MAX", path=path)
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warn(
            "Rate limit: ignoring persisted ceiling at {path}: {error}",
            path=path,
            error=str(e) or type(e).__name__,
        )
        return None
    age = now - state.learnedAt
    if age > maxAge:
        log.warn(
            "Rate limit: ignoring persisted ceiling at {path}: {age:.0f} s old, older than "
            "RATE_LIMIT_STATE_MAX_AGE",
            path=path,
            age=age,
        )
        return None
    return state
