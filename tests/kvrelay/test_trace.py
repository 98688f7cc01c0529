"""The hand-off timeline (kvrelay/trace.py): marks logged by several processes, read back into medians."""

from __future__ import annotations

import logging

from kvrelay import trace

LOG = """\
2026-12-04 00:00:00 kvrelay.trace handoff-trace s1 pf_offered 10.000000
2026-12-04 00:00:00 kvrelay.decode unrelated line 3.0
2026-12-04 00:00:00 kvrelay.trace handoff-trace s1 dc_handed 10.000200
2026-12-04 00:00:00 kvrelay.trace handoff-trace s1 dc_handed 10.900000
2026-12-04 00:00:00 kvrelay.trace handoff-trace s2 dc_handed 20.000600
2026-12-04 00:00:00 kvrelay.trace handoff-trace s2 pf_offered 20.000000
2026-12-04 00:00:00 kvrelay.trace handoff-trace s2 gw_start 19.970000
2026-12-04 00:00:00 kvrelay.trace handoff-trace s3 dc_handed 30.000000
"""


def test_marks_become_medians_relative_to_the_origin():
    lines = trace.timelines(LOG)
    assert lines["s1"] == {"pf_offered": 10.0, "dc_handed": 10.0002}  # the first mark of an event counts
    rows = trace.median_offsets(LOG, "pf_offered")  # s3 has no origin: left out
    assert [(event, round(ms, 3), n) for event, ms, n in rows] == [
        ("gw_start", -30.0, 1),
        ("pf_offered", 0.0, 2),
        ("dc_handed", 0.4, 2),
    ]


def test_marks_are_logged_only_when_enabled(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kvrelay.trace")
    monkeypatch.setattr(trace, "ENABLED", False)
    trace.mark("s", "pf_offered")
    assert caplog.text == ""
    monkeypatch.setattr(trace, "ENABLED", True)
    trace.mark("s", "pf_offered", at=1.5)
    assert trace.timelines(caplog.text) == {"s": {"pf_offered": 1.5}}
