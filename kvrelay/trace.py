"""Hand-off timeline for diagnosis: with KVRELAY_TRACE_HANDOFF=1, the gateway, prefill and decode processes log
`handoff-trace <session> <event> <seconds>` lines. time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for every
process of the host, so bench/serve_latency.py can put the three logs on one timeline. Off by default: a disabled
mark costs one attribute test.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import time

log = logging.getLogger("kvrelay.trace")
ENABLED = os.environ.get("KVRELAY_TRACE_HANDOFF", "0") == "1"
LINE = re.compile(r"handoff-trace (\S+) (\S+) ([0-9.]+)")


def mark(session_id: str, event: str, at: float | None = None) -> None:
    if ENABLED:
        log.info("handoff-trace %s %s %.6f", session_id, event, time.perf_counter() if at is None else at)


def timelines(text: str) -> dict[str, dict[str, float]]:
    """session -> event -> time, from the mixed log lines of a deployment (the first mark of each event counts)."""
    out: dict[str, dict[str, float]] = {}
    for sid, event, at in LINE.findall(text):
        out.setdefault(sid, {}).setdefault(event, float(at))
    return out


def median_offsets(text: str, origin: str) -> list[tuple[str, float, int]]:
    """(event, median ms after `origin`, sessions) for every event, in time order, over the sessions with `origin`."""
    lines = [t for t in timelines(text).values() if origin in t]
    events = {e for t in lines for e in t}
    rows = []
    for event in events:
        offsets = [(t[event] - t[origin]) * 1e3 for t in lines if event in t]
        rows.append((event, statistics.median(offsets), len(offsets)))
    return sorted(rows, key=lambda row: row[1])
